"""The chunk and group size that fill the machine, where no tuned table applies.

The partials kernels run a persistent grid of SMs x `PROGRAMS_PER_SM` programs over
partitions x kv_heads work items. With fewer items than programs the rest of the GPU idles:
the 32/8-head choices give 24 to 86 work items at 4/1 heads, for 264 programs on an H200. So
the ``fill`` rung of `deft.kernels.tuned` picks the largest chunk whose work items reach the
programs, never below 64 tokens, and caps a partition's queries at one query tile of rows
(`fill_group`): on an H200 every tuned bucket but few chose a group cap, and without one the
fill rung ran a 256-query forest 2.2-3.1x slower than the best chunk x group (autotune
held-out run of 2026-12-01, docs/autotune.md). For deft_flatten the lookup then moves the fill
chunk, like a table's, to the one whose items run in the fewest, shortest waves
(`deft.kernels.waves`).
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

TILE_ROWS = 64
"""Query rows of one tile of the partials kernels (``BLOCK_M`` of the Gluon kernel and of the
Triton kernel's default tiles): a partition's query group fills it at `fill_group` queries."""

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
    return tree.visible_token_sum


def work_items(strategy: str, tree: Tree, chunk: int) -> int:
    """Estimated work items of `strategy` on `tree` at `chunk`: ceil(tokens / chunk) x kv_heads
    (`split_tokens`; node boundaries only add partitions)."""
    return -(-max(1, split_tokens(strategy, tree)) // chunk) * tree.attention.kv_heads


def fill_chunk(strategy: str, tree: Tree, programs: int) -> int:
    """The largest chunk of `FILL_CHUNKS` whose `work_items` reach `programs`, else the least
    (the tree is too small to fill the machine)."""
    return next((chunk for chunk in FILL_CHUNKS if work_items(strategy, tree, chunk) >= programs),
                FILL_CHUNKS[-1])


def resident_programs(device: torch.device) -> int:
    """SMs of a CUDA device (`multiprocessors`) x `PROGRAMS_PER_SM`."""
    return PROGRAMS_PER_SM * multiprocessors(device)


@functools.lru_cache(maxsize=16)
def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device, read from it once (torch's device query costs microseconds of
    host time, and a plan asks)."""
    index = torch.cuda.current_device() if device.index is None else device.index
    return torch.cuda.get_device_properties(index).multi_processor_count


def fill_group(tree: Tree) -> int:
    """The group size (queries per partition group) whose rows fill one query tile:
    `TILE_ROWS` // query heads per KV head, at least 1."""
    shape = tree.attention
    return max(1, TILE_ROWS // max(1, shape.q_heads // shape.kv_heads))
