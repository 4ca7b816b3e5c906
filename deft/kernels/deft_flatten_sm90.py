"""DeFT-Flatten partials on Hopper (sm_90): a warp-specialised Gluon kernel.

Same work, inputs and outputs as `deft.kernels.partials._partials_kernel` in FLAT mode (read its
docstring): one work item per (partition, kv_head), the GQA heads of the KV head packed into the
rows of a 64-row query tile, Euler-tour visibility ``f <= F < subtree_end[f]`` per (token, query),
online softmax in fp32, and the partial rows (normalised o, natural-log lse) written where
`deft.kernels.reduction` merges them. So `TreeAttention` swaps it in for the Triton kernel
(`partials`) and keeps the plan and the merge.

Structure (one CTA = 8 warps; persistent over work items like the Triton kernel):

- a producer partition (a warpgroup of 4 warps, few registers) walks the same item / query-tile
  / KV-tile loops as the consumer and does all the address work: per KV tile of BLOCK_N tokens
  it reads the tokens' cache slots and gathers the K rows, then the V rows, with cp.async
  (16-byte copies) into a ring of NUM_STAGES shared-memory stages, plus the tile's
  ``subtree_end`` values (the mask's only per-token input). Columns past the partition are
  zero-filled (finite K/V; ``subtree_end`` 0 hides them). Each stage has a K-ready and a
  V-ready mbarrier (arrived by every producer thread when its copies land:
  ``cp.async.mbarrier.arrive.noinc``) and an empty mbarrier (arrived by the consumer when the
  stage's last wgmma has read it).
- the consumer (the default partition, one warpgroup) only waits, fences (cp.async writes are
  generic-proxy, wgmma reads async-proxy), and computes: S = Q K^T with wgmma (Q from shared
  memory, K^T a transposed view of the K stage), the mask from the Euler tour, the online
  softmax with exp2 and the softmax scale folded into the exponent's FMA, and O += P V with
  wgmma (P from registers). The running max is only moved (and O, l rescaled) when a row's max
  grows by more than RESCALE_THRESHOLD (log2 units): exact, since o and l share the stale max
  and the bound keeps exp2 of the scores below 2**RESCALE_THRESHOLD in fp32.

Gathers, not TMA boxes: a deft_flatten partition is a run of the flattened tree cut at
multiples of the chunk size, so its tokens start anywhere inside a page and cross node ends,
whose pages are padded; a box of page rows would need per-row fix-ups there. The cp.async
gather reads exactly the tokens the Triton kernel reads, for every page size.

Constraints (else `partials` falls back to the Triton kernel): fp16 or bf16, head_dim 64 or
128, GROUP (query heads per KV head) <= BLOCK_M, FLAT addressing, a CUDA device of compute
capability 9.x and a triton with Hopper Gluon. ``DEFT_BACKEND=triton`` forces the Triton kernel.
"""

from __future__ import annotations

import os

import torch

from deft.kernels import gluon_compat as gc
from deft.kernels.gluon_compat import HAS_GLUON

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

BLOCK_M = 64
"""Query rows per tile (queries x packed heads): one warpgroup's wgmma M."""
BLOCK_N = 64
"""KV tokens per tile (stage)."""
NUM_STAGES = 2
"""Shared-memory ring depth per CTA (K, V and subtree_end per stage): 2 stages of 64 tokens x
128 dims (64 KB) + the Q tile (16 KB), so two CTAs fit an SM (4 tiles in flight per SM); 3 stages
(112 KB) would leave one CTA per SM."""
CONSUMER_WARPS = 4
PRODUCER_WARPS = 4
PRODUCER_REGS = 72
"""Registers per producer thread (setmaxnreg; 56 spills); the consumer gets the rest of
MAX_REGS x 8 warps (184)."""
MAX_REGS = 128
"""Registers per thread of the kernel (two CTAs of 8 warps per SM)."""
RESCALE_THRESHOLD = 8.0
"""Move a row's running max only when it grows by more than this (log2 units, exact)."""
Q_IN_REGS = False
"""Q as wgmma's register operand instead of a shared tile. Off: at 128 registers it spills (88 B),
and its layout conversion takes as much scratch shared memory as the tile it saves."""
ROWS_PER_COPY = 16
"""Rows of a K/V tile one cp.async batch covers (the producer walks the tile in these)."""

BACKENDS = ("gluon", "triton")


