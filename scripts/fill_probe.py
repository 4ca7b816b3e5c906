#!/usr/bin/env python3
"""Host cost of the pieces of PlanBuffers.fill on a GPU (issue #16), and of fill itself with
the upload of `deft.staged_upload` against torch's copies, interleaved in one process.

    python scripts/fill_probe.py      # CUDA only; about 40 s; prints microseconds (medians),
                                      # and writes them to $OUT/fill_probe.json where $OUT is set

Each mode refills fresh buffers from the same 40 steps' plan arrays of four runs, six times
round robin; every mode but the writes-only one must leave the device buffers equal to the
last plan. Modes: ``driver`` (the upload as shipped: the driver's copies, rectangles over the
fields one pitch apart), ``torch_rows`` (the same copies, each row through ``Tensor.copy_``,
the copy before `deft.driver_copies`; it slices two tensors a row, which the upload before it
did once per span), ``one_copy`` (every change in one span) and ``writes_only`` (no upload).
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deft import plan_buffers, workloads as wl  # noqa: E402
from deft.cache import PagedKVCache, TreeCache, pages_for  # noqa: E402
from deft.tree_attention import TreeAttention  # noqa: E402
from deft.plan import check_parameters  # noqa: E402
from deft.driver_copies import HostToDevice  # noqa: E402
from deft.staged_upload import StagedUpload  # noqa: E402


def med(fn, reps=400):
    out = []
    for _ in range(reps):
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1e3)
    return round(statistics.median(out), 2)


dev = torch.device("cuda")
n = 1 << 20
data = torch.zeros(n, dtype=torch.int32, device=dev)
pinned = torch.zeros(n, dtype=torch.int32, pin_memory=True)
plain = torch.zeros(n, dtype=torch.int32)
reg = np.zeros(n, dtype=np.int32)
torch.cuda.cudart().cudaHostRegister(reg.ctypes.data, reg.nbytes, 0)
regt = torch.from_numpy(reg)
ev = torch.cuda.Event()
STREAM = torch.cuda.current_stream()
ev.record()
torch.cuda.synchronize()
r = {}
r["event_new_record"] = med(lambda: torch.cuda.Event().record())
r["event_record_reused"] = med(lambda: ev.record())
torch.cuda.synchronize()
r["event_record_cached_stream"] = med(lambda: ev.record(STREAM))
r["event_sync_done"] = med(lambda: ev.synchronize())
r["two_slices"] = med(lambda: (data[100:5000], pinned[100:5000]))
for size in (64, 4096, 65536):
    d, p, q, g = data[:size], pinned[:size], plain[:size], regt[:size]
    r[f"copy_pinned_{size}"] = med(lambda: d.copy_(p, non_blocking=True))
    torch.cuda.synchronize()
    r[f"copy_registered_{size}"] = med(lambda: d.copy_(g, non_blocking=True))
    torch.cuda.synchronize()
    r[f"copy_pageable_{size}"] = med(lambda: d.copy_(q, non_blocking=True))
    torch.cuda.synchronize()
    r[f"slice_copy_pinned_{size}"] = med(lambda: data[:size].copy_(pinned[:size],
                                                                  non_blocking=True))
    torch.cuda.synchronize()
host = pinned.numpy()
vals = np.arange(5000, dtype=np.int64)
r["numpy_write_pinned_5000"] = med(lambda: host.__setitem__(slice(0, 5000), vals))
r["numpy_write_registered_5000"] = med(lambda: reg.__setitem__(slice(0, 5000), vals))
r["numpy_write_plain_5000"] = med(lambda: plain.numpy().__setitem__(slice(0, 5000), vals))


driver = HostToDevice(0)
for rows in (1, 5):
    rect = [[0, 4096, rows, 65536]]
    r[f"driver_copy_4096x{rows}"] = med(lambda: driver.copies(data.data_ptr(), pinned.data_ptr(),
                                                              rect, STREAM.cuda_stream))
    torch.cuda.synchronize()


class TorchRows(StagedUpload):
    """The same copies, each row a slice's ``Tensor.copy_`` (non-blocking)."""

    def upload(self, copies):
        for lo, width, height, pitch in copies:
            for row in range(lo, lo + height * pitch, pitch):
                self.data[row:row + width].copy_(self._staging[row:row + width],
                                                 non_blocking=True)
        if copies:
            self._event.record(self._stream())
            self._recorded = True


