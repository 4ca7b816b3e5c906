"""DeFT-Flatten partials on Hopper (sm_90): a warp-specialised Gluon kernel.

Same work, inputs and outputs as `deft.kernels.partials._partials_kernel` in FLAT mode (read its
docstring): one work item per (partition, kv_head), the GQA heads of the KV head packed into the
rows of a 64-row query tile, Euler-tour visibility ``f <= F < subtree_end[f]`` per (token, query),
online softmax in fp32, and the partial rows (normalised o, natural-log lse) written where
`deft.kernels.reduction` merges them. So `TreeAttention` swaps it in for the Triton kernel
(`partials`) and keeps the plan and the merge.

Structure (one CTA = 8 warps; persistent over work items like the Triton kernel):

- a producer partition (a warpgroup of 4 warps, few registers;
  `deft.kernels.deft_flatten_sm90_producer`) walks the same item / query-tile / KV-tile loops
  as the consumer and does all the address work and every load. Per query tile
  it gathers the Q rows (query slot x GROUP + head) and the rows' ``query_flat`` and
  ``entry_row`` into one of Q_STAGES shared buffers; per KV tile of BLOCK_N tokens it reads the
  tokens' cache slots one tile ahead and gathers the K rows, then the V rows, with cp.async
  (16-byte copies) into a ring of NUM_STAGES shared-memory stages, plus the tile's
  ``subtree_end`` values (the mask's only per-token input). Columns past the partition are
  zero-filled (finite K/V; ``subtree_end`` 0 hides them). Each stage has ready mbarriers
  (arrived by every producer thread when its copies land: ``cp.async.mbarrier.arrive.noinc``)
  and an empty mbarrier (arrived by the consumer when the stage's last wgmma has read it).
- the consumer (the default partition, one warpgroup; `deft.kernels.deft_flatten_sm90_serial`,
  or the pipelined one below) only waits, fences (cp.async writes are
  generic-proxy, wgmma reads async-proxy), and computes: S = Q K^T with wgmma (Q from shared
  memory, K^T a transposed view of the K stage), the mask from the Euler tour, the online
  softmax with exp2 and the softmax scale folded into the exponent's FMA, and O += P V with
  wgmma (P from registers). A row's running max only moves when the tile's max passes it by
  more than RESCALE_THRESHOLD (log2 units; exact, since o and l share the stale max and p stays
  below 2**RESCALE_THRESHOLD); `LAZY_RESCALE` would also skip the O/l multiply on such tiles.

Two CTAs per SM (2 KV stages + 2 Q tiles each: 100 KB shared memory, 128 registers per thread:
160 for the consumer, 96 for the producer by setmaxnreg), so one CTA's softmax overlaps the
other's loads and wgmma. Measured on an H200 (scripts/gluon_check.py, triton 3.6, CUDA graph of
4 calls on 4 KV copies, page size 16, the tuned plans): 1.16-1.62x faster than the Triton kernel
on every anchor at 32/8/128, 16/2/128, 8/1/128 and 4/1/128 (geomean 1.31x over the 24 cells).
Slower or no better there: 32-token tiles x 4 stages; one CTA per SM with 5 stages (better on a
few 16/2 and 8/1 cells, worse at 32/8); chunks shrunk until the work items fill the SMs (the
tuned chunks leave SMs idle at 1 KV head, yet smaller chunks cost more in re-read query tiles
and merge than the idle SMs do).

A plan whose work items fit one CTA per SM (`TreePlan.small_grid`) has no second CTA to overlap
with: it runs the small-grid form, one CTA per SM (`SMALL_GRID`) with a 4-stage ring and the
consumer's tile loop software-pipelined (`deft.kernels.deft_flatten_sm90_pipelined`: tile j's Q
K^T is issued before tile j-1's P V, so one tile's softmax runs while the other's wgmma does;
240 consumer registers, which two CTAs per SM cannot give it).

Variants for issue #15 (`scripts/gluon_check.py --variants`, H200, 2026-12-01, CUDA graph over
4 KV copies, 32/8/128): ``MASK_FREE`` (no mask on tiles every row sees whole) is the default:
0.88-0.95x the time of the masked kernel on fewshot_b50, spec_t64, spec_t256 and long_P20000,
equal within 1% on fewshot_b20 and reason_10x500. Off: ``TWO_CONSUMERS``
(`deft.kernels.deft_flatten_sm90_split`: two consumer warpgroups per CTA split the KV tiles, one
CTA per SM, 4 stages), 1.03-1.16x slower on all six anchors at 32/8, with or without
``SLOT_AHEAD`` = 2 (cache slots read two tiles ahead); not yet timed at the shard shapes.
Measured and removed (session 12, all four shapes; docs/performance.md): two consumers on two
query tiles sharing every K/V stage, and a stage's K half freed once S is computed: neither
fewer gathers per query row nor an earlier K refill moves the two-CTA kernel, which is bound by
its consumers' serial chain per tile.

Gathers by default, TMA boxes as a variant (``TMA_KV``): a deft_flatten partition is a run of
the flattened tree cut at multiples of the chunk size, so its tokens start anywhere inside a page
and cross node ends, whose pages are padded; the cp.async gather reads exactly the tokens the
Triton kernel reads, for every page size. With TMA_KV the producer checks each KV tile
(`deft.kernels.deft_flatten_sm90_producer.whole_runs`): one that lies whole in its partition on
runs of `tma_rows` consecutive cache slots (a node's pages, away from its ends) is copied by TMA
boxes of one page, the rest gathered. Measured on an H200 (session 15, scripts/gluon_check.py
--variants tma, the 24 anchor cells at page size 16): correct on every check, but no faster,
0.95-1.08x the gather's time, 1.02x by geomean (more than 1% faster on 4 cells, slower on 15):
the kernel is bound by its consumers' chain per tile, and triton inserts a barrier of the
producer's warps after each box (8 a tile at page size 16). So it stays off.

Constraints (else `partials` falls back to the Triton kernel): fp16 or bf16, head_dim 64 or
128, GROUP (query heads per KV head) <= BLOCK_M, FLAT addressing, a CUDA device of compute
capability 9.x and a triton with Hopper Gluon. ``DEFT_BACKEND=triton`` forces the Triton kernel.
Backend choice: `deft.kernels.deft_flatten_sm90_backend` (re-exported here); CPU-only sm_90a
compile and ptxas checks: `deft.kernels.deft_flatten_sm90_compile`.
"""

