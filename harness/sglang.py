"""SGLang's Triton decode kernel (the paper's Radix Attention), called from its installed wheel.

One caller serves the bench and the replay: each query is a request whose page table (page size
1: one cache slot per token) lists the slots of its path, root first; padding rows are requests
of one scratch token. The page tables live in fixed buffers that `SGLangMethod.plan` refills,
as SGLang's CUDA-graph runner does, so the call is graphable. The replay runs SGLang's server
default of `KV_SPLITS` splits; the bench tries each of `BENCH_SPLITS` and keeps the fastest.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deft.plan import build_plan
from harness.inputs import query_paths
from harness.kernel_traffic import plan_traffic
from harness.methods import Method, need_cuda, need_module, paged_variant

KV_SPLITS = 8
"""KV splits of SGLang's decode kernel (its server's default ``triton_attention_num_kv_splits``)."""

BENCH_SPLITS = (4, 8, 16)
"""KV splits the bench tries; the fastest correct one is reported."""

MODULE = "sglang/srt/layers/attention/triton_ops/decode_attention.py"

WHEELS_HINT = "install the wheels of .peer-wheels, see docs/benchmarks.md"


@dataclass(frozen=True)
class _SGLangPlan:
    tree: object


class SGLangMethod(Method):
    """SGLang's ``decode_attention_fwd`` over a page-size-1 cache (module docstring).

    Parameters
    ----------
    splits : int
        KV splits per request.
    """

    name = "sglang"
    kind = "peer"
    strategy = "radix"
    steps = True
    page_size = 1
    description = ("SGLang's Triton decode_attention_fwd (radix attention), each query a request "
                   "whose page table lists its path; best of 4/8/16 KV splits")

    def __init__(self, splits: int = KV_SPLITS):
        self.splits = splits

    def unavailable(self, device, tree=None):
        return need_cuda(device) or sglang_reason()

    def prepare(self, inputs):
        return [paged_variant(SGLangMethod(splits), inputs, label=f"splits={splits}")
                for splits in BENCH_SPLITS]

    def setup(self, capacity, shape, device, scratch_slot):
        self._kernel = load_sglang_decode()
        rows, splits = capacity.queries, self.splits
        self._scratch, self._rows = scratch_slot, rows
        self._indptr = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        self._indices = torch.zeros(capacity.visible + rows, dtype=torch.int64, device=device)
        self._splits = torch.full((rows,), splits, dtype=torch.int32, device=device)
        self._logits = torch.empty((rows, shape.q_heads, splits, shape.head_dim),
                                   dtype=torch.float32, device=device)
        self._lse = torch.empty((rows, shape.q_heads, splits), dtype=torch.float32, device=device)
        self._sm_scale = shape.head_dim ** -0.5
        pinned = device.type == "cuda"
        self._indptr_host = torch.zeros(rows + 1, dtype=torch.int32, pin_memory=pinned)
        self._indices_host = torch.zeros(len(self._indices), dtype=torch.int64,
                                         pin_memory=pinned)
        self._copied = None  # event after the last staging -> device copies
        self.graphable = True
        self.version += 1

    def plan(self, tree, cache):
        """Refill the page tables: host arrays into pinned staging, then non-blocking copies
        queued on the current stream (after any graph launched before), as SGLang's
        CUDA-graph runner does; a plan may thus overlap the previous step on the GPU."""
        indptr, tokens = query_paths(tree)
        slots = cache.host_token_slots(tree)[tokens]
        padding = self._rows - tree.num_queries
        indptr = np.concatenate([indptr, indptr[-1] + np.arange(1, padding + 1)])
        slots = np.concatenate([slots, np.full(padding, self._scratch)])
        if self._copied is not None:
            self._copied.synchronize()  # the previous plan's copies have left the staging
        self._indptr_host.numpy()[:] = indptr
        self._indices_host.numpy()[: len(slots)] = slots
        self._indptr.copy_(self._indptr_host, non_blocking=True)
        self._indices[: len(slots)].copy_(self._indices_host[: len(slots)], non_blocking=True)
        if self._indptr.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()
        return _SGLangPlan(tree)

    def run(self, q, k_cache, v_cache, plan, out=None):
        out = torch.empty_like(q) if out is None else out
        self._kernel.decode_attention_fwd(
            q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), out, self._indptr, self._indices,
            self._logits, self._lse, self._splits, self.splits, self._sm_scale, 1.0, 1.0)
        return out

    def traffic(self, plan):
        return plan_traffic(build_plan("radix", plan.tree, page_size=1))

    def params(self, plan):
        return {"kv_splits": self.splits}


def sglang_reason() -> str | None:
    """Why SGLang's decode kernel module cannot be loaded, or None."""
    reason = need_module("sglang", WHEELS_HINT)
    if reason is None and not _module_path().is_file():
        reason = f"the installed sglang has no {MODULE}"
    return reason


def load_sglang_decode() -> types.ModuleType:
    """SGLang's ``decode_attention.py``, loaded from the installed wheel's file.

    The module imports only triton and ``sglang.srt.utils.is_hip``; a stub for that one
    function (returning False: this is a CUDA machine) stands in for the rest of SGLang
    while the module loads, and is removed again afterwards.
    """
    name = "_deft_bench_sglang_decode_attention"
    if name in sys.modules:
        return sys.modules[name]
    stub_names = ("sglang", "sglang.srt", "sglang.srt.utils")
    saved = {key: sys.modules.get(key) for key in stub_names}
    stubs = {key: types.ModuleType(key) for key in stub_names}
    stubs["sglang.srt.utils"].is_hip = lambda: False
    spec = importlib.util.spec_from_file_location(name, _module_path())
    module = importlib.util.module_from_spec(spec)
    sys.modules.update(stubs)
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    return module


def _module_path() -> Path:
    spec = importlib.util.find_spec("sglang")
    return Path(list(spec.submodule_search_locations)[0]).parent / MODULE