class NoUpload(StagedUpload):
    """Staging writes only (what fill costs without its copies)."""

    def upload(self, copies):
        pass


def counted(upload, seen):
    """``upload`` with the copies of each of its uploads counted into ``seen``."""
    plain = upload.upload

    def upload_counted(copies):
        seen.append(len(copies))
        plain(copies)

    upload.upload = upload_counted
    return upload


BUFFERS = plan_buffers.PlanBuffers
MODES = {"driver": (BUFFERS, StagedUpload, 65536), "torch_rows": (BUFFERS, TorchRows, 65536),
         "one_copy": (BUFFERS, StagedUpload, 10**9),
         "writes_only": (BUFFERS, NoUpload, 65536)}
runs = {"fewshot_b20": wl.fewshot(4000, 20, 400), "fewshot_b256_P55296": wl.fewshot(55296, 256, 40)}
for name in ("keywordToT", "spec_t256"):
    try:
        runs[name] = (wl.reasoning(name, prompt_tokens=4000) if name.startswith("key")
                      else wl.speculative(256, 4000))
    except FileNotFoundError as missing:
        print("skipping", name, missing)
for run_name, run in runs.items():
    trees = [run.tree(i) for i in range(40)]
    big = max(trees, key=lambda t: t.num_tokens)
    queries = max(256, max(t.num_queries for t in trees))
    pool = PagedKVCache(4 * pages_for(big, 16) + 64, 16, 1, 16, device=dev)
    cache = TreeCache(pool)
    chunk, group, _ = check_parameters("deft_flatten", None, None, 1)
    ta = TreeAttention("deft_flatten", chunk, group, max_queries=queries,
                       max_tokens=2 * big.num_tokens)
    arrays = []
    for t in trees:
        # the planner writes its arrays in turns (deft.turn_buffers): a step's arrays hold its
        # values until the step after next is planned, so the earlier steps' arrays kept here
        # hold later steps' values (their sizes and identities, what fill's time depends on,
        # are the steps' own); only the last step's values are checked below
        cache.apply(t)
        arrays.append(ta._node_planner.arrays(t, *plan_buffers.host_node_pages(cache, t), 16,
                                              chunk, group))
    fills, copies = {m: [] for m in MODES}, {m: [] for m in MODES}
    for rep in range(6):
        for mode, (buffers, kind, coalesce) in MODES.items():
            plan_buffers.COALESCE = coalesce
            buf = buffers(queries, ta.max_entries, 2 * big.num_tokens, True, dev)
            buf.stage_through(counted(kind(buf.data), copies[mode]))
            for a in arrays:
                torch.cuda.synchronize()
                t = time.perf_counter_ns()
                buf.fill(a)
                fills[mode].append((time.perf_counter_ns() - t) / 1e3)
            torch.cuda.synchronize()
            got = buf.data.cpu().numpy()
            for field, off in zip(plan_buffers.FIELDS, buf.offsets):
                want = np.asarray(arrays[-1][field])
                if "writes_only" not in mode and not (got[off:off + len(want)] == want).all():
                    raise SystemExit(f"{run_name} {mode}: field {field} differs after the fills")
    for mode, v in fills.items():
        r[f"fill_{mode}_{run_name}"] = round(statistics.median(v), 2)
        r[f"copies_{mode}_{run_name}"] = statistics.median(copies[mode])
r["stream_lookup"] = med(lambda: torch._C._cuda_getCurrentStream(0))
r["current_stream"] = med(lambda: torch.cuda.current_stream())
for k, v in r.items():
    print(f"{k:40s} {v:8.2f} us")
if os.environ.get("OUT"):
    Path(os.environ["OUT"], "fill_probe.json").write_text(json.dumps(r, indent=1))
