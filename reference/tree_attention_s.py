"""Tree Attention-S (SpecInfer): Q-guided over the whole tree, split by blocks, bit mask.

One partition = one query x one chunk of ``chunk_size`` tokens of its whole tree in flattened
(DFS preorder) order. The chunk holds tokens the query does not see (siblings' branches), so
visibility comes from a bit mask: one 64-bit word per token (one query per partition). A chunk
the query sees none of is fully masked: its partial has lse = -inf and weighs nothing in the
log-sum-exp reduction.

Traffic: every query reads its whole tree, seen or not (redundant KV, more than
Flash-Decoding), plus ``t(p) x 8`` mask bytes and the partials of every chunk.
"""

from __future__ import annotations

from reference.partials import split_kv_attention
from deft.plan import Plan, build_plan
from reference.tiles import ContiguousKV, bit_mask

NAME = "tree_attention_s"


def plan(tree, chunk_size=None, group_size=None, page_size=1) -> Plan:
    """One partition per query and chunk of its flattened tree (chunk_size default 128)."""
    return build_plan(NAME, tree, chunk_size, group_size, page_size)


def attention(tree, q, k, v, plan, sm_scale=None):
    """Tree Attention-S over `plan`; arguments and returns as `reference.attention`."""
    return split_kv_attention(plan, q, ContiguousKV(k, v), bit_mask, sm_scale)
