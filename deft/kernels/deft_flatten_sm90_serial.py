"""The serial consumer of the Hopper Gluon DeFT-Flatten kernel: the two-CTA kernel's.

`deft.kernels.deft_flatten_sm90` runs it unless ``PIPELINE`` (the small-grid kernel runs
`deft.kernels.deft_flatten_sm90_pipelined`): per KV tile it waits for the K stage, computes
S = Q K^T with wgmma, masks it (`deft.kernels.deft_flatten_sm90_tiles`), runs the online
softmax, waits for the V stage and adds P V, then releases the stage (``empty``); per query tile
it stores the partial rows. Read the kernel module's docstring for the shared memory, barriers
and the work items.
"""

from __future__ import annotations

from deft.kernels import gluon_compat as gc
from deft.kernels.deft_flatten_sm90_tiles import (mask_unless_whole, query_span, real_rows,
                                                  row_results, store_rows, work_item)
from deft.kernels.gluon_compat import HAS_GLUON

if HAS_GLUON:
    gluon, gl = gc.gluon, gc.gl
    mbarrier = gc.mbarrier
    fence_async_shared = gc.fence_async_shared
    warpgroup_mma, warpgroup_mma_wait = gc.warpgroup_mma, gc.warpgroup_mma_wait

    @gluon.jit
    def attend_query_tile(o_part_ptr, lse_part_ptr, qk_scale, kv_head, token_start, num_tokens,
                          entry0, entry_hi, qt, it, s_rows, s_cols, o_rows, o_dims,
                          q_smem, qf_smem, row_smem, k_smem, v_smem, end_smem,
                          q_ready, q_empty, k_ready, v_ready, empty,
                          KV_HEADS: gl.constexpr, GROUP: gl.constexpr, GROUP_PAD: gl.constexpr,
                          HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                          NUM_STAGES: gl.constexpr, Q_STAGES: gl.constexpr,
                          THRESHOLD: gl.constexpr, LAZY: gl.constexpr, MASK_FREE: gl.constexpr,
                          DTYPE: gl.constexpr, WARPS: gl.constexpr):
        """One query tile (its first entry ``entry0``, the ``qt``-th Q stage use) over its work
        item's KV tiles (ring uses from ``it``): wait, compute, release each stage once its
        P V is done, store the partial rows; returns the ring index past its tiles."""
        QUERIES_PER_TILE: gl.constexpr = BLOCK_M // GROUP_PAD
        Q_HEADS: gl.constexpr = KV_HEADS * GROUP
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                     k_width=2)
        s_rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_rows_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
        s_ok = real_rows(s_rows, entry0, entry_hi, QUERIES_PER_TILE, GROUP, GROUP_PAD)
        qs = qt % Q_STAGES
        mbarrier.wait(q_ready.index(qs), (qt // Q_STAGES) & 1)
        fence_async_shared()  # cp.async (generic proxy) -> wgmma (async proxy)
        q_tile = q_smem.index(qs)
        # -1: a padding row sees nothing (f <= -1 never holds)
        query_flat = gl.where(s_ok, qf_smem.index(qs).load(s_rows_layout), -1)
        if MASK_FREE:
            qf_lo, qf_hi = query_span(query_flat, s_ok)
        # raw (unscaled) scores; a row that has seen nothing keeps m = -inf
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=s_rows_layout)
        # (LAZY) the running max times the scale, 0 while the max is -inf
        m_sc = gl.zeros([BLOCK_M], gl.float32, layout=s_rows_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=s_rows_layout)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        for n0 in range(0, num_tokens, BLOCK_N):
            stage = it % NUM_STAGES
            phase = (it // NUM_STAGES) & 1
            mbarrier.wait(k_ready.index(stage), phase)
            fence_async_shared()
            s = warpgroup_mma(q_tile, k_smem.index(stage).permute((1, 0)),
                              gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout),
                              use_acc=False, is_async=True)
            end = end_smem.index(stage).load(gl.SliceLayout(0, s_layout))
            if MASK_FREE:
                s = warpgroup_mma_wait(0, deps=[s])
                s = mask_unless_whole(s, end, token_start + n0, s_cols, query_flat,
                                       qf_lo, qf_hi, BLOCK_N)
            else:
                flat = token_start + n0 + s_cols
                visible = (flat[None, :] <= query_flat[:, None]) & (
                    query_flat[:, None] < end[None, :])
                s = warpgroup_mma_wait(0, deps=[s])
                s = gl.where(visible, s, float("-inf"))
            m_tile = gl.max(s, 1)
            # exact lazy rescale: keep the stale max unless it is passed by more than
            # THRESHOLD (then p <= 2**THRESHOLD); a -inf max is always replaced
            grow = (m_tile - m_i) * qk_scale > THRESHOLD
            if LAZY:  # O and l are rescaled only on tiles where some row's max moves
                if gl.max(grow.to(gl.int32), 0) > 0:
                    m_new = gl.where(grow, gl.maximum(m_i, m_tile), m_i)
                    m_sc_new = gl.where(m_new == float("-inf"), 0.0, m_new) * qk_scale
                    alpha = gl.where(m_i == m_new, 1.0, gl.exp2(m_i * qk_scale - m_sc_new))
                    l_i = l_i * alpha
                    acc = acc * gl.convert_layout(alpha, o_rows_layout)[:, None]
                    m_i = m_new
                    m_sc = m_sc_new
                p = gl.exp2(s * qk_scale - m_sc[:, None])
                l_i = l_i + gl.sum(p, 1)
            else:  # `online_softmax` inline, in the order of selects that was timed
                m_new = gl.where(grow, gl.maximum(m_i, m_tile), m_i)
                m_scaled = gl.where(m_new == float("-inf"), 0.0, m_new) * qk_scale
                p = gl.exp2(s * qk_scale - m_scaled[:, None])
                alpha = gl.exp2(m_i * qk_scale - m_scaled)
                alpha = gl.where(m_i == m_new, 1.0, alpha)
                l_i = l_i * alpha + gl.sum(p, 1)
                m_i = m_new
                acc = acc * gl.convert_layout(alpha, o_rows_layout)[:, None]
            p16 = gl.convert_layout(p.to(DTYPE), p_layout)
            mbarrier.wait(v_ready.index(stage), phase)
            fence_async_shared()
            acc = warpgroup_mma(p16, v_smem.index(stage), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc])
            mbarrier.arrive(empty.index(stage), count=1)
            it += 1
        l_safe, lse = row_results(m_i, l_i, qk_scale)
        row = row_smem.index(qs).load(s_rows_layout)
        o_row = row_smem.index(qs).load(o_rows_layout)
        mbarrier.arrive(q_empty.index(qs), count=1)  # Q tile and row data consumed
        store_rows(o_part_ptr, lse_part_ptr, acc, l_safe, lse, row, o_row, s_rows, o_rows,
                   o_dims, s_ok, kv_head, entry0, entry_hi, o_rows_layout,
                   QUERIES_PER_TILE, GROUP, GROUP_PAD, Q_HEADS, HEAD_DIM)
        return it

    @gluon.jit
    def consumer_serial(o_part_ptr, lse_part_ptr, counts_ptr, part_start_ptr, part_tokens_ptr,
                        part_entry_ptr, qk_scale,
                        q_smem, qf_smem, row_smem, k_smem, v_smem, end_smem,
                        q_ready, q_empty, k_ready, v_ready, empty,
                        KV_HEADS: gl.constexpr, GROUP: gl.constexpr, GROUP_PAD: gl.constexpr,
                        HEAD_DIM: gl.constexpr,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                        Q_STAGES: gl.constexpr, THRESHOLD: gl.constexpr, LAZY: gl.constexpr,
                        MASK_FREE: gl.constexpr, DTYPE: gl.constexpr, WARPS: gl.constexpr):
        QUERIES_PER_TILE: gl.constexpr = BLOCK_M // GROUP_PAD
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
        s_rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_rows_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

        s_rows = gl.arange(0, BLOCK_M, layout=s_rows_layout)
        s_cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        o_rows = gl.arange(0, BLOCK_M, layout=o_rows_layout)
        o_dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))

        num_items = gl.load(counts_ptr) * KV_HEADS
        it = 0
        qt = 0
        for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
            kv_head, token_start, num_tokens, entry_lo, entry_hi = work_item(
                item, part_start_ptr, part_tokens_ptr, part_entry_ptr, KV_HEADS)
            for entry0 in range(entry_lo, entry_hi, QUERIES_PER_TILE):
                it = attend_query_tile(
                    o_part_ptr, lse_part_ptr, qk_scale, kv_head, token_start, num_tokens,
                    entry0, entry_hi, qt, it, s_rows, s_cols, o_rows, o_dims, q_smem, qf_smem,
                    row_smem, k_smem, v_smem, end_smem, q_ready, q_empty, k_ready, v_ready,
                    empty, KV_HEADS, GROUP, GROUP_PAD, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES,
                    Q_STAGES, THRESHOLD, LAZY, MASK_FREE, DTYPE, WARPS)
                qt += 1

else:  # pragma: no cover - no Gluon in this triton
    consumer_serial = attend_query_tile = None
