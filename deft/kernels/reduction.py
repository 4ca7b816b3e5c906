"""The global reduction: each query's partial results merged by log-sum-exp, deterministically.

For query n and head h, with partial rows e of n in ascending order (the planner groups a
query's rows, in partition order: a fixed order, so the result is bit-identical from run to
run; no atomics):

    lse* = log sum_e exp(lse_e),    out = sum_e exp(lse_e - lse*) o_e.

One program per (query row, query head) loops over the query's entries a row block at a time
(`merge_block`: as many as the plan's queries have, 16 to 64), keeping a running max, so a
query with thousands of entries (a chain thousands of nodes deep under deft_node) costs no
more registers than one with 64. Where many queries have few rows
each, `_merge_query_kernel` (one program per query, all heads, row by row) moves the same bytes
in far fewer, larger loads (`per_query_merge` decides, per plan). Rows past the plan's query
count (a padded `q` under a CUDA graph) get out = 0 and lse = -inf, so every output element is
written.

After the Hopper Gluon partials kernel the merge is a programmatic dependent launch (PDL,
sm_90+): launched with ``launch_pdl`` it may start while the partials kernel is still running,
so its launch latency and ramp leave the critical path; after it reads its row ranges from
the plan buffers (`_row_range`), ``griddepcontrol.wait`` (`WAIT_FOR_PRIOR_GRID`) holds it until
the partials kernel has completed and its writes are visible. Without ``launch_pdl`` that wait
returns at once, so the result never depends on it. `PDL_MERGE` switches it off for A/B timing.

`merge_states` is the same merge for two states in PyTorch (cascade-style composition).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from deft.kernels.launch import Launcher

BLOCK_E = 16
"""The per-head merge's least row block: partial rows merged per loop step where queries have
at most this many rows (`merge_block`)."""

MAX_BLOCK_E = 64
"""The per-head merge's largest row block (a query with more rows loops over blocks of it)."""

PDL_MERGE = os.environ.get("DEFT_PDL_MERGE", "1") != "0"
"""Whether `merge(dependent_launch=True)` launches the merge as a programmatic dependent of the
kernel before it (read once from ``DEFT_PDL_MERGE``, "0" for off; default on). A
`TreeAttention` captures its launches in CUDA graphs, so change it before its first `run`."""


@triton.jit
def _row_range(counts_ptr, query_rows_ptr, query):
    """``[lo, hi)``, the partial rows of output row ``query`` (empty past the plan's queries).

    The three loads are independent, so they are in flight together (``query < rows <=
    max_queries``: within the buffer, whatever the plan), and they read the plan buffers, which
    were uploaded before the partials kernel ran: a merge launched as its programmatic
    dependent issues them before ``griddepcontrol.wait``, so only the partial rows' loads wait
    for the partials kernel to end."""
    real = query < tl.load(counts_ptr + 1)
    lo = tl.load(query_rows_ptr + 2 * query)
    hi = tl.load(query_rows_ptr + 2 * query + 1)
    return tl.where(real, lo, 0), tl.where(real, hi, 0)


@triton.jit
def _merge_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, lse_ptr,
    counts_ptr, query_rows_ptr,
    stride_on, stride_oh, stride_ln, stride_lh,
    Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_E: tl.constexpr,
    STORE_LSE: tl.constexpr, WAIT_FOR_PRIOR_GRID: tl.constexpr,
):
    query = tl.program_id(0)
    head = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    lo, hi = _row_range(counts_ptr, query_rows_ptr, query)
    if WAIT_FOR_PRIOR_GRID:  # launched as a programmatic dependent: the partials are not done
        gdc_wait()
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


