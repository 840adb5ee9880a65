"""Stage 4 — plans become NIXL descriptors for a batch of requests (vectorised numpy).

- `expand_plan`: per src rank, `(M, 3)` `(addr, nbytes, device_id)` arrays for both
  sides, merged across segments, blocks and layers wherever both sides are contiguous
  (`Expansion`, `RankDescriptors`);
- `prepare_tables` / `index_batch`: NIXL's "prepare once, make many" form: per peer, Nx5
  strided tables of every descriptor (`RankTables`, `DescriptorTable`), and per batch
  only index arrays (`IndexedBatch`, `RankIndices`);
- `check_batch`: the batch validation both share.
"""

from ._expand import RankDescriptors as RankDescriptors
from ._expand import RankedBatch as RankedBatch
from ._expand import Expansion as Expansion
from ._expand import check_batch as check_batch
from ._expand import expand_plan as expand_plan
from ._prepared import DescriptorTable as DescriptorTable
from ._prepared import RankTables as RankTables
from ._prepared import RankIndices as RankIndices
from ._prepared import IndexedBatch as IndexedBatch
from ._prepared import prepare_tables as prepare_tables
from ._prepared import index_batch as index_batch

__all__ = [
    "RankDescriptors",
    "RankedBatch",
    "Expansion",
    "check_batch",
    "expand_plan",
    "DescriptorTable",
    "RankTables",
    "RankIndices",
    "IndexedBatch",
    "prepare_tables",
    "index_batch",
]
