"""DeFT-Node: KV-guided grouping by node.

One partition = one node's whole KV x one group of the queries that see it (query order, at
most ``group_size`` queries; None: all of them). Every query of a group sees the whole node,
except the causal tail of its own node (position arithmetic, no mask). Partials of a query's
nodes are merged by the log-sum-exp reduction. KV is read through the paged cache.

Traffic: each node's KV is read once per group (once, uncapped), instead of once per query;
the redundancy moves to Q (a query is loaded once per node on its path) and to the partials.
Node sizes differ, so the work per partition is unbalanced (a 4000-token root vs 1-token leaves).
"""

from __future__ import annotations

from reference.partials import split_kv_attention
from deft.plan import Plan, build_plan
from reference.tiles import PagedKV, causal_mask

NAME = "deft_node"


def plan(tree, chunk_size=None, group_size=None, page_size=1) -> Plan:
    """One partition per node and query group (chunk_size refused; group_size default None)."""
    return build_plan(NAME, tree, chunk_size, group_size, page_size)


def attention(tree, q, k, v, plan, sm_scale=None):
    """DeFT-Node over `plan`; arguments and returns as `reference.attention`."""
    return split_kv_attention(plan, q, PagedKV(tree, k, v, plan.page_size), causal_mask, sm_scale)
