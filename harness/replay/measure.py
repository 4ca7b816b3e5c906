"""One method's measurements in a replay, and how one step is timed three ways.

The three decode latencies of a step (docs/reproduction.md, "Three decode latencies"):

- **no planning** (the paper's): GPU time of the decoder step, CUDA events around its graph;
- **planning in line**: host wall time of plan, launch, synchronise (`timed_wall` with the
  plan as ``host``, before the launch);
- **planning overlapped**: host wall time of launch, plan the *next* step while the GPU runs
  this one, synchronise (`timed_wall` with the next plan as ``overlapped``, after the launch).
  A plan may overlap the running graph because `deft.TreeAttention.plan` writes its device
  buffers only through stream-ordered copies (queued after the launched graph) and waits for
  its previous copies before reusing its pinned staging area; `harness.sglang` does the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from deft.plan import BYTE_KEYS
from harness.timing import GraphCaptureError, capture, synchronize

PER_STEP = ("attention", "plan", "e2e", "inline", "overlap")
"""Per-step lists (ms) of a method: attention of all layers (GPU), its plan (host), the decoder
step without planning (GPU), with planning in line (wall), with planning overlapped (wall)."""


@dataclass
class Measured:
    """One method's (or the no-attention row's) numbers over the replay."""

    name: str
    kind: str
    strategy: str | None
    status: str = "ok"
    reason: str | None = None
    timing: str | None = None  # of the attention steps: "graph", "eager", "eager-fallback"
    e2e_timing: str | None = None  # of the decoder steps
    capture_error: str | None = None
    per_step: dict = field(default_factory=lambda: {key: [] for key in PER_STEP})
    traffic: dict = field(default_factory=lambda: dict.fromkeys(BYTE_KEYS, 0))
    kernel_traffic: dict | None = None  # by KERNEL_BYTE_KEYS, for methods that report it
    rel_err: float | None = None
    graph: object = None  # CUDA graph of the layer loop
    e2e_graph: object = None  # CUDA graph of the decoder step
    version: int = -1  # the method's version the graphs were captured for


def runnable(entry: Measured, prefix: str, step):
    """What replays one step: attention (``prefix`` "") or decoder ("e2e_").

    Where ``entry.<prefix>timing`` is "graph", the replay of the CUDA graph
    ``entry.<prefix>graph`` of ``step`` (captured on first use); else ``step`` itself. A
    capture failure falls back to eager for good and is recorded."""
    timing, graph = prefix + "timing", prefix + "graph"
    if getattr(entry, timing) == "graph" and getattr(entry, graph) is None:
        try:
            setattr(entry, graph, capture([step])[0])
        except GraphCaptureError as error:
            setattr(entry, timing, "eager-fallback")
            entry.capture_error = str(error)
    if getattr(entry, timing) == "graph":
        return getattr(entry, graph).replay
    return step


def time_step(entry: Measured, prefix: str, step, device) -> float:
    """GPU milliseconds of one step (`runnable`): CUDA events on a GPU, wall clock on the CPU."""
    return timed_wall(runnable(entry, prefix, step), device)[1]


def timed_wall(launch, device, host=None, overlapped=None) -> tuple:
    """Time ``host()``, ``launch()``, ``overlapped()``, then a device synchronisation.

    Returns
    -------
    wall_ms : float
        Host wall time of the whole sequence, from a synchronised device.
    gpu_ms : float
        CUDA-event time of ``launch`` on a GPU (wall time of it on the CPU).
    host_ms : float
        Wall time of ``host()`` (0 without it).
    """
    synchronize(device)
    cuda = device.type == "cuda"
    start = time.perf_counter()
    if host is not None:
        host()
    launched = time.perf_counter()
    if cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    launch()
    if cuda:
        end.record()
    ran = time.perf_counter()
    if overlapped is not None:
        overlapped()
    synchronize(device)
    stop = time.perf_counter()
    gpu_ms = begin.elapsed_time(end) if cuda else (ran - launched) * 1e3
    return (stop - start) * 1e3, gpu_ms, (launched - start) * 1e3

