"""Stage 2 — where a state's bytes sit on each rank.

- `rank_units` / `sharded_shapes` / `sub_projection_widths`: which heads, groups or
  channels a rank of `tp` holds (the logical index map, replication included);
  `valid_tp_sizes`: every TP size a spec can be sharded on;
- `page_layout`: the byte segments of one rank's page (`PageLayout`, `Segment`);
- `RegionSet` (`LayerRegion`, `Buffer`): where an engine's pages are in memory, per layer
  and block, on each side of a transfer;
- `format_layout`: a page as a table and an ASCII picture.
"""

from ._layout import UnitRange as UnitRange
from ._layout import Segment as Segment
from ._layout import PageLayout as PageLayout
from ._layout import rank_units as rank_units
from ._layout import page_layout as page_layout
from ._layout import sharded_shapes as sharded_shapes
from ._layout import sub_projection_widths as sub_projection_widths
from ._layout import valid_tp_sizes as valid_tp_sizes
from ._regions import Buffer as Buffer
from ._regions import LayerRegion as LayerRegion
from ._regions import RegionSet as RegionSet
from ._format import format_layout as format_layout

__all__ = [
    "UnitRange",
    "Segment",
    "PageLayout",
    "rank_units",
    "page_layout",
    "sharded_shapes",
    "sub_projection_widths",
    "valid_tp_sizes",
    "Buffer",
    "LayerRegion",
    "RegionSet",
    "format_layout",
]
