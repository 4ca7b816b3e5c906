"""DeFT-Flatten partials on Hopper with two consumer warpgroups per CTA (a variant, issue #15).

Same work, inputs and partial rows as `deft.kernels.deft_flatten_sm90` (read its docstring),
and the same producer partition; what changes is the consumer side. One CTA per SM of 12 warps:

- the producer (4 warps) fills a ring of NUM_STAGES (4) K/V stages of BLOCK_N tokens in tile
  order, reading cache slots SLOT_AHEAD tiles ahead;
- two consumer warpgroups split the KV tiles of a work item's query tile: consumer c takes the
  tiles whose ring index ``it`` has ``it % 2 == c``. With an even ring depth consumer c then
  owns the stages ``s % 2 == c`` for good, so every ready/empty mbarrier has one waiter that
  sees every one of its phases. Each consumer keeps its own running max m, sum l and O
  accumulator (raw scores, the exact lazy max of RESCALE_THRESHOLD), so the two wgmma ->
  softmax -> wgmma chains of an SM run independently and one's softmax overlaps the other's
  wgmma;
- at the end of a query tile consumer 1 publishes its state (the scaled max, -inf for a row
  that saw nothing, l, and O in fp32: 32 KB) in shared memory and consumer 0 merges it with its
  own, ``M = max(m0, m1)``, ``l = l0 2^(m0 - M) + l1 2^(m1 - M)``, ``O`` likewise, and writes the
  partial row (o = O / l, lse = (M + log2 l) ln 2). Two mbarriers hand the buffer over.

Registers: 168 per thread at launch (one CTA of 384 threads); setmaxnreg gives the producer
PRODUCER_REGS (120), the second consumer CONSUMER_REGS (192) and the first the rest (192).
Shared memory: 2 Q tiles (32 KB), 4 K/V stages (128 KB), the merge buffer (32 KB): 195 KB of
the SM's 227 KB (101 KB at head_dim 64). ``LAZY_RESCALE`` is not implemented here. Selected by
``deft_flatten_sm90.TWO_CONSUMERS``; measured on an H200 (2026-12-01, `scripts/gluon_check.py
--variants split2`) 1.03-1.16x slower than the default at 32/8. It gathers every KV tile (no
TMA boxes: ``k_desc``/``v_desc`` are the caches, unread).
"""

from __future__ import annotations

from deft.kernels import deft_flatten_sm90 as sm90
from deft.kernels import gluon_compat as gc
from deft.kernels.deft_flatten_sm90_producer import producer
from deft.kernels.deft_flatten_sm90_tiles import (
    mask_unless_whole,
    online_softmax,
    query_span,
    real_rows,
    store_rows,
    work_item,
)

NUM_STAGES = 4
"""K/V ring depth (even: each consumer owns every other stage)."""
MAX_REGS = 168
"""Registers per thread of the kernel (one CTA of 12 warps per SM: 168 x 384 <= 64 K)."""
PRODUCER_REGS = 120
"""setmaxnreg of the producer warpgroup."""
CONSUMER_REGS = 192
"""setmaxnreg of the second consumer warpgroup (the first gets what remains of MAX_REGS)."""
CTAS_PER_SM = 1

