"""Tree Attention-M (Medusa): one tree = one dense masked attention by GEMMs, in memory.

One partition = one tree of the forest with all its queries and tokens. It is computed the
PyTorch way, as separate operations that each go through memory: a GEMM writes the score
matrix [q_heads, q(p), t(p)], a softmax reads it with a dense byte mask [q(p), t(p)] and writes
the probabilities, a second GEMM reads them and writes the output. No partials, no reduction.

Traffic: KV read once per tree, but ``mask_bytes`` = q(p) x t(p) and ``score_bytes`` =
4 x q(p) x t(p) x H_q x e (scores written and read, probabilities written and read), which grow
with queries x tokens; and a tree is one unit of work, however big.
"""

from __future__ import annotations

import torch

from reference.partials import Traffic, softmax_scale
from deft.plan import Plan, build_plan
from reference.tiles import ContiguousKV, compute_dtype, dense_mask, load_tiles, partition_batches, tile_rows

NAME = "tree_attention_m"


def plan(tree, chunk_size=None, group_size=None, page_size=1) -> Plan:
    """One partition per tree of the forest (chunk_size and group_size are refused)."""
    return build_plan(NAME, tree, chunk_size, group_size, page_size)


def materialised_attention(tiles, q_tile, k_tile, v_tile, visible, sm_scale, traffic):
    """Masked attention of whole partitions with the score matrix materialised in memory.

    Shapes as in `reference.partials.tile_partials`; returns the normalised output
    [B, kv_heads, rows, head_dim]. Padding rows (no real query) see nothing and come out NaN;
    they are never written to the output.
    """
    pairs = (tiles.loads.rows * tiles.loads.tokens).sum()
    matrix_bytes = int(pairs) * traffic.q_heads * traffic.element_bytes  # [q_heads, q(p), t(p)]
    scores = torch.matmul(q_tile, k_tile.transpose(-1, -2)) * sm_scale
    traffic.add("score_bytes", 2 * matrix_bytes)  # scores: written by the GEMM, read by the softmax
    probabilities = torch.softmax(scores.masked_fill_(~visible, -torch.inf), dim=-1)
    traffic.add("score_bytes", 2 * matrix_bytes)  # probabilities: written, read by the 2nd GEMM
    return torch.matmul(probabilities, v_tile)


def attention(tree, q, k, v, plan, sm_scale=None):
    """Tree Attention-M over `plan`; arguments and returns as `reference.attention`."""
    traffic = Traffic(plan)
    scale = softmax_scale(sm_scale, q.shape[-1])
    out = torch.zeros(q.shape, dtype=compute_dtype(q))
    batches = load_tiles(plan, partition_batches(plan), q, ContiguousKV(k, v), dense_mask, traffic)
    for batch, q_tile, k_tile, v_tile, visible in batches:
        o = materialised_attention(batch, q_tile, k_tile, v_tile, visible, scale, traffic)
        o, slot = tile_rows(batch, o)
        out[torch.from_numpy(plan.query_index[slot])] = o
        traffic.add("output_bytes", o.numel() * traffic.element_bytes)
    return out, traffic.as_dict()
