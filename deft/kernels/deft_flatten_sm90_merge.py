"""The merge fused into the Hopper Gluon partials kernel (``FUSED_MERGE``, a variant, issue #15).

`deft.kernels.reduction` merges each query's partial rows in a second kernel. With
``deft_flatten_sm90.FUSED_MERGE`` the partials kernel does it itself, so one launch (and no
dependency wait) serves a call: each (query, query head) has an int32 arrival counter in a
workspace of zeros (``max_queries x q_heads``, allocated beside the partial-result workspace,
`arrival_counters`). After the consumer warpgroup stores a query tile's partial rows it

1. makes them visible: a barrier over the consumer's 128 threads (``bar.sync 0, 128``), then
   each real row's counter is incremented by one thread with ``atom.global.gpu.acq_rel.add``.
   The barrier orders every consumer thread's stores before the atomic at CTA scope, and the
   atomic's release is cumulative, so whoever acquires the counter sees all of them (the
   pattern of a grid barrier: ``bar.sync``, then a release by one thread). On sm_90a ptxas
   emits ``MEMBAR.ALL.GPU`` before the ``ATOMG.E.ADD.STRONG.GPU`` and ``CCTL.IVALL`` (the
   SM's L1 invalidated: the acquire) after it;
2. finds the rows whose increment completed their query's count (the query's partial rows,
   ``query_row_ptr[q + 1] - query_row_ptr[q]``: every query has at least one, as every query
   sees its own token). Triton lowers a tensor atomic to one predicated ``atom`` per element
   and thread, the predicate including a "redundant data" mask that keeps one thread of each
   group holding the same element, and returns the ``atom``'s output register: a thread left
   out by that mask gets no old value. So the atomic runs on a ``[BLOCK_M, 2]`` layout that
   gives every element to exactly one thread (column 0 is the row's counter, column 1 masked
   off; the mask is then only ours, visible in the PTX), and the "done" flag is a reduction
   over the two columns, which both threads of the row receive. The last arriver resets the
   counter to 0, so the workspace is zeros again for the next call (CUDA graph replays
   included);
3. after a second barrier (the acquire of step 1 was made by the atomics' threads; the barrier
   orders the other threads' loads after it, as a grid barrier's waiters read after
   ``bar.sync``), merges the done rows' partial rows in ascending order with the arithmetic of
   `deft.kernels.reduction._merge_query_kernel` (row by row, running max, ``exp``/``log``), all
   done rows of the tile at once: a loop over j < the most rows of a done query, masked loads
   (``ld.global.cg``: from L2, never a line this SM's L1 cached before the other CTAs wrote
   it), MERGE_COLS columns per pass, and writes out (and lse).

Registers: the kernel's consumer gets 168 (FUSED_PRODUCER_REGS 88 for the producer) and the
row data of step 2 is computed after the tile's KV loop from an opaque copy of the row index,
so nothing of it is hoisted and held across that loop; so the kernel compiles without spills
with triton 3.6 and 3.9 up to GROUP 8 (FUSED_MAX_GROUP).

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
                          entry_query_ptr, query_row_ptr, entry0, entry_hi, kv_head,
                          stride_on, stride_oh, stride_ln, stride_lh,
                          GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, Q_HEADS: gl.constexpr,
                          HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                          MERGE_COLS: gl.constexpr, STORE_LSE: gl.constexpr,
                          WARPS: gl.constexpr):
        """Count the query tile of entries ``entry0 ..`` (< ``entry_hi``) of ``kv_head`` in,
        its partial rows stored, and merge the (query, head)s it completes (module docstring).
        """
        gl.static_assert(BLOCK_M == 16 * WARPS, "the layouts below cover 16 rows per warp")
        # the merge's layout: row r on lanes 2 (r % 16) and 2 (r % 16) + 1 of warp r // 16,
        # MERGE_COLS / 2 columns each (acc and one loaded [BLOCK_M, MERGE_COLS] tile fit the
        # consumer's registers, the whole head_dim does not)
        merge_layout: gl.constexpr = gl.BlockedLayout([1, MERGE_COLS // 2], [16, 2],
                                                      [WARPS, 1], [1, 0])
        m_rows: gl.constexpr = gl.SliceLayout(1, merge_layout)
        # the atomics' layout: the same rows, the two lanes of a row holding one element
        # each of a [BLOCK_M, 2] tensor (column 0 the row's counter, column 1 masked off), so
        # no element is held by two threads
        arrive_layout: gl.constexpr = gl.BlockedLayout([1, 1], [16, 2], [WARPS, 1], [1, 0])
        a_rows: gl.constexpr = gl.SliceLayout(1, arrive_layout)
        # query slot x GROUP_PAD + head, through an opaque copy: what is derived from it stays
        # here instead of being hoisted out of the tile loops and held across the KV loop
        rows = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r",
                                         [gl.arange(0, BLOCK_M, layout=m_rows)],
                                         dtype=gl.int32, is_pure=False, pack=1)
        slot = rows // GROUP_PAD
        row_ok = ((slot < BLOCK_M // GROUP_PAD) & (entry0 + slot < entry_hi)
                  & (rows % GROUP_PAD < GROUP))
        query = gl.load(entry_query_ptr + entry0 + slot, mask=row_ok, other=0)
        head = kv_head * GROUP + rows % GROUP_PAD
        lo = gl.load(query_row_ptr + query, mask=row_ok, other=0)
        count = gl.load(query_row_ptr + query + 1, mask=row_ok, other=0) - lo
        column = gl.arange(0, 2, layout=gl.SliceLayout(0, arrive_layout))
        # m_rows -> a_rows: the same rows on the same lanes (no data moves)
        counter = gl.convert_layout(arrivals_ptr + (query * Q_HEADS + head), a_rows)
        counters = counter[:, None] + column[None, :] * 0
        mine = gl.convert_layout(row_ok, a_rows)[:, None] & (column[None, :] == 0)
        cta_barrier()  # every consumer thread's partial-row stores precede the release below
        old = gl.atomic_add(counters, gl.full([BLOCK_M, 2], 1, gl.int32, arrive_layout),
                            mask=mine, sem="acq_rel", scope="gpu")
        last = mine & (old + 1 == gl.convert_layout(count, a_rows)[:, None])
        gl.store(counters, gl.zeros([BLOCK_M, 2], gl.int32, arrive_layout), mask=last)
        # a reduction over the two lanes of a row: both get the flag (the old value reached
        # only the thread of column 0)
        done = gl.convert_layout(gl.max(last.to(gl.int32), 1), m_rows) > 0
        cta_barrier()  # the loads below come after the acquiring atomics
        most_rows = gl.max(gl.where(done, count, 0), 0)
        if most_rows > 0:  # uniform over the warpgroup (a reduction)
            out_rows = query.to(gl.int64) * stride_on + head * stride_oh
            for c in gl.static_range(HEAD_DIM // MERGE_COLS):
                dims = c * MERGE_COLS + gl.arange(0, MERGE_COLS,
                                                  layout=gl.SliceLayout(0, merge_layout))
                m = gl.full([BLOCK_M], float("-inf"), gl.float32, m_rows)
                total = gl.zeros([BLOCK_M], gl.float32, m_rows)
                acc = gl.zeros([BLOCK_M, MERGE_COLS], gl.float32, merge_layout)
                for j in range(0, most_rows):  # ascending rows, as `_merge_query_kernel`
                    ok = done & (j < count)
                    part = (lo + j).to(gl.int64) * Q_HEADS + head
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
                         mask=done[:, None])
                if STORE_LSE and c == 0:
                    gl.store(lse_out_ptr + query.to(gl.int64) * stride_ln + head * stride_lh,
                             gl.where(seen, m + gl.log(total_safe), float("-inf")),
                             mask=done)
else:  # pragma: no cover - no Gluon in this triton
    _pad_rows = _arrive_and_merge = None
