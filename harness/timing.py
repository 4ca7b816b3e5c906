"""Timing one attention call: eager (`triton.testing.do_bench`) or one CUDA graph over KV copies.

- eager: `triton.testing.do_bench` on one call; it zeroes a 256 MB buffer before each run, so
  L2 is flushed, but a method that launches several kernels pays host launch time it cannot
  hide;
- graph: one CUDA graph holding one call per KV copy (4 different copies, more than L2
  holds), replayed under `do_bench`; per-call time = replay time / copies. This is how serving
  engines run decode, and the fair comparison (docs/anchors.md).

Both report the median and the 10th and 90th percentiles of do_bench's runs. A method whose
calls cannot be captured raises `GraphCaptureError`; the runner then times it eagerly and
marks it.
"""

from __future__ import annotations


import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

QUANTILES = (0.1, 0.5, 0.9)


class GraphCaptureError(RuntimeError):
    """The calls could not be captured in (or replayed from) a CUDA graph; the message says why."""


@dataclass(frozen=True)
class Timing:
    """Per-call time of one method, µs: the median and the 10th / 90th percentiles."""

    median_us: float
    p10_us: float
    p90_us: float

    @classmethod
    def from_ms(cls, quantiles_ms, calls: int = 1) -> "Timing":
        p10, median, p90 = (float(t) * 1e3 / calls for t in quantiles_ms)
        return cls(median, p10, p90)


class CudaTimer:
    """Eager and graph timing on the current CUDA device.

    Parameters
    ----------
    warmup_ms, rep_ms : int
        do_bench's warm-up and measurement budgets (its defaults: 25 and 100 ms).
    """

    def __init__(self, warmup_ms: int = 25, rep_ms: int = 100):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def eager(self, fn: Callable[[], object]) -> Timing:
        """do_bench of `fn` (L2 flushed before each run)."""
        from triton.testing import do_bench

        quantiles = do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=list(QUANTILES))
        return Timing.from_ms(quantiles)

    def graph(self, calls: list[Callable[[], torch.Tensor]]) -> tuple[Timing, list]:
        """Capture every call in one CUDA graph, replay it under do_bench.

        Returns the per-call timing and the outputs of the calls (tensors of the graph's
        memory pool, holding what the last replay wrote).
        """
        from triton.testing import do_bench

        graph, outputs = capture(calls)
        try:
            quantiles = do_bench(graph.replay, warmup=self.warmup_ms, rep=self.rep_ms,
                                 quantiles=list(QUANTILES))
        except Exception as error:  # noqa: BLE001 - a replay failure means "cannot graph"
            raise GraphCaptureError(f"replay failed: {one_line(error)}") from error
        torch.cuda.synchronize()
        return Timing.from_ms(quantiles, calls=len(calls)), outputs


def capture(calls: list[Callable[[], torch.Tensor]]):
    """One CUDA graph holding `calls` in order: (graph, their outputs).

    The calls run once on a side stream first (Triton compiles, FlashInfer JIT-builds and
    allocates its buffers there), as torch's CUDA graph recipe asks.
    """
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = [call() for call in calls]
        graph.replay()
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - whatever breaks capture is reported as such
        _recover()
        raise GraphCaptureError(one_line(error)) from error
    return graph, outputs


class WallTimer:
    """Host wall-clock timing (no CUDA): for tests and CPU dry runs, never for reported numbers.

    `graph` always raises `GraphCaptureError`, as a method that cannot be captured does.
    """

    def __init__(self, repeats: int = 5):
        self.repeats = repeats

    def eager(self, fn: Callable[[], object]) -> Timing:
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return Timing.from_ms(np.quantile(times, QUANTILES))

    def graph(self, calls):
        raise GraphCaptureError("CUDA graphs need a CUDA device")


def _recover() -> None:
    """Leave the device usable after a failed capture (errors here are secondary)."""
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        pass


def replay_seconds(fn: Callable[[], object], replays: int = 20) -> float:
    """Median seconds of one replay of a CUDA graph of `fn` (after warm-up), each replay timed
    alone with CUDA events: the GPU scripts' timing of single launches and device ceilings."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


def synchronize(device: torch.device) -> None:
    """Wait for everything queued on a CUDA device (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: message`, first line only, cut to `limit` characters."""
    text = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
    return message if len(message) <= limit else message[: limit - 3] + "..."
