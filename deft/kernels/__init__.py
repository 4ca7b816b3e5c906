"""Triton kernels of the GPU strategies, one module per strategy name.

Every strategy runs the same two kernels: `partials._partials_kernel` (the partial results of
its partitions, one program per (partition, kv_head) work item) and a merge of `reduction` (the
deterministic log-sum-exp merge per query: `_merge_kernel`, one program per (query, head), or
`_merge_query_kernel`, one per query, as `reduction.per_query_merge` picks per plan).
`launch.Launcher` relaunches both with little host time. A strategy module holds its default
tiles (``CONFIGS``); how its partitions address tokens comes from the registry
(`deft.strategies`: listed slots or flattened runs). `radix` runs the `flash_decoding` kernel
through the real page table. `tuned` reads the chunk size, group size and tile tuned per card and
tree bucket (`buckets`) from the tables that ship in ``configs/``.
"""

from deft.kernels.interpreter_compat import apply_if_interpreted

apply_if_interpreted()  # before any kernel runs under an old interpreter

from deft.kernels import (  # noqa: E402
    deft_flatten,
    deft_node,
    deft_node_chunk,
    flash_decoding,
    tree_attention_s,
)
from deft.kernels.partials import TileConfig, pick_config  # noqa: E402
from deft.strategies import KERNEL_STRATEGIES, REGISTRY  # noqa: E402

_MODULES = {
    "flash_decoding": flash_decoding,
    "radix": flash_decoding,  # the same kernel, read through the real page table
    "tree_attention_s": tree_attention_s,
    "deft_node": deft_node,
    "deft_node_chunk": deft_node_chunk,
    "deft_flatten": deft_flatten,
}

KERNELS = {name: _MODULES[name] for name in KERNEL_STRATEGIES}
"""The kernel module of every strategy that runs in Triton (`deft.strategies` lists them)."""


def flat(strategy: str) -> bool:
    """Whether the strategy's partitions are runs of the flattened tree (else listed slots)."""
    return not REGISTRY[strategy].lists_slots


def tile_config(strategy: str, head_dim: int, group: int) -> TileConfig:
    """The default `TileConfig` of a strategy's kernel for a head dim and GQA ratio."""
    return pick_config(KERNELS[strategy].CONFIGS, head_dim, group)