def gluon_supported(device=None) -> tuple[bool, str]:
    """(whether the Gluon kernel can run on this device, why not)."""
    if not HAS_GLUON:
        return False, gc.WHY_NOT
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, _ = torch.cuda.get_device_capability(device)
    if major != 9:
        return False, f"compute capability {major}.x is not Hopper (9.x)"
    return True, ""


def resolve_backend(strategy: str, backend: str | None, device) -> str:
    """The partials backend of a `TreeAttention`: "gluon" or "triton".

    ``backend`` (or else the environment variable ``DEFT_BACKEND``) forces one; by default
    deft_flatten runs the Gluon kernel where it can (Hopper, Gluon importable), everything else
    the Triton kernel. Forcing "gluon" where it cannot run raises.
    """
    choice = backend or os.environ.get("DEFT_BACKEND") or None
    if choice is not None and choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    device = torch.device(device)
    if choice == "triton" or device.type != "cuda":
        if choice == "gluon":
            raise ValueError(f"the Gluon backend needs a Hopper CUDA device, got {device}")
        return "triton"
    ok, why = gluon_supported(device)
    if choice == "gluon":
        if not ok:
            raise ValueError(f"the Gluon backend cannot run here: {why}")
        return "gluon"
    return "gluon" if ok and strategy == "deft_flatten" else "triton"


def fits(q, k_cache, flat: bool) -> bool:
    """Whether a call's shapes and dtypes are ones the Gluon kernel takes."""
    head_dim, kv_heads = k_cache.shape[3], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    return (flat and q.dtype in (torch.float16, torch.bfloat16) and head_dim in (64, 128)
            and group <= BLOCK_M and q.is_cuda)


