"""Flash-Decoding and Radix Attention: query-guided split-KV over each query's path.

Partition (`reference.plan.build_plan`): one query x one chunk of ``chunk_size`` tokens of its
path (root first). The plan lists every chunk's cache slots (for flash_decoding the slots of a
trivially paged cache, for radix those of the real page table: the same kernel, reading the
prefix once per query). Kernel: `deft.kernels.partials._partials_kernel` in list mode (every
listed token is visible), then `deft.kernels.reduction.merge`.
"""

from deft.kernels.tree_attention_s import CONFIGS  # noqa: F401  (the same tiles)
from deft.kernels.partials import pick_config

FLAT = False
"""Flattened-run addressing with Euler-tour visibility (else listed slots)."""


def config(head_dim: int, group: int):
    """The `TileConfig` for a head dim and GQA ratio (query heads per KV head)."""
    return pick_config(CONFIGS, head_dim, group)
