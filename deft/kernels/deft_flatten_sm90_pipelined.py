"""The software-pipelined consumer of the Hopper Gluon DeFT-Flatten kernel (``PIPELINE``).

`deft.kernels.deft_flatten_sm90` runs it in place of its serial consumer: in the small-grid
kernel (a plan with at most one work item per SM, one CTA per SM) by default, and at two CTAs
per SM as a variant. Same inputs, barriers and outputs as the serial consumer, plus ``v_empty``
(V stages are released apart from K stages).
"""

from __future__ import annotations

from deft.kernels import gluon_compat as gc
from deft.kernels.deft_flatten_sm90_tiles import (mask_tile, online_softmax, query_span,
                                                  real_rows, row_results, store_rows,
                                                  work_item)
from deft.kernels.gluon_compat import HAS_GLUON

if HAS_GLUON:
    gluon, gl = gc.gluon, gc.gl
    mbarrier = gc.mbarrier
    fence_async_shared = gc.fence_async_shared
    warpgroup_mma, warpgroup_mma_wait = gc.warpgroup_mma, gc.warpgroup_mma_wait

    @gluon.jit
    def consumer_pipelined(o_part_ptr, lse_part_ptr, counts_ptr, part_start_ptr,
                           part_tokens_ptr, part_entry_ptr, qk_scale,
                           q_smem, qf_smem, row_smem, k_smem, v_smem, end_smem,
                           q_ready, q_empty, k_ready, v_ready, empty, v_empty,
                           KV_HEADS: gl.constexpr, GROUP: gl.constexpr,
                           GROUP_PAD: gl.constexpr, HEAD_DIM: gl.constexpr,
                           BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           NUM_STAGES: gl.constexpr, Q_STAGES: gl.constexpr,
                           THRESHOLD: gl.constexpr, MASK_FREE: gl.constexpr,
                           DTYPE: gl.constexpr, WARPS: gl.constexpr):
        """`deft_flatten_sm90_serial.consumer_serial` with the tile loop software-pipelined
        (FlashAttention-3's intra-warpgroup overlap): tile j's S = Q K^T is issued, then tile
        j-1's O += P V, and tile j's mask and softmax run while that wgmma does. A K stage
        (`empty`) is released once its S is read, a V stage (`v_empty`) once its P V is done; a
        query tile has at least one KV tile (the producer sends one all-masked tile for an empty
        partition)."""
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
        end_layout: gl.constexpr = gl.SliceLayout(0, s_layout)

        s_rows = gl.arange(0, BLOCK_M, layout=s_rows_layout)
        s_cols = gl.arange(0, BLOCK_N, layout=end_layout)
        o_rows = gl.arange(0, BLOCK_M, layout=o_rows_layout)
        o_dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))

        num_items = gl.load(counts_ptr) * KV_HEADS
        it = 0
        qt = 0
        for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
            kv_head, token_start, num_tokens, entry_lo, entry_hi = work_item(
                item, part_start_ptr, part_tokens_ptr, part_entry_ptr, KV_HEADS)
            span = gl.maximum(num_tokens, 1)
            for entry0 in range(entry_lo, entry_hi, QUERIES_PER_TILE):
                s_ok = real_rows(s_rows, entry0, entry_hi, QUERIES_PER_TILE, GROUP, GROUP_PAD)
                qs = qt % Q_STAGES
                mbarrier.wait(q_ready.index(qs), (qt // Q_STAGES) & 1)
                fence_async_shared()  # cp.async (generic proxy) -> wgmma (async proxy)
                q_tile = q_smem.index(qs)
                # -1: a padding row sees nothing (f <= -1 never holds)
                query_flat = gl.where(s_ok, qf_smem.index(qs).load(s_rows_layout), -1)
                qf_lo, qf_hi = query_span(query_flat, s_ok)
                # tile 0: S and its softmax; its P V waits for the loop (or the tail)
                stage = it % NUM_STAGES
                mbarrier.wait(k_ready.index(stage), (it // NUM_STAGES) & 1)
                fence_async_shared()
                s = warpgroup_mma(q_tile, k_smem.index(stage).permute((1, 0)),
                                  gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout),
                                  use_acc=False, is_async=True)
                end = end_smem.index(stage).load(end_layout)
                s = warpgroup_mma_wait(0, deps=[s])
                mbarrier.arrive(empty.index(stage), count=1)
                s = mask_tile(s, end, token_start, s_cols, query_flat, qf_lo, qf_hi,
                               BLOCK_N, MASK_FREE)
                p, alpha, m_i, l_i = online_softmax(
                    s, gl.full([BLOCK_M], float("-inf"), gl.float32, layout=s_rows_layout),
                    gl.zeros([BLOCK_M], gl.float32, layout=s_rows_layout), qk_scale, THRESHOLD)
                p16 = gl.convert_layout(p.to(DTYPE), p_layout)
                acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
                it += 1
                for n0 in range(BLOCK_N, span, BLOCK_N):
                    stage = it % NUM_STAGES
                    last = (it - 1) % NUM_STAGES
                    mbarrier.wait(k_ready.index(stage), (it // NUM_STAGES) & 1)
                    fence_async_shared()
                    s = warpgroup_mma(q_tile, k_smem.index(stage).permute((1, 0)),
                                  gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout),
                                      use_acc=False, is_async=True)
                    acc = acc * gl.convert_layout(alpha, o_rows_layout)[:, None]
                    mbarrier.wait(v_ready.index(last), ((it - 1) // NUM_STAGES) & 1)
                    fence_async_shared()
                    acc = warpgroup_mma(p16, v_smem.index(last), acc, is_async=True)
                    end = end_smem.index(stage).load(end_layout)
                    s = warpgroup_mma_wait(1, deps=[s])  # this tile's S; the last P V may run
                    mbarrier.arrive(empty.index(stage), count=1)
                    s = mask_tile(s, end, token_start + n0, s_cols, query_flat, qf_lo, qf_hi,
                                   BLOCK_N, MASK_FREE)
                    p, alpha, m_i, l_i = online_softmax(s, m_i, l_i, qk_scale, THRESHOLD)
                    acc, p16 = warpgroup_mma_wait(0, deps=[acc, p16])
                    mbarrier.arrive(v_empty.index(last), count=1)
                    p16 = gl.convert_layout(p.to(DTYPE), p_layout)
                    it += 1
                # the last tile's P V
                last = (it - 1) % NUM_STAGES
                acc = acc * gl.convert_layout(alpha, o_rows_layout)[:, None]
                mbarrier.wait(v_ready.index(last), ((it - 1) // NUM_STAGES) & 1)
                fence_async_shared()
                acc = warpgroup_mma(p16, v_smem.index(last), acc, is_async=True)
                acc, p16 = warpgroup_mma_wait(0, deps=[acc, p16])
                mbarrier.arrive(v_empty.index(last), count=1)
                l_safe, lse = row_results(m_i, l_i, qk_scale)
                row = row_smem.index(qs).load(s_rows_layout)
                o_row = row_smem.index(qs).load(o_rows_layout)
                mbarrier.arrive(q_empty.index(qs), count=1)  # Q tile and row data consumed
                qt += 1
                store_rows(o_part_ptr, lse_part_ptr, acc, l_safe, lse, row, o_row, s_rows, o_rows,
                           o_dims, s_ok, kv_head, entry0, entry_hi, o_rows_layout,
                           QUERIES_PER_TILE, GROUP, GROUP_PAD, Q_HEADS, HEAD_DIM)

else:  # pragma: no cover - no Gluon in this triton
    consumer_pipelined = None
