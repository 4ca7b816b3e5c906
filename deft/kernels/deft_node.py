"""DeFT-Node: KV-guided partitions, one whole node each.

Partition (`reference.plan.build_plan`): one node x one group of the queries that see it (the
queries of its subtree). Kernel: `deft.kernels.partials._partials_kernel` in FLAT mode (a node is
one run of the flattened tree; the Euler-tour test reduces to the causal offset for the node's
own queries), then `deft.kernels.reduction.merge`. Partitions are as uneven as the
nodes: the kernel of the unbalanced baseline.
"""

from deft.kernels.deft_flatten import CONFIGS  # noqa: F401  (the same tiles)
from deft.kernels.partials import pick_config

FLAT = True
"""Flattened-run addressing with Euler-tour visibility (else listed slots)."""


def config(head_dim: int, group: int):
    """The `TileConfig` for a head dim and GQA ratio (query heads per KV head)."""
    return pick_config(CONFIGS, head_dim, group)