if HAS_GLUON:
    gluon, gl = gc.gluon, gc.gl
    mbarrier, async_copy = gc.mbarrier, gc.async_copy
    fence_async_shared = gc.fence_async_shared
    warpgroup_mma, warpgroup_mma_wait = gc.warpgroup_mma, gc.warpgroup_mma_wait
    async_load, cta_barrier = gc.async_load, gc.cta_barrier

    @gluon.jit
    def _producer(k_ptr, v_ptr, counts_ptr, part_start_ptr, part_tokens_ptr, part_entry_ptr,
                  token_slot_ptr, subtree_end_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                  k_smem, v_smem, end_smem, k_ready, v_ready, empty,
                  KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                  ROWS: gl.constexpr, WARPS: gl.constexpr):
        QUERIES_PER_TILE: gl.constexpr = BLOCK_M // GROUP
        VEC: gl.constexpr = 8  # 16-byte copies of 16-bit elements
        TPR: gl.constexpr = HEAD_DIM // VEC  # threads along a row
        copy_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TPR, TPR], [WARPS, 1],
                                                     [1, 0])
        end_layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, copy_layout))
        dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, copy_layout))
        cols = gl.arange(0, BLOCK_N, layout=end_layout)
        num_items = gl.load(counts_ptr) * KV_HEADS
        it = 0
        for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
            part = item // KV_HEADS
            kv_head = item % KV_HEADS
            token_start = gl.load(part_start_ptr + part)
            num_tokens = gl.load(part_tokens_ptr + part)
            entry_lo = gl.load(part_entry_ptr + part)
            entry_hi = gl.load(part_entry_ptr + part + 1)
            k_head = k_ptr + kv_head.to(gl.int64) * stride_kh
            v_head = v_ptr + kv_head.to(gl.int64) * stride_vh
            slot_base = token_slot_ptr + token_start
            end_base = subtree_end_ptr + token_start
            for entry0 in range(entry_lo, entry_hi, QUERIES_PER_TILE):
                for n0 in range(0, num_tokens, BLOCK_N):
                    stage = it % NUM_STAGES
                    phase = (it // NUM_STAGES) & 1
                    mbarrier.wait(empty.index(stage), phase ^ 1)
                    k_stage = k_smem.index(stage)
                    v_stage = v_smem.index(stage)
                    col = n0 + cols
                    async_load(end_smem.index(stage), end_base + col, mask=col < num_tokens)
                    for r in gl.static_range(0, BLOCK_N, ROWS):
                        row = n0 + r + rows
                        ok = row < num_tokens
                        slot = gl.load(slot_base + row, mask=ok, other=0)
                        offs = slot.to(gl.int64)[:, None] * stride_kt + dims[None, :]
                        async_load(k_stage.slice(r, ROWS), k_head + offs, mask=ok[:, None])
                    async_copy.mbarrier_arrive(k_ready.index(stage), increment_count=False)
                    for r in gl.static_range(0, BLOCK_N, ROWS):
                        row = n0 + r + rows
                        ok = row < num_tokens
                        slot = gl.load(slot_base + row, mask=ok, other=0)
                        offs = slot.to(gl.int64)[:, None] * stride_vt + dims[None, :]
                        async_load(v_stage.slice(r, ROWS), v_head + offs, mask=ok[:, None])
                    async_copy.mbarrier_arrive(v_ready.index(stage), increment_count=False)
                    it += 1

    @gluon.jit
    def _consumer(q_ptr, o_part_ptr, lse_part_ptr, counts_ptr, part_start_ptr, part_tokens_ptr,
                  part_entry_ptr, entry_query_ptr, entry_row_ptr, query_flat_ptr,
                  stride_qn, stride_qh, qk_scale,
                  q_smem, k_smem, v_smem, end_smem, k_ready, v_ready, empty,
                  KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                  THRESHOLD: gl.constexpr, Q_IN_REGS: gl.constexpr, WARPS: gl.constexpr):
        QUERIES_PER_TILE: gl.constexpr = BLOCK_M // GROUP
        Q_HEADS: gl.constexpr = KV_HEADS * GROUP
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                     k_width=2)
        q_op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout,
                                                        k_width=2)
        q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8],
                                                  [WARPS, 1], [1, 0])
        s_rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_rows_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = q_ptr.dtype.element_ty

        q_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
        q_dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, q_layout))
        s_rows = gl.arange(0, BLOCK_M, layout=s_rows_layout)
        s_cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        o_rows = gl.arange(0, BLOCK_M, layout=o_rows_layout)
        o_dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))

        num_items = gl.load(counts_ptr) * KV_HEADS
        it = 0
        for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
            part = item // KV_HEADS
            kv_head = item % KV_HEADS
            token_start = gl.load(part_start_ptr + part)
            num_tokens = gl.load(part_tokens_ptr + part)
            entry_lo = gl.load(part_entry_ptr + part)
            entry_hi = gl.load(part_entry_ptr + part + 1)
            for entry0 in range(entry_lo, entry_hi, QUERIES_PER_TILE):
                # the query tile: rows = query slot x GROUP + head in group
                q_slot = q_rows // GROUP
                q_entry = entry0 + q_slot
                q_ok = (q_slot < QUERIES_PER_TILE) & (q_entry < entry_hi)
                query = gl.load(entry_query_ptr + q_entry, mask=q_ok, other=0)
                q_off = (query.to(gl.int64) * stride_qn
                         + (kv_head * GROUP + q_rows % GROUP) * stride_qh)
                q = gl.load(q_ptr + q_off[:, None] + q_dims[None, :], mask=q_ok[:, None],
                            other=0.0)
                if Q_IN_REGS:  # wgmma's A operand from registers (no Q tile in shared memory)
                    q_op = gl.convert_layout(q, q_op_layout)
                else:
                    cta_barrier()  # every warp is done with the previous tile's Q
                    q_smem.store(q)
                    fence_async_shared()
                    cta_barrier()  # the whole Q tile is written before any wgmma reads it
                    q_op = q_smem

                s_slot = s_rows // GROUP
                s_entry = entry0 + s_slot
                s_ok = (s_slot < QUERIES_PER_TILE) & (s_entry < entry_hi)
                s_query = gl.load(entry_query_ptr + s_entry, mask=s_ok, other=0)
                query_flat = gl.load(query_flat_ptr + s_query, mask=s_ok, other=-1)
                # raw (unscaled) scores; a row that has seen nothing keeps m = -inf
                m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=s_rows_layout)
                l_i = gl.zeros([BLOCK_M], gl.float32, layout=s_rows_layout)
                acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
                for n0 in range(0, num_tokens, BLOCK_N):
                    stage = it % NUM_STAGES
                    phase = (it // NUM_STAGES) & 1
                    mbarrier.wait(k_ready.index(stage), phase)
                    fence_async_shared()  # cp.async (generic proxy) -> wgmma (async proxy)
                    s = warpgroup_mma(q_op, k_smem.index(stage).permute((1, 0)),
                                      gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout),
                                      use_acc=False, is_async=True)
                    end = end_smem.index(stage).load(gl.SliceLayout(0, s_layout))
                    flat = token_start + n0 + s_cols
                    visible = (flat[None, :] <= query_flat[:, None]) & (
                        query_flat[:, None] < end[None, :])
                    s = warpgroup_mma_wait(0, deps=[s])
                    s = gl.where(visible, s, float("-inf"))
                    m_tile = gl.max(s, 1)
                    grow = (m_tile - m_i) * qk_scale > THRESHOLD
                    # exact lazy rescale: keep the stale max unless it is passed by more than
                    # THRESHOLD (then p <= 2**THRESHOLD); a -inf max is always replaced
                    m_new = gl.where(grow, gl.maximum(m_i, m_tile), m_i)
                    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
                    m_scaled = m_safe * qk_scale
                    p = gl.exp2(s * qk_scale - m_scaled[:, None])
                    alpha = gl.exp2(m_i * qk_scale - m_scaled)
                    alpha = gl.where(m_i == m_new, 1.0, alpha)
                    l_i = l_i * alpha + gl.sum(p, 1)
                    m_i = m_new
                    acc = acc * gl.convert_layout(alpha, o_rows_layout)[:, None]
                    p16 = gl.convert_layout(p.to(dtype), p_layout)
                    mbarrier.wait(v_ready.index(stage), phase)
                    fence_async_shared()
                    acc = warpgroup_mma(p16, v_smem.index(stage), acc, is_async=True)
                    acc = warpgroup_mma_wait(0, deps=[acc])
                    mbarrier.arrive(empty.index(stage), count=1)
                    it += 1
                seen = l_i > 0
                l_safe = gl.where(seen, l_i, 1.0)
                lse = gl.where(seen, (m_i * qk_scale + gl.log2(l_safe)) * 0.6931471805599453,
                               float("-inf"))
                row = gl.load(entry_row_ptr + s_entry, mask=s_ok, other=0)
                lse_rows = row.to(gl.int64) * Q_HEADS + kv_head * GROUP + s_rows % GROUP
                gl.store(lse_part_ptr + lse_rows, lse, mask=s_ok)
                o_slot = o_rows // GROUP
                o_entry = entry0 + o_slot
                o_ok = (o_slot < QUERIES_PER_TILE) & (o_entry < entry_hi)
                o_row = gl.load(entry_row_ptr + o_entry, mask=o_ok, other=0)
                o_off = (o_row.to(gl.int64) * Q_HEADS + kv_head * GROUP + o_rows % GROUP) * HEAD_DIM
                o = acc / gl.convert_layout(l_safe, o_rows_layout)[:, None]
                gl.store(o_part_ptr + o_off[:, None] + o_dims[None, :], o, mask=o_ok[:, None])

    @gluon.jit
    def _partials_sm90_kernel(
        q_ptr, k_ptr, v_ptr, o_part_ptr, lse_part_ptr,
        counts_ptr, part_start_ptr, part_tokens_ptr, part_entry_ptr, entry_query_ptr,
        entry_row_ptr, query_flat_ptr, token_slot_ptr, subtree_end_ptr,
        stride_qn, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        qk_scale,
        KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
        ROWS: gl.constexpr, THRESHOLD: gl.constexpr, PRODUCER_WARPS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr, END_ROWS: gl.constexpr, Q_IN_REGS: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        dtype: gl.constexpr = k_ptr.dtype.element_ty
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM],
                                                                           dtype)
        end_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        q_smem = gl.allocate_shared_memory(dtype, [1 if Q_IN_REGS else BLOCK_M, HEAD_DIM],
                                           q_smem_layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        # a power-of-two number of rows (swizzled shared allocations need it); NUM_STAGES used
        end_smem = gl.allocate_shared_memory(gl.int32, [END_ROWS, BLOCK_N], end_layout)
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(i), count=PRODUCER_WARPS * 32)
            mbarrier.init(v_ready.index(i), count=PRODUCER_WARPS * 32)
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize([
            (_consumer, (q_ptr, o_part_ptr, lse_part_ptr, counts_ptr, part_start_ptr,
                         part_tokens_ptr, part_entry_ptr, entry_query_ptr, entry_row_ptr,
                         query_flat_ptr, stride_qn, stride_qh, qk_scale,
                         q_smem, k_smem, v_smem, end_smem, k_ready, v_ready, empty,
                         KV_HEADS, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, THRESHOLD,
                         Q_IN_REGS, num_warps)),
            (_producer, (k_ptr, v_ptr, counts_ptr, part_start_ptr, part_tokens_ptr,
                         part_entry_ptr, token_slot_ptr, subtree_end_ptr,
                         stride_kt, stride_kh, stride_vt, stride_vh,
                         k_smem, v_smem, end_smem, k_ready, v_ready, empty,
                         KV_HEADS, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, ROWS,
                         PRODUCER_WARPS)),
        ], [PRODUCER_WARPS], [PRODUCER_REGS])
