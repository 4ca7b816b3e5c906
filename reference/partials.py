"""Partial results, their log-sum-exp merge, the traffic counter, and the partitions' run.

A *partial result* of one query row (one query, one query head) over a set of tokens is

    m   = max_j s_j                      (max of the visible scores s_j = sm_scale q.k_j)
    l   = sum_j exp(s_j - m)             (sum of exponentials)
    o   = sum_j exp(s_j - m) v_j / l     (partial output, normalised)
    lse = m + log(l)                     (log-sum-exp of the scores)

and the convention throughout is the pair ``(o, lse)``: what a kernel stores is one fp32 row
of head_dim values and one fp32 log-sum-exp, the ``(d + 1) x 4`` bytes of docs/design.md's partial
rule. A row that sees none of the tokens has m = -inf, l = 0: it is ``o = 0, lse = -inf`` and
weighs nothing when merged, with no NaN. Two sets of partials merge by

    lse* = log sum_p exp(lse_p),    o* = sum_p exp(lse_p - lse*) o_p

(`merge_partials`), which serves twice: on chip, as a partition's program runs over its KV
blocks (the online softmax), and in memory, as the global reduction merges the partitions of
a query. `partition_partials` runs a plan's programs (their loads in `reference.tiles`);
`split_kv_attention` adds the global reduction.
"""

from __future__ import annotations

import numpy as np
import torch

from reference import tiles
from deft.plan import BYTE_KEYS, Plan
from reference.tiles import KVBlocks, compute_dtype, load_tiles, tile_rows

PARTIAL_BYTES = 4
"""Partials (row and log-sum-exp) are fp32 in a kernel whatever the input dtype."""


class Traffic:
    """Bytes and work of one strategy call, counted as its partitions touch the tensors.

    Element sizes follow docs/design.md "Bytes": Q, K, V, scores and the output count with the
    tree's ``attention.dtype`` (whatever dtype the reference computes in), partials with 4.

    Parameters
    ----------
    plan : Plan
        The partitions being run (sizes the per-partition work record).
    """

    def __init__(self, plan: Plan):
        attention = plan.tree.attention
        self.element_bytes = attention.element_bytes
        self.q_heads = attention.q_heads
        self.head_dim = attention.head_dim
        self.bytes = dict.fromkeys(BYTE_KEYS, 0)
        self.work = np.zeros(plan.num_partitions, dtype=np.int64)
        self.partitions = 0

    def add(self, key: str, nbytes) -> None:
        """Count `nbytes` more bytes under `key` (one of BYTE_KEYS)."""
        self.bytes[key] += int(nbytes)

    def add_work(self, started: int, partition: np.ndarray, pairs: np.ndarray) -> None:
        """Count `started` more partitions run, and visible pairs [...] of partitions [...]."""
        self.partitions += int(started)
        self.work += np.bincount(partition.ravel(), pairs.ravel(), len(self.work)).astype(np.int64)

    def add_partial_rows(self, rows: int) -> None:
        """Count `rows` partial rows (all query heads) moved through memory once."""
        self.add("partial_bytes", rows * self.q_heads * (self.head_dim + 1) * PARTIAL_BYTES)

    def as_dict(self) -> dict:
        """The traffic dict of `reference.attention` (integers, and the float mean work)."""
        return {
            **self.bytes,
            "partitions": self.partitions,
            "max_partition_work": int(self.work.max(initial=0)),
            "mean_partition_work": float(self.work.sum() / max(1, self.partitions)),
        }


def softmax_scale(sm_scale: float | None, head_dim: int) -> float:
    """`sm_scale`, or its default 1 / sqrt(head_dim)."""
    return head_dim**-0.5 if sm_scale is None else float(sm_scale)


def tile_partials(q_tile, k_tile, v_tile, visible, sm_scale: float):
    """Partial results of a batch of tiles.

    Parameters
    ----------
    q_tile : [B, kv_heads, rows, head_dim]
        Query rows; the GQA query heads of one KV head are packed into its rows.
    k_tile, v_tile : [B, kv_heads, T, head_dim]
    visible : bool [B, 1, rows, T]
        Whether each row sees each token (padding is invisible).
    sm_scale : float

    Returns
    -------
    o : [B, kv_heads, rows, head_dim]
        Normalised partial outputs (0 for a row that sees no token).
    lse : [B, kv_heads, rows]
        Log-sum-exp of the visible scores (-inf for a row that sees no token).
    """
    scores = torch.matmul(q_tile * sm_scale, k_tile.transpose(-1, -2))
    scores.masked_fill_(~visible, -torch.inf)
    m = scores.amax(dim=-1, keepdim=True)
    m.masked_fill_(m == -torch.inf, 0.0)  # a row seeing nothing: exp(-inf - 0) = 0, no NaN
    p = scores.sub_(m).exp_()
    l = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, v_tile).div_(torch.where(l > 0, l, torch.ones_like(l)))
    return o, m.add_(l.log()).squeeze(-1)