from __future__ import annotations

import os

import torch

from deft.kernels import gluon_compat as gc
from deft.kernels.deft_flatten_sm90_backend import gluon_supported, resolve_backend  # noqa: F401
from deft.kernels.deft_flatten_sm90_pipelined import consumer_pipelined
from deft.kernels.deft_flatten_sm90_producer import producer
from deft.kernels.deft_flatten_sm90_serial import consumer_serial
from deft.kernels.fill import multiprocessors
from deft.kernels.gluon_compat import HAS_GLUON

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

BLOCK_M = 64
"""Query rows per tile (queries x packed heads): one warpgroup's wgmma M."""
BLOCK_N = 64
"""KV tokens per tile (stage)."""
NUM_STAGES = 2
"""K/V ring depth per CTA (K, V and subtree_end per stage): 2 stages of 64 tokens x 128 dims
(64 KB) + 2 Q tiles (32 KB), so two CTAs fit an SM (4 KV tiles in flight per SM)."""
Q_STAGES = 2
"""Query tiles in flight (the producer gathers the next one while the consumer finishes one)."""
CTAS_PER_SM = 2
"""Resident CTAs per SM the grid is capped at (shared memory and registers allow 2)."""
CONSUMER_WARPS = 4
PRODUCER_WARPS = 4
PRODUCER_REGS = 96
"""Registers per producer thread (setmaxnreg; 88 spills at GROUP 64); the consumer gets the rest of
MAX_REGS x 8 warps (160)."""
MAX_REGS = 128
"""Registers per thread of the kernel (two CTAs of 8 warps per SM)."""
RESCALE_THRESHOLD = 8.0
"""Move a row's running max only when it grows by more than this (log2 units, exact)."""
LAZY_RESCALE = False
"""True: skip the O and l rescale on tiles where no row's max moves (a branch uniform over the
consumer warpgroup, after one cross-warp max per tile). Measured on an H200 it is no faster at
32/8 and 16/2 and 5-15% slower at 8/1 and 4/1, so off: O and l are rescaled every tile (by 1 on
rows whose max stays). The pipelined consumer (``PIPELINE``, so the small-grid kernel) has no
lazy path and ignores it."""
SLOT_AHEAD = 1
"""KV tiles ahead the producer reads cache slots: 1 (the next tile's, behind this tile's
gathers) or 2 (two tiles ahead, so the slot-load -> gather dependency spans two tiles). 2 needs
more producer registers than the two-CTA kernel has (it spills at 96, 104 and 112): use it
with TWO_CONSUMERS, whose producer has 120."""
MASK_FREE = True
"""True: skip the Euler-tour mask on tiles every row of the query tile sees whole (one
uniform branch per tile, after a min over the tile's subtree_end); measured faster (above)."""
EARLY_DEPENDENTS = False
"""True: each CTA signals ``griddepcontrol.launch_dependents`` on entry, so the merge (launched
as a programmatic dependent, `deft.kernels.reduction.PDL_MERGE`) may be scheduled while this
kernel runs, its CTAs held at ``griddepcontrol.wait`` until this grid ends; False: the merge is
released as this kernel's CTAs exit."""
PDL_PARTIALS = os.environ.get("DEFT_PDL_PARTIALS", "1") != "0"
"""Whether the partials kernel launches as a programmatic dependent of the kernel before it on
the stream (read once from ``DEFT_PDL_PARTIALS``, "0" for off; default on). Its CTAs may then
start as that kernel's CTAs finish: the producer reads the plan buffers (the work item, the
rows' entries, the first tiles' cache slots: uploaded before that kernel ran) and waits
(``griddepcontrol.wait``) only before its first Q and K/V loads, which that kernel may have
written; the partial rows are stored after that wait, so a merge still reading the last call's
partials is done with them. After a copy (a plan upload) or as a graph's first node the launch
is an ordinary one. A `TreeAttention` captures its launches in CUDA graphs, so change it
before its first `run`."""
PREFETCH_ITEM = True
"""True: the producer loads its first work item's plan data beside the item count
(`deft.kernels.deft_flatten_sm90_tiles.first_work_item`), so the chain before its first
copies is one global load shorter (most programs of a small grid run one item). Not where a
query tile holds one query (GROUP > BLOCK_M / 2): the five values held across the item loop
spill the producer's 96 registers there. Measured on an H200 (scripts/gluon_check.py
--variants, session 10, graph of 4 calls, 18 cells at 32/8, 8/1 and 4/1): 0.987x the time by
geomean, faster on 13 (reason_10x500 9.56 / 9.97 us at 4/1, spec_t256 60.63 / 63.38 at 32/8),
slower on 4 (fewshot_b50 at 4/1 12.86 / 12.23)."""
PIPELINE = False
"""True: the consumer's tile loop is software-pipelined
(`deft.kernels.deft_flatten_sm90_pipelined`): tile j's Q K^T is issued before tile j-1's P V,
so the softmax of one tile overlaps the other's wgmma; K and V stages are released apart
(``v_empty``), so 2 stages still keep a tile of slack."""
SMALL_GRID_PIPELINE = True
"""True: a plan whose work items fit one CTA per SM (`deft.tree_plan.TreePlan.small_grid`) runs
the kernel with SMALL_GRID's parameters, one CTA per SM with SMALL_GRID_MAX_REGS registers a
thread (240 for the consumer): the pipelined consumer, which needs more registers than two CTAs
per SM leave. Measured on an H200 (scripts/gluon_check.py, 2026-12-01): 0.87-1.02x the time of
the two-CTA kernel on the six cells of the anchors with at most 132 work items, 1.14-1.28x on
the eighteen with more (two CTAs per SM then hide each other's latency)."""
SMALL_GRID = dict(PIPELINE=True, NUM_STAGES=4)
SMALL_GRID_MAX_REGS = 168
TMA_KV = False
"""True: the producer copies a KV tile with TMA boxes of `tma_rows` (page size) cache rows
where the tile lies whole in its partition on runs of consecutive slots (`deft.kernels.
deft_flatten_sm90_producer.whole_runs`, checked per tile: a node's pages, away from its ends),
and gathers it with cp.async elsewhere (node ends, partition tails, page sizes that are not a
multiple of 8). Needs contiguous caches (a 2-D descriptor over ``[pages x page_size, kv_heads x
head_dim]``)."""
TWO_CONSUMERS = False
"""True: run `deft.kernels.deft_flatten_sm90_split` instead (two consumer warpgroups per CTA
splitting each work item's KV tiles, one CTA per SM, a 4-stage ring)."""

