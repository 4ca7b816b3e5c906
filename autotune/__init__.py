"""Measured tuning of chunk size, group size and tiles per GPU (docs/autotune.md).

- `autotune.space`: the candidates of a strategy on a tree, sizes ranked by the IO model,
  tiles filtered by shared memory;
- `autotune.measure`: timing candidates on the GPU (`harness.timing`'s discipline);
- `autotune.tune`: the search and the predicted ranking (``deft-cli autotune``);
- `autotune.store`: the files it writes: the chosen configs that `deft.TreeAttention` reads
  (`deft.kernels.tuned`, ``deft/kernels/configs/<card>.json``) and the log of every candidate
  (``autotune/logs/<card>.json``);
- `autotune.quality`: tuned against exhaustive, IO-model ranking against measured;
- `autotune.heldout`: the tuned choice against a size sweep on held-out trees and head shapes
  (``--held-out``, ``--check``), whose records the latency model is refitted to;
- `autotune.evaluation`: those runs and the refit as ``deft-cli autotune`` calls them.

The core never imports this package: `deft.kernels.tuned` reads the tables at run time.
"""

from autotune.store import Table, read_table, table_path, write_table, write_tuned

__all__ = ["Table", "read_table", "table_path", "write_table", "write_tuned"]
