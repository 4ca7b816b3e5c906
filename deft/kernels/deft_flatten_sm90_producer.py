"""The producer partition of the Hopper Gluon DeFT-Flatten kernels
(`deft.kernels.deft_flatten_sm90`, `deft.kernels.deft_flatten_sm90_split`): all address work
and every load.

It walks the same item / query-tile / KV-tile loops as the consumers. Per query tile it gathers
the Q rows (query slot x GROUP + head) and the rows' ``query_flat`` and ``entry_row`` into one
of Q_STAGES shared buffers; per KV tile of BLOCK_N tokens it reads the tokens' cache slots
SLOT_AHEAD tiles ahead and gathers the K rows, then the V rows, with cp.async (16-byte copies)
into a ring of NUM_STAGES stages, plus the tile's ``subtree_end`` values; with TMA_ROWS (the
``TMA_KV`` variant) a tile that `whole_runs` finds on runs of consecutive slots is copied as
`tma_tile`'s boxes instead. Every producer thread arrives on a stage's ready mbarrier when its
copies land (with TMA_ROWS one arrival more: the boxes' expected bytes, or a plain arrive);
it waits on the stage's empty mbarrier (V's own, ``v_empty``, with PIPELINE) before refilling
it. With WAIT_FOR_PRIOR_GRID (the kernel launched as a programmatic dependent) it executes
``griddepcontrol.wait`` before a query tile's first copy; with PREFETCH_ITEM its first work
item's plan data are loaded beside the item count. Read the kernel module's docstring for the
shared memory and the barriers.
"""

from __future__ import annotations

from deft.kernels import gluon_compat as gc
from deft.kernels.deft_flatten_sm90_tiles import (
    first_work_item,
    real_rows,
    work_item_at,
)
from deft.kernels.gluon_compat import HAS_GLUON

