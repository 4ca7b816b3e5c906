"""Flash-Decoding: Q-guided, each query's path split into chunks of KV.

One partition = one query x one chunk of ``chunk_size`` tokens of its path (root first, the
last chunk shorter). Each partition writes fp32 partials (o, lse); a global log-sum-exp
reduction merges a query's chunks. Visibility is position arithmetic (no mask bytes).

Traffic: like Flash-Attention, a prefix shared by n queries is read n times (redundant KV);
the split buys parallelism at the price of ``2 x (d + 1) x 4`` partial bytes per query head
and chunk.
"""

from __future__ import annotations

from reference.partials import split_kv_attention
from deft.plan import Plan, build_plan
from reference.tiles import ContiguousKV, causal_mask

NAME = "flash_decoding"


def plan(tree, chunk_size=None, group_size=None, page_size=1) -> Plan:
    """One partition per query and chunk of its path (chunk_size default 128)."""
    return build_plan(NAME, tree, chunk_size, group_size, page_size)


def attention(tree, q, k, v, plan, sm_scale=None):
    """Flash-Decoding over `plan`; arguments and returns as `reference.attention`."""
    return split_kv_attention(plan, q, ContiguousKV(k, v), causal_mask, sm_scale)
