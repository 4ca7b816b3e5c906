"""DeFT-Flatten: the flattened tree KV cut into even blocks, KV-guided groups, bit mask.

One partition = one block of ``chunk_size`` consecutive tokens of the forest in flattened (DFS
preorder) order x one group of the queries that see any of its tokens. A block may span
several nodes, so a query of the group need not see all of it (a sibling's branch, a node
below it): visibility comes from a bit mask, one 64-bit word per token and 64 queries. Paged
KV, log-sum-exp reduction.

Traffic: each block's KV read once per group, every partition the same size (balanced), at
the cost of redundant Q, partials, ``t(p) x ceil(q(p) / 64) x 8`` mask bytes and the page
table.
"""

from __future__ import annotations

from reference.partials import split_kv_attention
from deft.plan import Plan, build_plan
from reference.tiles import PagedKV, bit_mask

NAME = "deft_flatten"


def plan(tree, chunk_size=None, group_size=None, page_size=1) -> Plan:
    """One partition per flattened block and query group (chunk_size default 128)."""
    return build_plan(NAME, tree, chunk_size, group_size, page_size)


def attention(tree, q, k, v, plan, sm_scale=None):
    """DeFT-Flatten over `plan`; arguments and returns as `reference.attention`."""
    return split_kv_attention(plan, q, PagedKV(tree, k, v, plan.page_size), bit_mask, sm_scale)
