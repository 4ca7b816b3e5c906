"""Radix Attention (SGLang): Flash-Decoding over a paged KV cache.

Partitions as Flash-Decoding (one query x one chunk of its path), but each program reads its
tokens through the query's page table: one int32 entry per distinct page per KV-head program.
Every node starts on a fresh page, so a chunk's pages are the pages of its node segments.

Traffic: Flash-Decoding's (redundant KV of shared prefixes, partials) plus ``index_bytes`` =
pages(p) x H_kv x 4 per partition; with page size 1, one entry per token read.
"""

from __future__ import annotations

from reference.partials import split_kv_attention
from deft.plan import Plan, build_plan
from reference.tiles import PagedKV, causal_mask

NAME = "radix"


def plan(tree, chunk_size=None, group_size=None, page_size=1) -> Plan:
    """One partition per query and chunk of its path (chunk_size default 128), paged."""
    return build_plan(NAME, tree, chunk_size, group_size, page_size)


def attention(tree, q, k, v, plan, sm_scale=None):
    """Radix Attention over `plan`; arguments and returns as `reference.attention`."""
    return split_kv_attention(plan, q, PagedKV(tree, k, v, plan.page_size), causal_mask, sm_scale)