else:  # pragma: no cover - no Gluon in this triton
    _partials_sm90_kernel = None


def constexprs(kv_heads: int, group: int, head_dim: int, **overrides) -> dict:
    """The compile-time parameters of `_partials_sm90_kernel` for a head shape."""
    values = dict(KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_M=BLOCK_M,
                  BLOCK_N=BLOCK_N, NUM_STAGES=NUM_STAGES, ROWS=ROWS_PER_COPY,
                  THRESHOLD=RESCALE_THRESHOLD, PRODUCER_WARPS=PRODUCER_WARPS,
                  PRODUCER_REGS=PRODUCER_REGS, Q_IN_REGS=Q_IN_REGS)
    values.update(overrides)
    values["END_ROWS"] = 1 << (values["NUM_STAGES"] - 1).bit_length()
    return values


def partials(q, k_cache, v_cache, o_part, lse_part, buffers, *, flat: bool, sm_scale: float,
             config, num_programs: int) -> None:
    """`deft.kernels.partials.partials` on the Gluon kernel (same arguments, same outputs).

    Calls the Triton kernel instead where the Gluon kernel does not take the inputs (`fits`).
    """
    if not fits(q, k_cache, flat):
        from deft.kernels.partials import partials as triton_partials

        triton_partials(q, k_cache, v_cache, o_part, lse_part, buffers, flat=flat,
                        sm_scale=sm_scale, config=config, num_programs=num_programs)
        return
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // kv_heads
    _partials_sm90_kernel[(num_programs,)](
        q, k_cache, v_cache, o_part, lse_part,
        buffers["counts"], buffers["part_start"], buffers["part_tokens"], buffers["part_entry"],
        buffers["entry_query"], buffers["entry_row"], buffers["query_flat"], buffers["token_slot"],
        buffers["subtree_end"],
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(1), v_cache.stride(2),
        sm_scale * LOG2E,
        **constexprs(kv_heads, group, head_dim),
        num_warps=CONSUMER_WARPS, maxnreg=MAX_REGS,
    )


