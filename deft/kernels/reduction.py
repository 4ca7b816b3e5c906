"""The global reduction: each query's partial results merged by log-sum-exp, deterministically.

For query n and head h, with partial rows e of n in ascending order (the planner groups a
query's rows, in partition order: a fixed order, so the result is bit-identical from run to
run; no atomics):

    lse* = log sum_e exp(lse_e),    out = sum_e exp(lse_e - lse*) o_e.

One program per (query row, query head) loops over the query's entries BLOCK_E at a time,
keeping a running max, so a query with thousands of entries (a chain thousands of nodes deep
under deft_node) costs no more registers than one with two. Rows past the plan's query count (a
padded `q` under a CUDA graph) get out = 0 and lse = -inf, so every output element is written.

`merge_states` is the same merge for two states in PyTorch (cascade-style composition).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deft.kernels.launch import Launcher

BLOCK_E = 16
"""Partial rows merged per loop step."""


@triton.jit
def _merge_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, lse_ptr,
    counts_ptr, query_row_ptr,
    stride_on, stride_oh, stride_ln, stride_lh,
    Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_E: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    query = tl.program_id(0)
    head = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    real = query < tl.load(counts_ptr + 1)
    lo = tl.load(query_row_ptr + query, mask=real, other=0)
    hi = tl.load(query_row_ptr + query + 1, mask=real, other=0)
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for row0 in range(lo, hi, BLOCK_E):
        part_row = row0 + tl.arange(0, BLOCK_E)
        ok = part_row < hi
        row = part_row.to(tl.int64) * Q_HEADS + head
        lse = tl.load(lse_part_ptr + row, mask=ok, other=float("-inf"))
        o = tl.load(o_part_ptr + row[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None],
                    other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet
        weight = tl.exp(lse - m_safe)
        scale = tl.exp(m - m_safe)
        acc = acc * scale + tl.sum(weight[:, None] * o, 0)
        total = total * scale + tl.sum(weight, 0)
        m = m_new
    seen = total > 0
    total_safe = tl.where(seen, total, 1.0)
    out_row = query.to(tl.int64) * stride_on + head * stride_oh
    tl.store(out_ptr + out_row + dims, (acc / total_safe).to(out_ptr.dtype.element_ty))
    if STORE_LSE:
        lse_out = tl.where(seen, m + tl.log(total_safe), float("-inf"))
        tl.store(lse_ptr + query.to(tl.int64) * stride_ln + head * stride_lh, lse_out)


_LAUNCH_MERGE = Launcher(_merge_kernel)


def merge(o_part, lse_part, buffers, out, lse=None) -> None:
    """Launch `_merge_kernel`: write every row of `out` (and `lse`) from the partials.

    Parameters
    ----------
    o_part : fp32 [max_entries, q_heads, head_dim], contiguous
    lse_part : fp32 [max_entries, q_heads], contiguous
    buffers : dict of str to int32 tensors
        The plan's device buffers (`deft.planner.PlanBuffers.views`).
    out : [rows, q_heads, head_dim] (head_dim contiguous; rows >= the plan's queries)
    lse : fp32 [rows, q_heads], optional
        Natural-log log-sum-exp of each output row.
    """
    rows, q_heads, head_dim = out.shape
    _LAUNCH_MERGE((rows, q_heads),
        o_part, lse_part, out, out if lse is None else lse,
        buffers["counts"], buffers["query_row_ptr"],
        out.stride(0), out.stride(1),
        0 if lse is None else lse.stride(0), 0 if lse is None else lse.stride(1),
        Q_HEADS=q_heads, HEAD_DIM=head_dim, BLOCK_E=BLOCK_E, STORE_LSE=lse is not None,
        num_warps=1 if head_dim <= 64 else 2,
    )


def merge_states(o_a, lse_a, o_b, lse_b):
    """Merge two attention states over disjoint KV sets (PyTorch, any device).

    Parameters
    ----------
    o_a, o_b : [..., heads, head_dim]
        Normalised outputs over KV sets A and B.
    lse_a, lse_b : fp32 [..., heads]
        Their natural-log log-sum-exp (-inf where a set saw nothing).

    Returns
    -------
    o : [..., heads, head_dim] in o_a's dtype
        The output over A and B together.
    lse : fp32 [..., heads]
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    seen = total > 0
    total_safe = torch.where(seen, total, torch.ones_like(total))
    o = (o_a.float() * w_a[..., None] + o_b.float() * w_b[..., None]) / total_safe[..., None]
    lse = torch.where(seen, m + torch.log(total_safe), torch.full_like(m, -torch.inf))
    return o.to(o_a.dtype), lse
