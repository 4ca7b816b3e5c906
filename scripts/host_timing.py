"""Host-time helpers of `scripts/host_overhead.py`: the mean host time of back-to-back calls, a
cProfile of them, and the time with the CUDA-graph replays of `run`'s argument sets stubbed."""

from __future__ import annotations

import cProfile
import pstats
import time
from pathlib import Path

import torch

from harness.timing import synchronize

CALLS = 2000
"""Calls per mean (``host_overhead.py --calls``); stubbed and floor times always take this many."""


def host_us(fn, calls: int, device: torch.device, batch: int | None = None) -> float:
    """Mean host time of `fn` over back-to-back calls, microseconds; with `batch`, a
    synchronisation every `batch` calls, not timed."""
    for _ in range(min(20, calls)):
        fn()
    synchronize(device)
    batch = batch or calls
    elapsed, done = 0.0, 0
    while done < calls:
        n = min(batch, calls - done)
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed += time.perf_counter() - start
        synchronize(device)
        done += n
    return elapsed / calls * 1e6


def profile_us(fn, calls: int, device: torch.device, top: int = 8) -> list:
    """Where a call's host time goes: the `top` functions by own time under cProfile,
    ``[name, us per call]`` (profiling inflates every entry; read the shares)."""
    for _ in range(min(20, calls)):
        fn()
    synchronize(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    synchronize(device)
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, _)
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return [[f"{Path(file).name}:{name}", round(entry[2] / calls * 1e6, 2)]
            for (file, _, name), entry in rows]


def stubbed_replay_us(entries, fn, device: torch.device) -> float:
    """Host time of `fn` with the replays of its argument sets `entries` (`deft.bound_run`)
    made no-ops: what `fn` costs besides torch's replay. Cheap with or without a GPU, so always
    `CALLS` calls (with ``--cpu`` too: a microbenchmark of the key and the lookup). On the CPU
    (no graph) the capture-status query, which the CPU build of torch cannot answer, is
    stubbed too."""
    replays, capturing = [e.replay for e in entries], torch._C._cuda_isCurrentStreamCapturing
    for entry in entries:
        entry.replay = lambda: None
    if device.type == "cpu":
        torch._C._cuda_isCurrentStreamCapturing = lambda: False
    try:
        return host_us(fn, CALLS, device)
    finally:
        torch._C._cuda_isCurrentStreamCapturing = capturing
        for entry, replay in zip(entries, replays):
            entry.replay = replay