def takes(dtype: torch.dtype, head_dim: int, group: int) -> bool:
    """Whether the Gluon kernel takes attention of this dtype, head dim and query heads per KV
    head (the IO model copies the rule: `iomodel.kernel_model.gluon`)."""
    return dtype in (torch.float16, torch.bfloat16) and head_dim in (64, 128) and group <= BLOCK_M


def fits(q, k_cache, flat: bool) -> bool:
    """Whether a call's shapes and dtypes are ones the Gluon kernel takes."""
    head_dim, kv_heads = k_cache.shape[3], k_cache.shape[2]
    return flat and q.is_cuda and takes(q.dtype, head_dim, q.shape[1] // kv_heads)


if HAS_GLUON:
    gluon, gl = gc.gluon, gc.gl
    mbarrier = gc.mbarrier

    @gluon.jit
    def _consumer(o_part_ptr, lse_part_ptr, counts_ptr, part_start_ptr, part_tokens_ptr,
                  part_entry_ptr, qk_scale,
                  q_smem, qf_smem, row_smem, k_smem, v_smem, end_smem,
                  q_ready, q_empty, k_ready, v_ready, empty, v_empty,
                  KV_HEADS: gl.constexpr, GROUP: gl.constexpr, GROUP_PAD: gl.constexpr,
                  HEAD_DIM: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                  Q_STAGES: gl.constexpr, THRESHOLD: gl.constexpr, LAZY: gl.constexpr,
                  MASK_FREE: gl.constexpr, PIPELINE: gl.constexpr,
                  DTYPE: gl.constexpr, WARPS: gl.constexpr):
        """The consumer partition: `deft.kernels.deft_flatten_sm90_pipelined` (PIPELINE) or
        `deft.kernels.deft_flatten_sm90_serial`."""
        if PIPELINE:
            consumer_pipelined(o_part_ptr, lse_part_ptr, counts_ptr, part_start_ptr,
                                part_tokens_ptr, part_entry_ptr, qk_scale,
                                q_smem, qf_smem, row_smem, k_smem, v_smem, end_smem,
                                q_ready, q_empty, k_ready, v_ready, empty, v_empty,
                                KV_HEADS, GROUP, GROUP_PAD, HEAD_DIM, BLOCK_M, BLOCK_N,
                                NUM_STAGES, Q_STAGES, THRESHOLD, MASK_FREE, DTYPE, WARPS)
        else:
            consumer_serial(o_part_ptr, lse_part_ptr, counts_ptr, part_start_ptr,
                            part_tokens_ptr, part_entry_ptr, qk_scale,
                            q_smem, qf_smem, row_smem, k_smem, v_smem, end_smem,
                            q_ready, q_empty, k_ready, v_ready, empty,
                            KV_HEADS, GROUP, GROUP_PAD, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES,
                            Q_STAGES, THRESHOLD, LAZY, MASK_FREE, DTYPE, WARPS)

    @gluon.jit
    def _partials_sm90_kernel(
        q_ptr, k_ptr, v_ptr, k_desc, v_desc, o_part_ptr, lse_part_ptr,
        counts_ptr, part_start_ptr, part_tokens_ptr, part_entry_ptr, entry_query_ptr,
        entry_row_ptr, query_flat_ptr, token_slot_ptr, subtree_end_ptr,
        stride_qn, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        qk_scale,
        KV_HEADS: gl.constexpr, GROUP: gl.constexpr, GROUP_PAD: gl.constexpr,
                  HEAD_DIM: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
        Q_STAGES: gl.constexpr, THRESHOLD: gl.constexpr, LAZY: gl.constexpr,
        SLOT_AHEAD: gl.constexpr, MASK_FREE: gl.constexpr, PIPELINE: gl.constexpr,
        PRODUCER_WARPS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
        EARLY_DEPENDENTS: gl.constexpr, WAIT_FOR_PRIOR_GRID: gl.constexpr,
        PREFETCH_ITEM: gl.constexpr, TMA_ROWS: gl.constexpr, num_warps: gl.constexpr,
    ):
        if EARLY_DEPENDENTS:  # the merge may launch now; griddepcontrol.wait holds it back
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                                      dtype=gl.int32, is_pure=False, pack=1)
        dtype: gl.constexpr = k_ptr.dtype.element_ty
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        q_smem = gl.allocate_shared_memory(dtype, [Q_STAGES, BLOCK_M, HEAD_DIM], q_layout)
        qf_smem = gl.allocate_shared_memory(gl.int32, [Q_STAGES, BLOCK_M], vec_layout)
        row_smem = gl.allocate_shared_memory(gl.int32, [Q_STAGES, BLOCK_M], vec_layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        end_smem = gl.allocate_shared_memory(gl.int32, [NUM_STAGES, BLOCK_N], vec_layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [Q_STAGES, 1], bar_layout)
        q_empty = gl.allocate_shared_memory(gl.int64, [Q_STAGES, 1], bar_layout)
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
        if PIPELINE:  # V stages released apart from K stages
            v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
        else:
            v_empty = empty
        for i in gl.static_range(Q_STAGES):
            mbarrier.init(q_ready.index(i), count=PRODUCER_WARPS * 32)
            mbarrier.init(q_empty.index(i), count=1)
        # every producer thread arrives on a ready barrier, plus one arrival (with TMA_ROWS):
        # a TMA tile's expected bytes, or a gathered tile's plain arrive
        READY: gl.constexpr = PRODUCER_WARPS * 32 + (1 if TMA_ROWS > 0 else 0)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(i), count=READY)
            mbarrier.init(v_ready.index(i), count=READY)
            mbarrier.init(empty.index(i), count=1)
            if PIPELINE:
                mbarrier.init(v_empty.index(i), count=1)
        gl.warp_specialize([
            (_consumer, (o_part_ptr, lse_part_ptr, counts_ptr, part_start_ptr,
                         part_tokens_ptr, part_entry_ptr, qk_scale,
                         q_smem, qf_smem, row_smem, k_smem, v_smem, end_smem,
                         q_ready, q_empty, k_ready, v_ready, empty, v_empty,
                         KV_HEADS, GROUP, GROUP_PAD, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES,
                         Q_STAGES, THRESHOLD, LAZY, MASK_FREE, PIPELINE, dtype, num_warps)),
            (producer, (q_ptr, k_ptr, v_ptr, k_desc, v_desc, counts_ptr, part_start_ptr,
                        part_tokens_ptr, part_entry_ptr, entry_query_ptr, entry_row_ptr,
                        query_flat_ptr, token_slot_ptr, subtree_end_ptr,
                        stride_qn, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        q_smem, qf_smem, row_smem, k_smem, v_smem, end_smem,
                        q_ready, q_empty, k_ready, v_ready, empty, v_empty,
                        KV_HEADS, GROUP, GROUP_PAD, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES,
                        Q_STAGES, SLOT_AHEAD, PIPELINE, WAIT_FOR_PRIOR_GRID,
                        PREFETCH_ITEM, TMA_ROWS, PRODUCER_WARPS)),
        ], [PRODUCER_WARPS], [PRODUCER_REGS])