def merge_partials(acc_o, acc_lse, o, lse, index: np.ndarray) -> None:
    """Merge partial rows into accumulated partial rows by log-sum-exp, in place.

    Parameters
    ----------
    acc_o : [N, q_heads, head_dim], acc_lse : [N, q_heads]
        Accumulated partials (start: 0 and -inf); rows `index` are updated.
    o : [R, q_heads, head_dim], lse : [R, q_heads]
        Partial rows to merge in (lse -inf: merges nothing).
    index : int64 [R]
        The accumulated row each partial row merges into (repeats allowed).
    """
    touched, inverse = np.unique(index, return_inverse=True)
    if len(touched) == len(index):
        touched = index  # one row each: merge row by row
    else:
        o, lse = fold_partials(o, lse, inverse.ravel(), len(touched))
    rows = torch.from_numpy(touched)
    old_o, old_lse = acc_o[rows], acc_lse[rows]
    top = torch.maximum(old_lse, lse)
    top.masked_fill_(top == -torch.inf, 0.0)
    old_weight, weight = torch.exp(old_lse - top), torch.exp(lse - top)  # 0 where lse = -inf
    total = old_weight + weight
    merged = old_weight[..., None] * old_o + weight[..., None] * o
    acc_o[rows] = merged / torch.where(total > 0, total, torch.ones_like(total))[..., None]
    acc_lse[rows] = top + torch.log(total)


def fold_partials(o, lse, group: np.ndarray, groups: int):
    """Merge partial rows by log-sum-exp within each group.

    o [R, q_heads, head_dim], lse [R, q_heads], group int64 [R] in 0..groups-1;
    returns o [groups, q_heads, head_dim], lse [groups, q_heads] (0 and -inf for an empty group).
    """
    group = torch.from_numpy(group)
    top = torch.full((groups, lse.shape[1]), -torch.inf, dtype=lse.dtype)
    top = top.scatter_reduce(0, group[:, None].expand_as(lse), lse, "amax")
    top.masked_fill_(top == -torch.inf, 0.0)
    weight = torch.exp(lse - top[group])  # 0 for a row that saw nothing
    total = torch.zeros_like(top).index_add_(0, group, weight)
    folded = torch.zeros((groups, *o.shape[1:]), dtype=o.dtype).index_add_(0, group, weight[..., None] * o)
    return folded / torch.where(total > 0, total, torch.ones_like(total))[..., None], top + torch.log(total)


def partition_partials(plan: Plan, q, kv, mask, sm_scale, traffic: Traffic):
    """Every partition's partial result: one row per partition row (query of a partition).

    Each partition's program loads its queries, then runs over its KV blocks keeping the
    running (o, lse) on chip; nothing leaves the chip here.

    Parameters
    ----------
    plan : Plan
    q : [queries, q_heads, head_dim]
    kv : reference.tiles.ContiguousKV or PagedKV
        Where the programs load K and V from.
    mask : callable
        How a program gets visibility (`reference.tiles.causal_mask` or `bit_mask`).
    sm_scale : float or None
    traffic : Traffic

    Returns
    -------
    o : [sum q(p), q_heads, head_dim], lse : [sum q(p), q_heads]
        Row r is query ``plan.query_index[r]`` in its partition, in the compute dtype.
    """
    scale = softmax_scale(sm_scale, q.shape[-1])
    dtype = compute_dtype(q)
    o = torch.zeros((len(plan.query_index), *q.shape[1:]), dtype=dtype)
    lse = torch.full(o.shape[:2], -torch.inf, dtype=dtype)
    batches = KVBlocks(plan).batches()
    for batch, q_tile, k_tile, v_tile, visible in load_tiles(plan, batches, q, kv, mask, traffic):
        block_o, block_lse = tile_partials(q_tile, k_tile, v_tile, visible, scale)
        block_o, slot = tile_rows(batch, block_o)
        block_lse, _ = tile_rows(batch, block_lse[..., None])
        merge_partials(o, lse, block_o, block_lse[..., 0], slot)
    return o, lse


def split_kv_attention(plan: Plan, q, kv, mask, sm_scale=None):
    """Run a plan that splits a query's KV over several partitions, then reduce.

    Every partition writes the fp32 partials (o, lse) of its rows to memory; the global
    reduction reads them back and merges them per query by log-sum-exp.

    Parameters
    ----------
    plan, q, kv, mask, sm_scale
        As for `partition_partials`.

    Returns
    -------
    out : [queries, q_heads, head_dim] in the compute dtype
    traffic : dict
        `Traffic.as_dict`.
    """
    traffic = Traffic(plan)
    o, lse = partition_partials(plan, q, kv, mask, sm_scale, traffic)
    traffic.add_partial_rows(len(o))  # written by the partitions
    traffic.add_partial_rows(len(o))  # read back by the reduction
    out = torch.zeros((plan.tree.num_queries, *o.shape[1:]), dtype=o.dtype)
    out_lse = torch.full(out.shape[:2], -torch.inf, dtype=o.dtype)
    step = max(1, tiles.TILE_ELEMENTS // o[0].numel())  # the reduction, in batches too
    for lo in range(0, len(o), step):
        merge_partials(out, out_lse, o[lo : lo + step], lse[lo : lo + step], plan.query_index[lo : lo + step])
    traffic.add("output_bytes", out.numel() * traffic.element_bytes)
    return out, traffic.as_dict()
