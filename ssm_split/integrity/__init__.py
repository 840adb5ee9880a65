"""Integrity digests (pure): which bytes of a plan land in which dst segment (`Piece`),
64-bit digests of them on either side, and where a corrupted byte is (`Corruption`).
The NIXL backend's integrity mode moves these between processes.
"""

from ._digests import DIGEST_ALGORITHM as DIGEST_ALGORITHM
from ._digests import Piece as Piece
from ._digests import PageMemory as PageMemory
from ._digests import Corruption as Corruption
from ._digests import digest_bytes as digest_bytes
from ._digests import plan_pieces as plan_pieces
from ._digests import pieces_from as pieces_from
from ._digests import digest_pages as digest_pages
from ._digests import src_digests as src_digests
from ._digests import dst_digests as dst_digests
from ._digests import merge_src_digests as merge_src_digests
from ._digests import mismatches as mismatches
from ._digests import locate as locate

__all__ = [
    "DIGEST_ALGORITHM",
    "Piece",
    "PageMemory",
    "Corruption",
    "digest_bytes",
    "plan_pieces",
    "pieces_from",
    "digest_pages",
    "src_digests",
    "dst_digests",
    "merge_src_digests",
    "mismatches",
    "locate",
]