else:  # pragma: no cover - no Gluon in this triton
    _partials_sm90_kernel = None


def tma_rows(page_size: int) -> int:
    """Cache rows of one TMA box for a page size: the largest power of two that divides it, up
    to BLOCK_N, or 0 (no TMA) where that is below 8 (a box must be 16-byte aligned per row
    group) or `TMA_KV` is off."""
    rows = page_size & -page_size
    return min(rows, BLOCK_N) if TMA_KV and rows >= 8 else 0


def kv_descriptors(k_cache, v_cache, rows: int):
    """TMA descriptors of the caches as ``[pages x page_size, kv_heads x head_dim]`` with boxes
    of ``rows`` x head_dim in the KV stages' shared layout; the caches themselves where
    ``rows`` is 0 (the kernel does not read the argument then)."""
    if not rows:
        return k_cache, v_cache
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    head_dim = k_cache.shape[3]
    element = gl.float16 if k_cache.dtype == torch.float16 else gl.bfloat16
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, head_dim], element)
    return tuple(TensorDescriptor.from_tensor(c.view(-1, c.shape[2] * head_dim), [rows, head_dim],
                                              layout) for c in (k_cache, v_cache))


def constexprs(kv_heads: int, group: int, head_dim: int, **overrides) -> dict:
    """The compile-time parameters of `_partials_sm90_kernel` for a head shape."""
    values = dict(KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=1 << (group - 1).bit_length(),
                  HEAD_DIM=head_dim, BLOCK_M=BLOCK_M,
                  BLOCK_N=BLOCK_N, NUM_STAGES=NUM_STAGES, Q_STAGES=Q_STAGES,
                  THRESHOLD=RESCALE_THRESHOLD, LAZY=LAZY_RESCALE, SLOT_AHEAD=SLOT_AHEAD,
                  MASK_FREE=MASK_FREE, PIPELINE=PIPELINE,
                  PRODUCER_WARPS=PRODUCER_WARPS,
                  PRODUCER_REGS=PRODUCER_REGS, EARLY_DEPENDENTS=EARLY_DEPENDENTS,
                  WAIT_FOR_PRIOR_GRID=PDL_PARTIALS,
                  PREFETCH_ITEM=PREFETCH_ITEM and group <= BLOCK_M // 2, TMA_ROWS=0)
    values.update(overrides)
    return values


def launch_spec(kv_heads: int, group: int, head_dim: int, small_grid: bool = False,
                **overrides):
    """(kernel, its constexprs, maxnreg, CTAs per SM) of the kernel the module parameters pick.

    `_partials_sm90_kernel`; with ``small_grid`` (the plan's work items fit one CTA per SM) and
    ``SMALL_GRID_PIPELINE``, with SMALL_GRID's parameters at one CTA per SM; with
    ``TWO_CONSUMERS`` the two-consumer kernel of `deft.kernels.deft_flatten_sm90_split`. Both
    take the same run-time arguments.
    """
    if TWO_CONSUMERS:  # (no TMA there)
        from deft.kernels import deft_flatten_sm90_split as split

        overrides.pop("TMA_ROWS", None)
        return split.launch_spec(kv_heads, group, head_dim, **overrides)
    if small_grid and SMALL_GRID_PIPELINE:
        return (_partials_sm90_kernel,
                constexprs(kv_heads, group, head_dim, **{**SMALL_GRID, **overrides}),
                SMALL_GRID_MAX_REGS, 1)
    return (_partials_sm90_kernel, constexprs(kv_heads, group, head_dim, **overrides), MAX_REGS,
            CTAS_PER_SM)


def partials(q, k_cache, v_cache, o_part, lse_part, buffers, *, flat: bool, sm_scale: float,
             config, num_programs: int, small_grid: bool = False) -> None:
    """`deft.kernels.partials.partials` on the Gluon kernel (same arguments, same outputs);
    ``small_grid``: the plan's work items fit one CTA per SM (`launch_spec`).

    Calls the Triton kernel instead where the Gluon kernel does not take the inputs (`fits`).
    """
    if not fits(q, k_cache, flat):
        from deft.kernels.partials import partials as triton_partials

        triton_partials(q, k_cache, v_cache, o_part, lse_part, buffers, flat=flat,
                        sm_scale=sm_scale, config=config, num_programs=num_programs)
        return
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // kv_heads
    rows = tma_rows(k_cache.shape[1]) if k_cache.is_contiguous() and v_cache.is_contiguous() else 0
    kernel, consts, max_regs, ctas_per_sm = launch_spec(kv_heads, group, head_dim, small_grid,
                                                        TMA_ROWS=rows)
    k_desc, v_desc = kv_descriptors(k_cache, v_cache, consts.get("TMA_ROWS", 0))
    num_programs = min(num_programs, ctas_per_sm * multiprocessors(q.device))
    # a compile option of the CUDA backend, for a kernel that waits (WAIT_FOR_PRIOR_GRID)
    launch = dict(launch_pdl=True) if consts.get("WAIT_FOR_PRIOR_GRID") else {}
    kernel[(num_programs,)](
        q, k_cache, v_cache, k_desc, v_desc, o_part, lse_part,
        buffers["counts"], buffers["part_start"], buffers["part_tokens"], buffers["part_entry"],
        buffers["entry_query"], buffers["entry_row"], buffers["query_flat"], buffers["token_slot"],
        buffers["subtree_end"],
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(1), v_cache.stride(2),
        sm_scale * LOG2E,
        **consts,
        num_warps=CONSUMER_WARPS, maxnreg=max_regs, **launch,
    )