@triton.jit
def _merge_query_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, lse_ptr,
    counts_ptr, query_rows_ptr,
    stride_on, stride_oh, stride_ln, stride_lh,
    Q_HEADS: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    STORE_LSE: tl.constexpr, WAIT_FOR_PRIOR_GRID: tl.constexpr,
):
    """One program per query, all its heads at once ([HEADS, HEAD_DIM] per partial row,
    HEADS = Q_HEADS padded to a power of two): fewer, larger loads than one program per head."""
    query = tl.program_id(0)
    heads = tl.arange(0, HEADS)
    head_ok = heads < Q_HEADS
    dims = tl.arange(0, HEAD_DIM)
    lo, hi = _row_range(counts_ptr, query_rows_ptr, query)
    if WAIT_FOR_PRIOR_GRID:
        gdc_wait()
    m = tl.full([HEADS], float("-inf"), tl.float32)
    total = tl.zeros([HEADS], tl.float32)
    acc = tl.zeros([HEADS, HEAD_DIM], tl.float32)
    for row in range(lo, hi):
        rows = tl.cast(row, tl.int64) * Q_HEADS + heads
        lse = tl.load(lse_part_ptr + rows, mask=head_ok, other=float("-inf"))
        o = tl.load(o_part_ptr + rows[:, None] * HEAD_DIM + dims[None, :],
                    mask=head_ok[:, None], other=0.0)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet
        weight = tl.exp(lse - m_safe)
        scale = tl.exp(m - m_safe)
        acc = acc * scale[:, None] + weight[:, None] * o
        total = total * scale + weight
        m = m_new
    seen = total > 0
    total_safe = tl.where(seen, total, 1.0)
    out_rows = query.to(tl.int64) * stride_on + heads * stride_oh
    tl.store(out_ptr + out_rows[:, None] + dims[None, :],
             (acc / total_safe[:, None]).to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    if STORE_LSE:
        tl.store(lse_ptr + query.to(tl.int64) * stride_ln + heads * stride_lh,
                 tl.where(seen, m + tl.log(total_safe), float("-inf")), mask=head_ok)


_LAUNCH_MERGE = Launcher(_merge_kernel)
_LAUNCH_MERGE_QUERY = Launcher(_merge_query_kernel)
PER_QUERY_MAX_ROWS = 4
"""`per_query_merge` takes `_merge_query_kernel` where queries have at most this many partial rows
on average (and fill the SMs): measured on an H100 (scripts/perf_flatten.py, with a temporary
switch forcing one merge kernel or the other), spec_t256 (255 queries, 3 rows each) merged in
5.0 us instead of 11.9, while queries with 9 to 20 rows (fewshot, long) merged 3 to 3.5x slower
one query per program."""


def merge_block(most_rows: int) -> int:
    """The per-head merge's row block for a plan whose queries have at most `most_rows`
    partial rows: the least power of two that holds them, from `BLOCK_E` to `MAX_BLOCK_E`, so
    that a query takes one loop step. Merged by ``block x head_dim / 1024`` warps (32 values
    of the [block, head_dim] tile a thread).

    Measured on an H200 (docs/performance.md, session 9, `scripts/kernel_split.py
    --merge-blocks`): on the 11 anchor cells of the per-head merge at 32/8 and 4/1, this block
    was the fastest of 16, 32 and 64 on all but long_P20000 at 4/1 (55 rows: 64 and 32 within
    0.1%), 1.5-1.8 us a call faster than 16 on fewshot_b20 and long_P20000 at 4/1; a larger
    one cost up to 22 us where many programs each have few rows."""
    block = BLOCK_E
    while block < min(most_rows, MAX_BLOCK_E):
        block *= 2
    return block


def per_query_merge(num_queries: int, num_rows: int, sm_count: int) -> bool:
    """Whether a plan's merge runs one program per query (else one per query head)."""
    return num_queries >= sm_count and num_rows <= PER_QUERY_MAX_ROWS * num_queries


@functools.cache
def _supports_pdl(device: torch.device) -> bool:
    """Whether ``device`` runs programmatic dependent launches: CUDA, compute capability >= 9."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def merge(o_part, lse_part, buffers, out, lse=None, per_query=False,
          dependent_launch=False, block=BLOCK_E) -> None:
    """Launch `_merge_kernel` (or, with `per_query`, `_merge_query_kernel`): write every row of
    `out` (and `lse`) from the partials.

    Parameters
    ----------
    o_part : fp32 [max_entries, q_heads, head_dim], contiguous
    lse_part : fp32 [max_entries, q_heads], contiguous
    buffers : dict of str to int32 tensors
        The plan's device buffers (`deft.plan_buffers.PlanBuffers.views`).
    out : [rows, q_heads, head_dim] (head_dim contiguous; rows >= the plan's queries)
    lse : fp32 [rows, q_heads], optional
        Natural-log log-sum-exp of each output row.
    per_query : bool
        One program per query, all heads (`per_query_merge`), else one per (query, head).
    dependent_launch : bool
        Launch as a programmatic dependent of the kernel before it on the stream, which wrote
        the partials (done where `PDL_MERGE` is set, the device is CUDA of compute capability
        >= 9 and the kernels are compiled, not interpreted).
    block : int
        The per-head merge's row block (a power of two; `merge_block`).
    """
    rows, q_heads, head_dim = out.shape
    pdl = (dependent_launch and PDL_MERGE and not _LAUNCH_MERGE.interpreted
           and _supports_pdl(out.device))
    launch = dict(STORE_LSE=lse is not None, WAIT_FOR_PRIOR_GRID=pdl)
    if pdl:  # a compile option of the CUDA backend: the compiled kernel launches with it
        launch["launch_pdl"] = True
    args = (o_part, lse_part, out, out if lse is None else lse,
            buffers["counts"], buffers["query_rows"],
            out.stride(0), out.stride(1),
            0 if lse is None else lse.stride(0), 0 if lse is None else lse.stride(1))
    if per_query:
        _LAUNCH_MERGE_QUERY((rows,), *args, Q_HEADS=q_heads,
                            HEADS=triton.next_power_of_2(q_heads), HEAD_DIM=head_dim,
                            num_warps=4, num_stages=3, **launch)
    else:
        _LAUNCH_MERGE((rows, q_heads), *args, Q_HEADS=q_heads, HEAD_DIM=head_dim,
                      BLOCK_E=block, num_warps=max(1, block * head_dim // 1024), **launch)


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