if HAS_GLUON:
    gluon, gl = gc.gluon, gc.gl
    mbarrier, async_copy = gc.mbarrier, gc.async_copy
    async_load, tma_load = gc.async_load, gc.tma_load

    @gluon.jit
    def query_rows(entry0, entry_hi, kv_head, q_rows, m_rows, entry_query_ptr, stride_qn,
                   stride_qh, QUERIES_PER_TILE: gl.constexpr, GROUP: gl.constexpr,
                   GROUP_PAD: gl.constexpr):
        """Where a query tile's rows come from, in the copy layout (q_*) and the vector layout
        (m_*): (real rows, Q row offsets, entries, real rows, query index of each entry)."""
        q_entry = entry0 + q_rows // GROUP_PAD
        q_ok = real_rows(q_rows, entry0, entry_hi, QUERIES_PER_TILE, GROUP, GROUP_PAD)
        query = gl.load(entry_query_ptr + q_entry, mask=q_ok, other=0)
        q_off = (query.to(gl.int64) * stride_qn
                 + (kv_head * GROUP + q_rows % GROUP_PAD) * stride_qh)
        m_entry = entry0 + m_rows // GROUP_PAD
        m_ok = real_rows(m_rows, entry0, entry_hi, QUERIES_PER_TILE, GROUP, GROUP_PAD)
        m_query = gl.load(entry_query_ptr + m_entry, mask=m_ok, other=0)
        return q_ok, q_off, m_entry, m_ok, m_query

    @gluon.jit
    def load_query_tile(qt, q_off, q_ok, m_entry, m_ok, m_query, q_ptr, query_flat_ptr,
                        entry_row_ptr, dims, q_smem, qf_smem, row_smem, q_ready, q_empty,
                        Q_STAGES: gl.constexpr):
        """Gather query tile ``qt``'s Q rows and their query_flat and entry_row into its Q
        stage, once the stage is free, and arrive on its ready barrier when they land."""
        qs = qt % Q_STAGES
        mbarrier.wait(q_empty.index(qs), ((qt // Q_STAGES) & 1) ^ 1)
        async_load(q_smem.index(qs), q_ptr + q_off[:, None] + dims[None, :], mask=q_ok[:, None])
        async_load(qf_smem.index(qs), query_flat_ptr + m_query, mask=m_ok)
        async_load(row_smem.index(qs), entry_row_ptr + m_entry, mask=m_ok)
        async_copy.mbarrier_arrive(q_ready.index(qs), increment_count=False)

    @gluon.jit
    def whole_runs(slot_base, n0, num_tokens, cols, ROWS: gl.constexpr, BLOCK_N: gl.constexpr):
        """Whether KV tile ``n0`` (BLOCK_N tokens from ``slot_base``) lies whole inside its
        partition in runs of ROWS tokens on consecutive cache slots (so ROWS-row TMA boxes
        copy it): every token's slot is its run's first slot + its place in the run. One
        scalar, the same in every producer thread."""
        t = n0 + cols
        inside = t < num_tokens
        slot = gl.load(slot_base + t, mask=inside, other=0)
        run_first = gl.load(slot_base + (t - t % ROWS), mask=inside, other=0)
        in_run = inside & (slot - run_first == t % ROWS)
        return gl.min(in_run.to(gl.int32), 0) == 1

    @gluon.jit
    def tma_tile(desc, slot_base, n0, col, bar, dst, ROWS: gl.constexpr,
                 BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Copy KV tile ``n0`` (`whole_runs`) into stage ``dst`` [BLOCK_N, HEAD_DIM] as
        BLOCK_N / ROWS TMA boxes of ROWS cache rows x HEAD_DIM columns from column ``col``;
        ``bar`` completes when their bytes have landed and every producer thread has arrived
        (its own cp.async copies, the tile's subtree_end, landed)."""
        mbarrier.expect(bar, BLOCK_N * HEAD_DIM * 2)  # 16-bit elements (`takes`)
        for r in gl.static_range(BLOCK_N // ROWS):
            first = gl.load(slot_base + n0 + r * ROWS)
            tma_load(desc, [first, col], bar, dst.slice(r * ROWS, ROWS))
        async_copy.mbarrier_arrive(bar, increment_count=False)

    @gluon.jit
    def load_kv_tile(boxes, desc, ptrs, ok, slot_base, n0, col, ready, dst,
                     TMA_ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Copy a K or V tile into its stage ``dst`` and arrive on its ready barrier: as
        `tma_tile`'s boxes where ``boxes`` (`whole_runs`; a constexpr False without TMA_ROWS),
        else gathered row by row from ``ptrs`` (its real rows ``ok``) with cp.async, arriving
        once more with TMA_ROWS (the arrival `tma_tile`'s expect makes)."""
        if boxes:
            tma_tile(desc, slot_base, n0, col, ready, dst, TMA_ROWS, BLOCK_N, HEAD_DIM)
        else:
            async_load(dst, ptrs, mask=ok[:, None])
            async_copy.mbarrier_arrive(ready, increment_count=False)
            if TMA_ROWS > 0:
                mbarrier.arrive(ready, count=1)

    @gluon.jit
    def producer(q_ptr, k_ptr, v_ptr, k_desc, v_desc, counts_ptr, part_start_ptr, part_tokens_ptr,
                  part_entry_ptr, entry_query_ptr, entry_row_ptr, query_flat_ptr,
                  token_slot_ptr, subtree_end_ptr,
                  stride_qn, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                  q_smem, qf_smem, row_smem, k_smem, v_smem, end_smem,
                  q_ready, q_empty, k_ready, v_ready, empty, v_empty,
                  KV_HEADS: gl.constexpr, GROUP: gl.constexpr, GROUP_PAD: gl.constexpr,
                  HEAD_DIM: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                  Q_STAGES: gl.constexpr, SLOT_AHEAD: gl.constexpr, PIPELINE: gl.constexpr,
                  WAIT_FOR_PRIOR_GRID: gl.constexpr, PREFETCH_ITEM: gl.constexpr,
                  TMA_ROWS: gl.constexpr, WARPS: gl.constexpr):
        QUERIES_PER_TILE: gl.constexpr = BLOCK_M // GROUP_PAD
        VEC: gl.constexpr = 8  # 16-byte copies of 16-bit elements
        TPR: gl.constexpr = HEAD_DIM // VEC  # threads along a row
        copy_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TPR, TPR], [WARPS, 1],
                                                     [1, 0])
        vec_layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        tile_rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, copy_layout))
        q_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, copy_layout))
        dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, copy_layout))
        cols = gl.arange(0, BLOCK_N, layout=vec_layout)
        m_rows = gl.arange(0, BLOCK_M, layout=vec_layout)
        num_items, first, f_head, f_start, f_tokens, f_lo, f_hi = first_work_item(
            counts_ptr, part_start_ptr, part_tokens_ptr, part_entry_ptr, KV_HEADS, PREFETCH_ITEM)
        it = 0
        qt = 0
        for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
            kv_head, token_start, num_tokens, entry_lo, entry_hi = work_item_at(
                item, first, f_head, f_start, f_tokens, f_lo, f_hi, part_start_ptr,
                part_tokens_ptr, part_entry_ptr, KV_HEADS)
            # (PIPELINE) at least one tile a query tile, all masked if the partition is empty
            span = gl.maximum(num_tokens, 1) if PIPELINE else num_tokens
            k_head = k_ptr + kv_head.to(gl.int64) * stride_kh
            v_head = v_ptr + kv_head.to(gl.int64) * stride_vh
            slot_base = token_slot_ptr + token_start
            end_base = subtree_end_ptr + token_start
            for entry0 in range(entry_lo, entry_hi, QUERIES_PER_TILE):
                # the query tile (rows = query slot x GROUP_PAD + head) and its rows' plan data
                q_ok, q_off, m_entry, m_ok, m_query = query_rows(
                    entry0, entry_hi, kv_head, q_rows, m_rows, entry_query_ptr, stride_qn,
                    stride_qh, QUERIES_PER_TILE, GROUP, GROUP_PAD)
                # the first KV tile's slots (and the second's), loaded before waiting for a
                # free stage
                row = tile_rows
                slot = gl.load(slot_base + row, mask=row < num_tokens, other=0)
                if SLOT_AHEAD == 2:
                    ahead = row + BLOCK_N
                    slot_ahead = gl.load(slot_base + ahead, mask=ahead < num_tokens, other=0)
                if WAIT_FOR_PRIOR_GRID:  # Q and K/V may be the prior kernel's output
                    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [],
                                              dtype=gl.int32, is_pure=False, pack=1)
                load_query_tile(qt, q_off, q_ok, m_entry, m_ok, m_query, q_ptr, query_flat_ptr,
                                entry_row_ptr, dims, q_smem, qf_smem, row_smem, q_ready, q_empty,
                                Q_STAGES)
                qt += 1
                for n0 in range(0, span, BLOCK_N):
                    ok = row < num_tokens
                    k_ptrs = k_head + (slot.to(gl.int64)[:, None] * stride_kt + dims[None, :])
                    v_ptrs = v_head + (slot.to(gl.int64)[:, None] * stride_vt + dims[None, :])
                    # the next tile's slots, SLOT_AHEAD iterations ahead (hidden behind this
                    # tile, or this tile and the next)
                    row = row + BLOCK_N
                    if SLOT_AHEAD == 2:
                        slot = slot_ahead
                        ahead = row + BLOCK_N
                        slot_ahead = gl.load(slot_base + ahead, mask=ahead < num_tokens, other=0)
                    else:
                        slot = gl.load(slot_base + row, mask=row < num_tokens, other=0)
                    stage = it % NUM_STAGES
                    if TMA_ROWS > 0:
                        boxes = whole_runs(slot_base, n0, num_tokens, cols, TMA_ROWS, BLOCK_N)
                    else:
                        boxes: gl.constexpr = False
                    mbarrier.wait(empty.index(stage), ((it // NUM_STAGES) & 1) ^ 1)
                    col = n0 + cols
                    async_load(end_smem.index(stage), end_base + col, mask=col < num_tokens)
                    load_kv_tile(boxes, k_desc, k_ptrs, ok, slot_base, n0, kv_head * HEAD_DIM,
                                 k_ready.index(stage), k_smem.index(stage), TMA_ROWS, BLOCK_N,
                                 HEAD_DIM)
                    if PIPELINE:  # V stages are released apart from K stages
                        mbarrier.wait(v_empty.index(stage), ((it // NUM_STAGES) & 1) ^ 1)
                    load_kv_tile(boxes, v_desc, v_ptrs, ok, slot_base, n0, kv_head * HEAD_DIM,
                                 v_ready.index(stage), v_smem.index(stage), TMA_ROWS, BLOCK_N,
                                 HEAD_DIM)
                    it += 1
else:  # pragma: no cover - no Gluon in this triton
    producer = query_rows = load_query_tile = whole_runs = tma_tile = load_kv_tile = None