if gc.HAS_GLUON:
    gluon, gl = gc.gluon, gc.gl
    mbarrier, fence_async_shared = gc.mbarrier, gc.fence_async_shared
    warpgroup_mma, warpgroup_mma_wait = gc.warpgroup_mma, gc.warpgroup_mma_wait
    cta_barrier = gc.cta_barrier

    @gluon.jit
    def _split_consumer(o_part_ptr, lse_part_ptr, counts_ptr, part_start_ptr, part_tokens_ptr,
                        part_entry_ptr, qk_scale,
                        q_smem, qf_smem, row_smem, k_smem, v_smem, end_smem, acc_smem, ml_smem,
                        q_ready, q_empty, k_ready, v_ready, empty, merge_full, merge_empty,
                        KV_HEADS: gl.constexpr, GROUP: gl.constexpr, GROUP_PAD: gl.constexpr,
                        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        NUM_STAGES: gl.constexpr, Q_STAGES: gl.constexpr,
                        THRESHOLD: gl.constexpr, MASK_FREE: gl.constexpr, DTYPE: gl.constexpr,
                        CONSUMER: gl.constexpr):
        WARPS: gl.constexpr = 4
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
        s_rows = gl.arange(0, BLOCK_M, layout=s_rows_layout)
        s_cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        o_rows = gl.arange(0, BLOCK_M, layout=o_rows_layout)
        o_dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))

        num_items = gl.load(counts_ptr) * KV_HEADS
        it = 0  # ring index of the query tile's first KV tile
        qt = 0
        for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
            kv_head, token_start, num_tokens, entry_lo, entry_hi = work_item(
                item, part_start_ptr, part_tokens_ptr, part_entry_ptr, KV_HEADS)
            tiles = gl.cdiv(num_tokens, BLOCK_N)
            for entry0 in range(entry_lo, entry_hi, QUERIES_PER_TILE):
                s_ok = real_rows(s_rows, entry0, entry_hi, QUERIES_PER_TILE, GROUP, GROUP_PAD)
                qs = qt % Q_STAGES
                mbarrier.wait(q_ready.index(qs), (qt // Q_STAGES) & 1)
                fence_async_shared()  # cp.async (generic proxy) -> wgmma (async proxy)
                q_tile = q_smem.index(qs)
                query_flat = gl.where(s_ok, qf_smem.index(qs).load(s_rows_layout), -1)
                if MASK_FREE:
                    qf_lo, qf_hi = query_span(query_flat, s_ok)
                m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=s_rows_layout)
                l_i = gl.zeros([BLOCK_M], gl.float32, layout=s_rows_layout)
                acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
                # this consumer's tiles: local j with (it + j) % 2 == CONSUMER
                for j in range((CONSUMER + it) % 2, tiles, 2):
                    stage = (it + j) % NUM_STAGES
                    phase = ((it + j) // NUM_STAGES) & 1
                    n0 = j * BLOCK_N
                    mbarrier.wait(k_ready.index(stage), phase)
                    fence_async_shared()
                    s = warpgroup_mma(q_tile, k_smem.index(stage).permute((1, 0)),
                                      gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout),
                                      use_acc=False, is_async=True)
                    end = end_smem.index(stage).load(gl.SliceLayout(0, s_layout))
                    if MASK_FREE:
                        s = warpgroup_mma_wait(0, deps=[s])
                        s = mask_unless_whole(s, end, token_start + n0, s_cols,
                                                    query_flat, qf_lo, qf_hi, BLOCK_N)
                    else:
                        flat = token_start + n0 + s_cols
                        visible = (flat[None, :] <= query_flat[:, None]) & (
                            query_flat[:, None] < end[None, :])
                        s = warpgroup_mma_wait(0, deps=[s])
                        s = gl.where(visible, s, float("-inf"))
                    p, alpha, m_i, l_i = online_softmax(s, m_i, l_i, qk_scale, THRESHOLD)
                    acc = acc * gl.convert_layout(alpha, o_rows_layout)[:, None]
                    p16 = gl.convert_layout(p.to(DTYPE), p_layout)
                    mbarrier.wait(v_ready.index(stage), phase)
                    fence_async_shared()
                    acc = warpgroup_mma(p16, v_smem.index(stage), acc, is_async=True)
                    acc = warpgroup_mma_wait(0, deps=[acc])
                    mbarrier.arrive(empty.index(stage), count=1)
                it += tiles
                # the scaled max of the rows that saw something, -inf for the others
                m_own = gl.where(l_i > 0, m_i * qk_scale, float("-inf"))
                merge_phase = qt & 1
                if CONSUMER == 1:
                    mbarrier.arrive(q_empty.index(qs), count=1)
                    mbarrier.wait(merge_empty, merge_phase ^ 1)
                    ml_smem.index(0).store(m_own)
                    ml_smem.index(1).store(l_i)
                    acc_smem.store(acc)
                    cta_barrier()  # every thread's state is in shared memory
                    mbarrier.arrive(merge_full, count=1)
                else:
                    row = row_smem.index(qs).load(s_rows_layout)
                    o_row = row_smem.index(qs).load(o_rows_layout)
                    mbarrier.wait(merge_full, merge_phase)
                    m_other = ml_smem.index(0).load(s_rows_layout)
                    l_other = ml_smem.index(1).load(s_rows_layout)
                    acc_other = acc_smem.load(o_layout)
                    cta_barrier()  # every thread has read the other consumer's state
                    mbarrier.arrive(merge_empty, count=1)
                    mbarrier.arrive(q_empty.index(qs), count=1)  # Q tile and row data read
                    m_max = gl.maximum(m_own, m_other)
                    m_ref = gl.where(m_max == float("-inf"), 0.0, m_max)
                    a_own = gl.exp2(m_own - m_ref)  # 0 for a consumer that saw nothing
                    a_other = gl.exp2(m_other - m_ref)
                    l_sum = l_i * a_own + l_other * a_other
                    acc = (acc * gl.convert_layout(a_own, o_rows_layout)[:, None]
                           + acc_other * gl.convert_layout(a_other, o_rows_layout)[:, None])
                    seen = l_sum > 0
                    l_safe = gl.where(seen, l_sum, 1.0)
                    lse = gl.where(seen, (m_ref + gl.log2(l_safe)) * 0.6931471805599453,
                                   float("-inf"))
                    store_rows(o_part_ptr, lse_part_ptr, acc, l_safe, lse, row, o_row, s_rows,
                               o_rows, o_dims, s_ok, kv_head, entry0, entry_hi, o_rows_layout,
                               QUERIES_PER_TILE, GROUP, GROUP_PAD, Q_HEADS, HEAD_DIM)
                qt += 1

    @gluon.jit
    def _partials_split_kernel(
        q_ptr, k_ptr, v_ptr, k_desc, v_desc, o_part_ptr, lse_part_ptr,
        counts_ptr, part_start_ptr, part_tokens_ptr, part_entry_ptr, entry_query_ptr,
        entry_row_ptr, query_flat_ptr, token_slot_ptr, subtree_end_ptr,
        stride_qn, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        qk_scale,
        KV_HEADS: gl.constexpr, GROUP: gl.constexpr, GROUP_PAD: gl.constexpr,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        NUM_STAGES: gl.constexpr, Q_STAGES: gl.constexpr, THRESHOLD: gl.constexpr,
        SLOT_AHEAD: gl.constexpr, MASK_FREE: gl.constexpr, PRODUCER_WARPS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
    ):
        dtype: gl.constexpr = k_ptr.dtype.element_ty
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        # fp32 pairs of a row, XOR-swizzled over 8 rows (the wgmma layout's rows r, r + 8, ...)
        acc_layout: gl.constexpr = gl.SwizzledSharedLayout(2, 1, 8, [1, 0])
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        q_smem = gl.allocate_shared_memory(dtype, [Q_STAGES, BLOCK_M, HEAD_DIM], q_layout)
        qf_smem = gl.allocate_shared_memory(gl.int32, [Q_STAGES, BLOCK_M], vec_layout)
        row_smem = gl.allocate_shared_memory(gl.int32, [Q_STAGES, BLOCK_M], vec_layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        end_smem = gl.allocate_shared_memory(gl.int32, [NUM_STAGES, BLOCK_N], vec_layout)
        acc_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, HEAD_DIM], acc_layout)
        ml_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M], vec_layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [Q_STAGES, 1], bar_layout)
        q_empty = gl.allocate_shared_memory(gl.int64, [Q_STAGES, 1], bar_layout)
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
        merge_full = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
        merge_empty = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
        for i in gl.static_range(Q_STAGES):
            mbarrier.init(q_ready.index(i), count=PRODUCER_WARPS * 32)
            mbarrier.init(q_empty.index(i), count=2)  # both consumers read the Q tile
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(i), count=PRODUCER_WARPS * 32)
            mbarrier.init(v_ready.index(i), count=PRODUCER_WARPS * 32)
            mbarrier.init(empty.index(i), count=1)
        mbarrier.init(merge_full, count=1)
        mbarrier.init(merge_empty, count=1)
        gl.warp_specialize([
            (_split_consumer, (o_part_ptr, lse_part_ptr, counts_ptr, part_start_ptr,
                               part_tokens_ptr, part_entry_ptr, qk_scale,
                               q_smem, qf_smem, row_smem, k_smem, v_smem, end_smem, acc_smem,
                               ml_smem, q_ready, q_empty, k_ready, v_ready, empty, merge_full,
                               merge_empty, KV_HEADS, GROUP, GROUP_PAD, HEAD_DIM, BLOCK_M,
                               BLOCK_N, NUM_STAGES, Q_STAGES, THRESHOLD, MASK_FREE, dtype, 0)),
            (_split_consumer, (o_part_ptr, lse_part_ptr, counts_ptr, part_start_ptr,
                               part_tokens_ptr, part_entry_ptr, qk_scale,
                               q_smem, qf_smem, row_smem, k_smem, v_smem, end_smem, acc_smem,
                               ml_smem, q_ready, q_empty, k_ready, v_ready, empty, merge_full,
                               merge_empty, KV_HEADS, GROUP, GROUP_PAD, HEAD_DIM, BLOCK_M,
                               BLOCK_N, NUM_STAGES, Q_STAGES, THRESHOLD, MASK_FREE, dtype, 1)),
            (producer, (q_ptr, k_ptr, v_ptr, k_desc, v_desc, counts_ptr, part_start_ptr,
                        part_tokens_ptr, part_entry_ptr, entry_query_ptr, entry_row_ptr,
                        query_flat_ptr, token_slot_ptr, subtree_end_ptr,
                        stride_qn, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        q_smem, qf_smem, row_smem, k_smem, v_smem, end_smem,
                        q_ready, q_empty, k_ready, v_ready, empty, empty,
                        KV_HEADS, GROUP, GROUP_PAD, HEAD_DIM, BLOCK_M, BLOCK_N,
                        NUM_STAGES, Q_STAGES, SLOT_AHEAD, False, False, False, 0,
                        PRODUCER_WARPS)),
        ], [num_warps, PRODUCER_WARPS], [CONSUMER_REGS, PRODUCER_REGS])
