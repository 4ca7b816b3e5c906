"""DeFT-Node-Chunk: KV-guided grouping by node, each node then split into chunks.

One partition = one chunk of ``chunk_size`` tokens of one node x one group of the queries that
see any of it. A chunk never spans two nodes, so every query of the group sees all of it but
its own node's causal tail (position arithmetic, no mask). Paged KV, log-sum-exp reduction.

Traffic: DeFT-Node's (each chunk's KV read once per group, redundant Q and partials), with
partitions of at most ``chunk_size`` tokens: better balance, more partials. Short nodes still
make short partitions (a 1-token node is a 1-token partition).
"""

from __future__ import annotations

from reference.partials import split_kv_attention
from deft.plan import Plan, build_plan
from reference.tiles import PagedKV, causal_mask

NAME = "deft_node_chunk"


def plan(tree, chunk_size=None, group_size=None, page_size=1) -> Plan:
    """One partition per node chunk and query group (chunk_size default 128)."""
    return build_plan(NAME, tree, chunk_size, group_size, page_size)


def attention(tree, q, k, v, plan, sm_scale=None):
    """DeFT-Node-Chunk over `plan`; arguments and returns as `reference.attention`."""
    return split_kv_attention(plan, q, PagedKV(tree, k, v, plan.page_size), causal_mask, sm_scale)
