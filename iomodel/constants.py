"""The latency model's named constants, which a GPU spec's ``calibration`` may override."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Constants:
    """The latency model's named constants (a GPU spec's ``calibration`` overrides them).

    Attributes
    ----------
    launch_us : float
        Cost of one kernel launch, µs (graph replay: the gap between dependent kernels).
    program_us : float
        Cost of one program not hidden by other resident programs (setup, the first load's
        latency, the epilogue), µs.
    memory_efficiency : float
        Fraction of peak HBM bandwidth a streaming kernel reaches (a large device copy on an
        H200 measured 4245 of 4800 GB/s in an earlier run, docs/iomodel.md).
    compute_efficiency : float
        Fraction of the peak matmul rate reached (a large fp16 GEMM measured 678 of 989
        TFLOP/s on the same H200).
    sm_bandwidth_fraction : float
        Fraction of the HBM bandwidth one SM can draw on its own (about 3x its fair share on
        an H100; bounds programs that run while other SMs idle).
    query_tile_us : float
        Fixed cost of one query tile of a work item of the shipped DeFT-Flatten kernel (the
        tile's load, its KV stream's first fill of the ring, its partial rows' epilogue), µs
        (`iomodel.kernel_model`).
    tile_us : float
        One tile step of that kernel (a query tile against one KV tile) on an SM with nothing
        else streaming, µs.
    small_grid_tile_us : float
        The same step in the small-grid form of the Hopper kernel (a plan of at most one work
        item per SM: one CTA per SM, its consumer software-pipelined), µs.
    masked_tile_us : float
        What a masked tile step costs more than a mask-free one, µs: the Euler-tour mask the
        kernel computes on a tile not every row of its query tile sees whole (on the portable
        kernel every tile; `iomodel.mask_tiles`). 0 (uncalibrated): no extra cost.
    contention : float
        How much slower a tile step gets when every SM streams at once (loaded memory latency):
        a step costs ``tile_us x (1 + contention x busy)``, busy the fraction of SMs in use.
    pair_speedup : float
        Throughput of the two programs resident on one SM together, relative to one alone
        (1: they serialise, 2: they overlap perfectly).
    merge_step_us : float
        One loop step of a merge program (a block of a query's partial rows), µs: the merge's
        serial chain where few queries have many partial rows.
    overlap_softness : float
        How far a deft_flatten kernel's chain of steps and its HBM bytes fail to hide each
        other: its time is ``(chain^k + bytes_time^k)^(1/k)`` with ``k = 1 /
        overlap_softness``; 0: the larger of the two (full overlap), 1: their sum
        (`iomodel.kernel_model.overlapped`).
    kv_overlap_softness : float
        The same softness for the KV stream's share of those bytes: the kernel's softness is
        the byte-weighted mean of the two, ``(1 - f) overlap_softness + f kv_overlap_softness``
        with f the KV share of its HBM bytes (KV streamed through the producer's ring hides
        behind the tile chain better than the query tiles' Q loads and partial-row stores).
        Negative: the same as ``overlap_softness``.
    merge_query_step_us : float
        One loop step of the per-query merge (one partial row of every head), µs; negative: the
        same as ``merge_step_us`` (a per-head merge step, a block of rows).
    merge_block_rows : float
        Not fitted: the per-head merge's row block the times are modelled for. 0: the plan's
        own (`deft.kernels.reduction.merge_block`, the merge since session 10); else that
        fixed block (16: the merge every H200 sweep up to session 9 timed; the refit sets it
        from the sweeps' ``merge_block``, `iomodel.kernel_model.merge_steps`).
    """

    launch_us: float = 2.0
    program_us: float = 0.2
    memory_efficiency: float = 0.88
    compute_efficiency: float = 0.69
    sm_bandwidth_fraction: float = 0.025
    query_tile_us: float = 1.0
    tile_us: float = 1.0
    small_grid_tile_us: float = 1.0
    masked_tile_us: float = 0.0
    contention: float = 0.5
    pair_speedup: float = 1.5
    merge_step_us: float = 2.0
    overlap_softness: float = 0.0
    kv_overlap_softness: float = -1.0
    merge_query_step_us: float = -1.0
    merge_block_rows: float = 0.0
