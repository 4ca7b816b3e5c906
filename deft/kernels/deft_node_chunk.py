"""DeFT-Node-Chunk: KV-guided partitions, each node cut into chunks.

Partition (`reference.plan.build_plan`): one chunk of ``chunk_size`` tokens of one node x one
group of the queries that see it. Kernel: `deft.kernels.partials._partials_kernel` in FLAT mode
(a chunk is one run of the flattened tree), then `deft.kernels.reduction.merge`.
"""

from deft.kernels.deft_flatten import CONFIGS  # noqa: F401  (the same tiles)
from deft.kernels.partials import pick_config

FLAT = True
"""Flattened-run addressing with Euler-tour visibility (else listed slots)."""


def config(head_dim: int, group: int):
    """The `TileConfig` for a head dim and GQA ratio (query heads per KV head)."""
    return pick_config(CONFIGS, head_dim, group)
