"""The merge fused into the Hopper Gluon partials kernel (``FUSED_MERGE``, a variant, issue #15).

`deft.kernels.reduction` merges each query's partial rows in a second kernel. With
``deft_flatten_sm90.FUSED_MERGE`` the partials kernel does it itself, so one launch (and no
dependency wait) serves a call: each (query, query head) has an int32 arrival counter in a
workspace of zeros (``max_queries x q_heads``, allocated beside the partial-result workspace,
`arrival_counters`). After the consumer warpgroup stores a query tile's partial rows it

1. makes them visible: a barrier over the consumer's 128 threads, then each real row's
   counter is incremented by one thread with ``atom.add.acq_rel.gpu``. The barrier orders every
   consumer thread's stores before the atomic at CTA scope, and the atomic's release part is
   cumulative, so whoever acquires the counter sees all of them (the pattern of a grid barrier:
   ``bar.sync``, then a release by one thread);
2. finds the rows whose increment completed their query's count (the query's partial rows,
   ``query_row_ptr[q + 1] - query_row_ptr[q]``: every query has at least one, as every query
   sees its own token). The atomic runs on a ``[BLOCK_M, 2]`` layout that gives every element to
   exactly one thread (column 0 is the row's counter, column 1 masked off), so the returned old
   value reaches the thread that uses it: Triton's lowering predicates an atomic to one thread
   of each group that holds the same element ("redundant thread predicate"), and only that
   thread's register receives the result; here no element is held twice. The "done" flag is
   then a reduction over the two columns, which every thread holding the row receives. The last
   arriver resets the counter to 0, so the workspace is zeros again for the next call (CUDA
   graph replays included);
3. after a second barrier (the acquire of step 1 was made by the atomic's threads; the barrier
   orders the other threads' loads after it, as a grid barrier's waiters read after
   ``bar.sync``), merges the done rows' partial rows in ascending order with the arithmetic of
   `deft.kernels.reduction._merge_query_kernel` (row by row, running max, ``exp``/``log``), all
   done rows of the tile at once: a loop over j < the most rows of a done query, masked loads
   (``ld.global.cg``: from L2, never a line this SM's L1 holds from before), and writes out
   (and lse).

Rows of ``out`` past the plan's queries get out = 0 and lse = -inf from `_pad_rows`, which
each CTA's consumer runs on entry (grid-stride; no rows at all outside a padded CUDA graph).
"""

from __future__ import annotations

import torch

from deft.kernels import gluon_compat as gc


def arrival_counters(max_queries: int, q_heads: int, device) -> torch.Tensor:
    """The fused merge's arrival counters: int32 zeros [max_queries * q_heads]. The kernel
    leaves them zero after every call (the last arriver of a row resets it)."""
    return torch.zeros(max_queries * q_heads, dtype=torch.int32, device=device)


def counters_fit(arrivals, rows: int, q_heads: int) -> bool:
    """Whether ``arrivals`` (or None) holds a counter for every (row, head) of an output of
    ``rows`` rows: what the fused merge needs (queries <= rows)."""
    return (arrivals is not None and arrivals.dtype == torch.int32
            and arrivals.is_contiguous() and arrivals.numel() >= rows * q_heads)


