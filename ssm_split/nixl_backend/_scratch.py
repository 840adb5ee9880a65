"""The scratch buffer every endpoint registers next to its pages, and its header.

Layout of the `SCRATCH_NBYTES` bytes (the only owner of these numbers)::

    [0, 16)   header, read by peers:  magic b"SSMSPLIT" | generation (8 bytes, little-endian)
    [16, 64)  unused (readers land their READs of peers' headers in buffers of their own,
              which they retire while such a READ may still write: `_guard.Guard.landing`)

A src endpoint writes its registration generation into the header whenever it
(de)registers its pages, *before* deregistering, so that a reader that READs the header
after its data sees any re-registration that could have touched the bytes it read (the
generation fence, docs/reliability.md).
"""

from __future__ import annotations

import numpy as np

from ..layout._regions import Buffer

__all__ = ["SCRATCH_NBYTES", "HEADER_NBYTES", "encode_header", "parse_header", "header_desc"]

SCRATCH_NBYTES = 64
HEADER_NBYTES = 16
_MAGIC = b"SSMSPLIT"


def encode_header(generation: int) -> bytes:
    """The 16 header bytes for `generation`."""
    return _MAGIC + int(generation).to_bytes(8, "little")


def parse_header(header: bytes) -> int | None:
    """The generation in 16 header bytes, or None when they do not start with the magic."""
    if len(header) != HEADER_NBYTES or header[:8] != _MAGIC:
        return None
    return int.from_bytes(header[8:], "little")


def header_desc(scratch: Buffer) -> np.ndarray:
    """Shape `(1, 3)` uint64 `(addr, nbytes, device_id)`: the header of a scratch buffer."""
    return np.array([[scratch.addr, HEADER_NBYTES, scratch.device_id]], dtype=np.uint64)
