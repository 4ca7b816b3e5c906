"""Flash-Attention: Q-guided, one program per query over its whole path, no KV split.

One partition = one query and every token it sees, root first. The program runs over its KV
blocks with the softmax on chip and writes the normalised output directly: no partials, no
reduction, no mask (the only masking is the causal tail of the query's own node, by position
arithmetic).

Traffic: every query reads its whole path, so a prefix shared by n queries is read n times
(``kv_bytes`` = sum of visible tokens x 2 x H_kv x d x e). One program per query also balances
badly: a query with a long path is one long program.
"""

from __future__ import annotations

import torch

from reference.partials import Traffic, partition_partials
from deft.plan import Plan, build_plan
from reference.tiles import ContiguousKV, causal_mask

NAME = "flash_attention"


def plan(tree, chunk_size=None, group_size=None, page_size=1) -> Plan:
    """One partition per query (chunk_size and group_size are refused)."""
    return build_plan(NAME, tree, chunk_size, group_size, page_size)


def attention(tree, q, k, v, plan, sm_scale=None):
    """Flash-Attention over `plan`; arguments and returns as `reference.attention`."""
    traffic = Traffic(plan)
    o, _ = partition_partials(plan, q, ContiguousKV(k, v), causal_mask, sm_scale, traffic)
    out = torch.empty_like(o)
    out[torch.from_numpy(plan.query_index)] = o  # each query's only partition: already normalised
    traffic.add("output_bytes", out.numel() * traffic.element_bytes)
    return out, traffic.as_dict()