if gc.HAS_GLUON:
    gluon, gl = gc.gluon, gc.gl
    cta_barrier = gc.cta_barrier

    @gluon.jit
    def _pad_rows(out_ptr, lse_out_ptr, counts_ptr, num_rows,
                  stride_on, stride_oh, stride_ln, stride_lh,
                  Q_HEADS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                  STORE_LSE: gl.constexpr, WARPS: gl.constexpr):
        """out = 0 (and lse = -inf) on the rows of ``out`` past the plan's queries, BLOCK_M
        (row, head) pairs at a time, grid-strided over the CTAs."""
        layout: gl.constexpr = gl.BlockedLayout([1, 4], [128 // HEAD_DIM, HEAD_DIM // 4],
                                                [WARPS, 1], [1, 0])
        first = gl.load(counts_ptr + 1)
        pairs = (num_rows - first) * Q_HEADS
        index = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
        zeros = gl.zeros([BLOCK_M, HEAD_DIM], out_ptr.dtype.element_ty, layout)
        for p0 in range(gl.program_id(0) * BLOCK_M, pairs, gl.num_programs(0) * BLOCK_M):
            pair = p0 + index
            ok = pair < pairs
            row = (first + pair // Q_HEADS).to(gl.int64)
            head = pair % Q_HEADS
            gl.store(out_ptr + (row * stride_on + head * stride_oh)[:, None] + dims[None, :],
                     zeros, mask=ok[:, None])
            if STORE_LSE:
                gl.store(lse_out_ptr + row * stride_ln + head * stride_lh,
                         gl.full([BLOCK_M], float("-inf"), gl.float32,
                                 gl.SliceLayout(1, layout)), mask=ok)

    @gluon.jit
    def _arrive_and_merge(o_part_ptr, lse_part_ptr, out_ptr, lse_out_ptr, arrivals_ptr,
                          query, lo, hi, row_ok, head,
                          stride_on, stride_oh, stride_ln, stride_lh,
                          Q_HEADS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                          MERGE_COLS: gl.constexpr, STORE_LSE: gl.constexpr,
                          WARPS: gl.constexpr):
        """Count a query tile's stored partial rows in and merge the (query, head)s it
        completes (module docstring). ``query``, ``lo``, ``hi`` (its rows' query_row_ptr run),
        ``row_ok`` (a real row) and ``head`` (query head): [BLOCK_M], any layout."""
        gl.static_assert(BLOCK_M == 16 * WARPS, "the arrival layout covers 16 rows per warp")
        # one thread per element: rows over 16 lanes x WARPS warps, the two columns over lane
        # pairs (column 1 only pads the tensor to one element per thread)
        arrive_layout: gl.constexpr = gl.BlockedLayout([1, 1], [16, 2], [WARPS, 1], [1, 0])
        a_rows: gl.constexpr = gl.SliceLayout(1, arrive_layout)
        column = gl.arange(0, 2, layout=gl.SliceLayout(0, arrive_layout))
        a_ok = gl.convert_layout(row_ok, a_rows)
        a_count = gl.convert_layout(hi - lo, a_rows)
        counter = arrivals_ptr + (gl.convert_layout(query, a_rows) * Q_HEADS
                                  + gl.convert_layout(head, a_rows))
        counters = counter[:, None] + column[None, :] * 0
        mine = a_ok[:, None] & (column[None, :] == 0)
        cta_barrier()  # every consumer thread's partial-row stores precede the release below
        old = gl.atomic_add(counters, gl.full([BLOCK_M, 2], 1, gl.int32, arrive_layout),
                            mask=mine, sem="acq_rel", scope="gpu")
        last = mine & (old + 1 == a_count[:, None])
        gl.store(counters, gl.zeros([BLOCK_M, 2], gl.int32, arrive_layout), mask=last)
        done = gl.max(last.to(gl.int32), 1)  # a reduction: every thread holding a row has it
        cta_barrier()  # the loads below come after the acquiring atomics

        # the merge, MERGE_COLS columns at a time (acc and one loaded tile of
        # [BLOCK_M, MERGE_COLS] fit the consumer's registers, the whole head_dim does not)
        merge_layout: gl.constexpr = gl.BlockedLayout(
            [1, 4], [128 // MERGE_COLS, MERGE_COLS // 4], [WARPS, 1], [1, 0])
        m_rows: gl.constexpr = gl.SliceLayout(1, merge_layout)
        m_done = gl.convert_layout(done, m_rows) > 0
        m_lo = gl.convert_layout(lo, m_rows)
        count = gl.convert_layout(hi, m_rows) - m_lo
        rows = gl.max(gl.where(m_done, count, 0), 0)
        if rows > 0:  # uniform over the warpgroup (a reduction)
            m_query = gl.convert_layout(query, m_rows).to(gl.int64)
            m_head = gl.convert_layout(head, m_rows)
            out_rows = m_query * stride_on + m_head * stride_oh
            for c in gl.static_range(HEAD_DIM // MERGE_COLS):
                dims = c * MERGE_COLS + gl.arange(0, MERGE_COLS,
                                                  layout=gl.SliceLayout(0, merge_layout))
                m = gl.full([BLOCK_M], float("-inf"), gl.float32, m_rows)
                total = gl.zeros([BLOCK_M], gl.float32, m_rows)
                acc = gl.zeros([BLOCK_M, MERGE_COLS], gl.float32, merge_layout)
                for j in range(0, rows):  # ascending rows, as `_merge_query_kernel`
                    ok = m_done & (j < count)
                    part = (m_lo + j).to(gl.int64) * Q_HEADS + m_head
                    lse = gl.load(lse_part_ptr + part, mask=ok, other=float("-inf"),
                                  cache_modifier=".cg")
                    o = gl.load(o_part_ptr + part[:, None] * HEAD_DIM + dims[None, :],
                                mask=ok[:, None], other=0.0, cache_modifier=".cg")
                    m_new = gl.maximum(m, lse)
                    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet
                    weight = gl.exp(lse - m_safe)
                    scale = gl.exp(m - m_safe)
                    acc = acc * scale[:, None] + weight[:, None] * o
                    total = total * scale + weight
                    m = m_new
                seen = total > 0
                total_safe = gl.where(seen, total, 1.0)
                gl.store(out_ptr + out_rows[:, None] + dims[None, :],
                         (acc / total_safe[:, None]).to(out_ptr.dtype.element_ty),
                         mask=m_done[:, None])
                if STORE_LSE and c == 0:
                    gl.store(lse_out_ptr + m_query * stride_ln + m_head * stride_lh,
                             gl.where(seen, m + gl.log(total_safe), float("-inf")),
                             mask=m_done)
else:  # pragma: no cover - no Gluon in this triton
    _pad_rows = _arrive_and_merge = None
