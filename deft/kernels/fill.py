"""The chunk size that fills the machine, where no tuned table applies.

The partials kernels run a persistent grid of SMs x `PROGRAMS_PER_SM` programs over
partitions x kv_heads work items. With fewer items than programs the rest of the GPU idles:
the 32/8-head choices give 24 to 86 work items at 4/1 heads, for 264 programs on an H200. So
the ``fill`` rung of `deft.kernels.tuned` picks the largest chunk whose work items reach the
programs, never below 64 tokens.
"""

from __future__ import annotations

import functools

import torch

from deft.tree import Tree

PROGRAMS_PER_SM = 2
"""Resident programs per SM of the persistent partials kernels (the Gluon kernel's
``CTAS_PER_SM`` on sm_90, the default tile's ``programs_per_sm`` elsewhere)."""

FILL_CHUNKS = (4096, 2048, 1024, 512, 256, 128, 64)
"""Chunk sizes `fill_chunk` chooses from, largest first; 64 is the least (smaller chunks cost
more in partials than the idle SMs they would fill)."""

KV_GUIDED = ("deft_flatten", "deft_node_chunk")
"""Chunked strategies that split the tree's unique tokens (the others split each query's
path, tree_attention_s the whole tree per query)."""


def split_tokens(strategy: str, tree: Tree) -> int:
    """The tokens a chunked strategy splits into chunks: unique tokens (KV-guided), the whole
    tree per query (tree_attention_s), or the visible tokens summed over queries."""
    if strategy in KV_GUIDED:
        return tree.num_tokens
    if strategy == "tree_attention_s":
        return tree.num_tokens * tree.num_queries
    return int(tree.visible_tokens.sum())


def work_items(strategy: str, tree: Tree, chunk: int) -> int:
    """Estimated work items of `strategy` on `tree` at `chunk`: ceil(tokens / chunk) x kv_heads
    (`split_tokens`; node boundaries only add partitions)."""
    return -(-max(1, split_tokens(strategy, tree)) // chunk) * tree.attention.kv_heads


def fill_chunk(strategy: str, tree: Tree, programs: int) -> int:
    """The largest chunk of `FILL_CHUNKS` whose `work_items` reach `programs`, else the least
    (the tree is too small to fill the machine)."""
    return next((chunk for chunk in FILL_CHUNKS if work_items(strategy, tree, chunk) >= programs),
                FILL_CHUNKS[-1])


@functools.lru_cache(maxsize=16)
def resident_programs(device: torch.device) -> int:
    """SMs of a CUDA device (read from the device) x `PROGRAMS_PER_SM`."""
    index = torch.cuda.current_device() if device.index is None else device.index
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(index).multi_processor_count
