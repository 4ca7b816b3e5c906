"""Measured tuning of chunk size, group size and tiles per GPU (docs/autotune.md).

- `autotune.space`: the candidates of a strategy on a tree, sizes ranked by the IO model,
  tiles filtered by shared memory;
- `autotune.buckets`: the key a tree's tuned config is stored under;
- `autotune.measure`: timing candidates on the GPU (`harness.timing`'s discipline);
- `autotune.tune`: the search and the predicted ranking (``deft-cli autotune``);
- `autotune.store`: the tables, ``autotune/configs/<device>.json``;
- `autotune.lookup`: what `deft.TreeAttention` runs when its sizes and tile are left None
  (`autotune.lookup.lookup`);
- `autotune.quality`: tuned against exhaustive, IO-model ranking against measured.
"""

from autotune.buckets import Bucket, bucket_of
from autotune.lookup import RUNGS, Tuned
from autotune.store import AutotuneWarning, Table, read_table, table_path, write_table

__all__ = [
    "RUNGS",
    "AutotuneWarning",
    "Bucket",
    "Table",
    "Tuned",
    "bucket_of",
    "read_table",
    "table_path",
    "write_table",
]