else:  # pragma: no cover - no Gluon in this triton
    _partials_split_kernel = None


def launch_spec(kv_heads: int, group: int, head_dim: int, **overrides):
    """(kernel, constexprs, maxnreg, CTAs per SM) of the two-consumer kernel; the rescale
    threshold, SLOT_AHEAD and MASK_FREE are `deft_flatten_sm90`'s."""
    if sm90.LAZY_RESCALE:
        raise ValueError("the two-consumer kernel has no LAZY_RESCALE")
    values = dict(KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=1 << (group - 1).bit_length(),
                  HEAD_DIM=head_dim, BLOCK_M=sm90.BLOCK_M, BLOCK_N=sm90.BLOCK_N,
                  NUM_STAGES=NUM_STAGES, Q_STAGES=sm90.Q_STAGES,
                  THRESHOLD=sm90.RESCALE_THRESHOLD, SLOT_AHEAD=sm90.SLOT_AHEAD,
                  MASK_FREE=sm90.MASK_FREE, PRODUCER_WARPS=sm90.PRODUCER_WARPS,
                  PRODUCER_REGS=PRODUCER_REGS, CONSUMER_REGS=CONSUMER_REGS)
    values.update(overrides)
    return _partials_split_kernel, values, MAX_REGS, CTAS_PER_SM