# ---------------------------------------------------------------------------- compile-only checks
_ARG_TYPES = dict(
    o_part_ptr="*fp32", lse_part_ptr="*fp32",
    counts_ptr="*i32", part_start_ptr="*i32", part_tokens_ptr="*i32", part_entry_ptr="*i32",
    entry_query_ptr="*i32", entry_row_ptr="*i32", query_flat_ptr="*i32", token_slot_ptr="*i32",
    subtree_end_ptr="*i32", stride_qn="i32", stride_qh="i32", stride_kt="i32", stride_kh="i32",
    stride_vt="i32", stride_vh="i32", qk_scale="fp32",
)


def compile_for_sm90(dtype: str = "fp16", kv_heads: int = 8, group: int = 4,
                     head_dim: int = 128, **overrides):
    """Compile `_partials_sm90_kernel` for sm_90a without a GPU (triton's own ptxas).

    Returns the `CompiledKernel` (``asm["ptx"]``, ``asm["cubin"]``); `ptxas_report` reads its
    register and spill counts.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    signature = dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", v_ptr=f"*{dtype}", **_ARG_TYPES)
    consts = constexprs(kv_heads, group, head_dim, **overrides)
    consts["num_warps"] = CONSUMER_WARPS
    names = _partials_sm90_kernel.arg_names
    signature = {n: signature.get(n, "constexpr") for n in names}
    # what the launcher specializes on at run time: 16-byte aligned tensors, strides % 16 == 0
    aligned = [n for n in names if n.endswith("_ptr") or n.startswith("stride_")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = GluonASTSource(fn=_partials_sm90_kernel, signature=signature,
                            constexprs={(names.index(k),): v for k, v in consts.items()},
                            attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=CONSUMER_WARPS, maxnreg=MAX_REGS))


def ptxas_report(compiled) -> str:
    """``ptxas -v`` (sm_90a) of a compiled kernel's PTX: registers, spills, warnings (C7515)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    path = get_ptxas(90).path  # (arch) in triton 3.6 and 3.9 alike
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        done = subprocess.run([path, "-v", "--gpu-name", "sm_90a", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    return done.stdout + done.stderr
