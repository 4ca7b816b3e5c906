"""Whole-run replay: a decoding run step by step through the paged tree cache, timed per method.

This reproduces the paper's Table 4 (attention latency of a whole run) and, with ``e2e``, its
Table 3 (decoding latency of a Llama-3-8B-shaped model, `deft.decoder`). For every replayed step:

1. the tree cache follows the run (`deft.cache.TreeCache.apply`: grow, branch, prune) and the
   step's new tokens get random K and V in every layer (`deft.decoder.LayerCaches`: each layer
   has its own cache, so no layer finds another's KV in L2);
2. every method plans the step once (host time, reported apart as the paper leaves it out);
3. every method runs attention once per layer, ``layers`` layers, timed with CUDA events around
   the step's layer loop — in ``"graph"`` timing one CUDA graph of that loop per method,
   captured once and replayed every step (plans refill fixed-capacity buffers in place, so the
   graph stays valid), as serving engines run decode; ``"eager"`` launches from Python;
4. with ``e2e``, the step's queries go through the decoder as one batch, once per method and
   once without attention (the "upper bound (no attention)" row), each a CUDA graph too.

Every method implements the IO model's view of one Table 1 strategy; the bytes its plan moves
(`iomodel.traffic`, one layer) times ``layers`` are summed over the run. At ``check_steps``
steps (the last first) each method's output of the last layer is compared with the float64
oracle.

Sampling. ``max_steps`` replays that many steps evenly spaced over the run (first and last
included); ``e2e_steps`` runs the decoder on that many of them, evenly spaced. Totals over the
whole run are extrapolated as (mean over the steps measured) x (steps of the run), reported
beside the measured sums (keys ``*_run``). Times are seconds.

Methods (`parse_methods`): this project's Triton strategies through `deft.TreeAttention`,
``sglang`` (SGLang's Triton decode kernel, the paper's Radix Attention, loaded from its installed
wheel by `deft.bench.peers`; page size 1, one request per query, 8 KV splits as SGLang's server
defaults), and ``ref:<strategy>``, the PyTorch reference of any strategy (CPU tests). Speedups
are over ``sglang`` when it ran, else over this project's ``radix``.

``python -m deft.replay OUT/*.json`` prints Tables 3 and 4 of saved results as Markdown.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch

from deft.bench.base import need_cuda, time_plan
from deft.bench.inputs import DTYPES, query_paths, with_dtype
from deft.bench.methods import GPU_STRATEGIES, KV_SLOT_STRATEGIES
from deft.bench.peers import load_sglang_decode, sglang_reason
from deft.bench.runner import TOLERANCE, environment
from deft.bench.timing import GraphCaptureError, capture, one_line
from deft.cache import PagedKVCache, TreeCache, pages_for
from deft.decoder import LLAMA3_8B, Decoder, DecoderConfig, LayerCaches
from iomodel.traffic import BYTE_KEYS, output_bytes, partition_bytes
from reference import MODULES, oracle_attention, rel_err
from deft.plan import build_plan
from deft.strategies import STRATEGIES

FORMAT = "deft-replay/1"

DEFAULT_METHODS = GPU_STRATEGIES + ("sglang",)
"""Methods replayed by default: this project's Triton strategies and SGLang's kernel."""

BASELINES = ("sglang", "radix")
"""Speedups are over the first of these that ran (the paper's Radix Attention)."""

SGLANG_KV_SPLITS = 8
"""KV splits of SGLang's decode kernel (its server's default ``triton_attention_num_kv_splits``)."""

GROWTHS = 8
"""Times a `KernelMethod` doubles its partial-result capacity for one plan before giving up."""


# ---------------------------------------------------------------------------- capacities
@dataclass(frozen=True)
class Capacity:
    """The largest step of a replay: what fixed-capacity buffers must hold.

    Attributes
    ----------
    queries, tokens, pages : int
        Most queries, KV tokens and cache pages (each node on fresh pages) of a step.
    visible : int
        Most (query, visible token) pairs of a step: the page-table entries of a
        one-request-per-query method.
    """

    queries: int
    tokens: int
    pages: int
    visible: int

    @classmethod
    def of(cls, trees, page_size: int) -> "Capacity":
        """The capacity of a list of trees (one per replayed step)."""
        return cls(
            queries=max(t.num_queries for t in trees),
            tokens=max(t.num_tokens for t in trees),
            pages=max(pages_for(t, page_size) for t in trees),
            visible=max(int(t.visible_tokens.sum()) for t in trees),
        )


def sample_steps(steps: int, count=None) -> list:
    """``count`` step indices evenly spaced over ``range(steps)``, first and last included
    (all of them when ``count`` is None or at least ``steps``)."""
    if count is None or count >= steps:
        return list(range(steps))
    return np.unique(np.linspace(0, steps - 1, count).round().astype(np.int64)).tolist()


# ---------------------------------------------------------------------------- methods
class ReplayMethod:
    """An attention method of the replay: plan once per step, run once per layer.

    Subclasses set the attributes and implement the methods. ``run`` has the signature of
    `deft.TreeAttention.run`, so a method's ``run`` is the decoder's attention.

    Attributes
    ----------
    name : str
        As given to ``--methods``.
    kind : str
        ``"deft"`` (this project's kernels), ``"peer"`` or ``"reference"`` (PyTorch).
    strategy : str
        The Table 1 strategy it implements (its IO-model traffic).
    graphable : bool
        Whether ``run`` does no host work, so that a CUDA graph of it stays valid across plans.
    version : int
        Bumped whenever ``plan`` had to re-allocate its buffers (graphs must be re-captured).
    """

    name = ""
    kind = ""
    strategy = ""
    graphable = False
    version = 0

    def unavailable(self, device: torch.device) -> str | None:
        """Why this method cannot run on ``device``, or None."""
        raise NotImplementedError

    def setup(self, capacity: Capacity, shape, device: torch.device, scratch_slot: int) -> None:
        """Allocate for ``capacity`` (shape: the trees' `deft.tree.AttentionShape`); padding rows
        of q read the KV at ``scratch_slot``."""
        raise NotImplementedError

    def plan(self, tree, cache: TreeCache):
        """Plan one step over the cache's page table; returns the plan ``run`` takes."""
        raise NotImplementedError

    def run(self, q, k_cache, v_cache, plan, out=None):
        """Attention of one layer. q, out [rows >= queries, q_heads, head_dim] (rows past the
        plan's queries are padding); k_cache, v_cache [pages, page_size, kv_heads, head_dim]."""
        raise NotImplementedError

    def traffic(self, plan) -> dict:
        """The IO model's bytes of the plan (`iomodel.traffic`), by `BYTE_KEYS`."""
        raise NotImplementedError


class KernelMethod(ReplayMethod):
    """One of this project's Triton strategies, through `deft.TreeAttention` (graphable).

    Capacities are the replay's peaks; a plan that needs more (partial-result entries of a
    deep tree) doubles them and re-allocates.
    """

    kind = "deft"

    def __init__(self, strategy: str):
        self.name = self.strategy = strategy

    def unavailable(self, device):
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return need_cuda(device)

    def setup(self, capacity, shape, device, scratch_slot):
        self.graphable = device.type == "cuda"
        self._sizes = dict(max_queries=capacity.queries, max_tokens=capacity.tokens,
                           max_entries=None,
                           max_kv_slots=capacity.visible if self.strategy in KV_SLOT_STRATEGIES
                           else None)
        self._device = device
        self._build()

    def _build(self):
        from deft import TreeAttention

        self.attention = TreeAttention(self.strategy, device=self._device, **self._sizes)
        self._sizes["max_entries"] = self.attention.max_entries
        self.version += 1

    def plan(self, tree, cache):
        from deft.plan_buffers import CapacityError

        for _ in range(GROWTHS):
            try:
                return self.attention.plan(tree, cache)
            except CapacityError:
                self._sizes["max_entries"] *= 2
                if self._sizes["max_kv_slots"] is not None:
                    self._sizes["max_kv_slots"] *= 2
                self._build()
        return self.attention.plan(tree, cache)  # still too small: its CapacityError says why

    def run(self, q, k_cache, v_cache, plan, out=None):
        return self.attention.run(q, k_cache, v_cache, plan, out=out)

    def traffic(self, plan):
        return plan_traffic(plan.reference)


@dataclass(frozen=True)
class _ReferencePlan:
    tree: object
    plan: object  # deft.plan.Plan
    slots: torch.Tensor  # int64 [tokens], test layout


class ReferenceMethod(ReplayMethod):
    """The PyTorch reference of a strategy (`reference`), reading K and V through the cache's
    slots: any device, slow, eager only. For CPU tests and checks."""

    kind = "reference"

    def __init__(self, strategy: str):
        self.strategy = strategy
        self.name = f"ref:{strategy}"
        self._module = MODULES[strategy]

    def unavailable(self, device):
        return None

    def setup(self, capacity, shape, device, scratch_slot):
        self._device = device

    def plan(self, tree, cache):
        plan = self._module.plan(tree, page_size=cache.pool.page_size)
        return _ReferencePlan(tree, plan, cache.token_slots(tree).to(self._device))

    def run(self, q, k_cache, v_cache, plan, out=None):
        n = plan.tree.num_queries
        k = k_cache.flatten(0, 1)[plan.slots]
        v = v_cache.flatten(0, 1)[plan.slots]
        rows, _ = self._module.attention(plan.tree, q[:n], k, v, plan.plan)
        out = torch.empty_like(q) if out is None else out
        out[:n] = rows.to(out.dtype)
        out[n:] = 0
        return out

    def traffic(self, plan):
        return plan_traffic(plan.plan)


@dataclass(frozen=True)
class _SGLangPlan:
    tree: object


class SGLangMethod(ReplayMethod):
    """SGLang's Triton ``decode_attention_fwd`` (the paper's Radix Attention), graphable.

    Each query is a request whose page table (page size 1: one cache slot per token) lists the
    slots of its path, root first; padding rows are requests of one scratch token. The page
    tables live in fixed buffers that ``plan`` refills, as SGLang's CUDA-graph runner does.
    """

    name = "sglang"
    kind = "peer"
    strategy = "radix"
    graphable = True

    def unavailable(self, device):
        return need_cuda(device) or sglang_reason()

    def setup(self, capacity, shape, device, scratch_slot):
        self._kernel = load_sglang_decode()
        rows, splits = capacity.queries, SGLANG_KV_SPLITS
        self._shape, self._scratch, self._rows = shape, scratch_slot, rows
        self._indptr = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        self._indices = torch.zeros(capacity.visible + rows, dtype=torch.int64, device=device)
        self._splits = torch.full((rows,), splits, dtype=torch.int32, device=device)
        self._logits = torch.empty((rows, shape.q_heads, splits, shape.head_dim),
                                   dtype=torch.float32, device=device)
        self._lse = torch.empty((rows, shape.q_heads, splits), dtype=torch.float32, device=device)
        self._sm_scale = shape.head_dim ** -0.5
        self.version += 1

    def plan(self, tree, cache):
        indptr, tokens = query_paths(tree)
        slots = cache.token_slots(tree).numpy()[tokens]
        padding = self._rows - tree.num_queries
        indptr = np.concatenate([indptr, indptr[-1] + np.arange(1, padding + 1)])
        slots = np.concatenate([slots, np.full(padding, self._scratch)])
        self._indptr.copy_(torch.from_numpy(indptr.astype(np.int32)))
        self._indices[: len(slots)].copy_(torch.from_numpy(slots.astype(np.int64)))
        return _SGLangPlan(tree)

    def run(self, q, k_cache, v_cache, plan, out=None):
        out = torch.empty_like(q) if out is None else out
        self._kernel.decode_attention_fwd(
            q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), out, self._indptr, self._indices,
            self._logits, self._lse, self._splits, SGLANG_KV_SPLITS, self._sm_scale, 1.0, 1.0)
        return out

    def traffic(self, plan):
        return plan_traffic(build_plan("radix", plan.tree, page_size=1))


def plan_traffic(plan) -> dict:
    """The IO model's bytes of a `deft.plan.Plan` (DESIGN.md "Bytes"), by `BYTE_KEYS`.

    `iomodel.traffic_of_plan` without the load-balance statistics (which walk every visible
    pair and would dominate a replay's host time).
    """
    traffic = {key: int(value.sum()) for key, value in partition_bytes(plan).items()}
    traffic["output_bytes"] = output_bytes(plan.tree)
    return {key: traffic[key] for key in BYTE_KEYS}


GROUPS = {"all": DEFAULT_METHODS, "strategies": GPU_STRATEGIES}
"""Names ``--methods`` accepts for several methods at once."""


def parse_methods(text: str) -> list:
    """The methods of a ``--methods`` value: comma-separated names and groups, in order.

    Names: this project's Triton strategies, ``sglang``, ``ref:<strategy>`` (any of
    `reference.STRATEGIES`); groups: ``all``, ``strategies``. Raises ValueError on an unknown
    name, listing the valid ones.
    """
    names = []
    for item in (part.strip() for part in text.split(",")):
        if item in GROUPS:
            names.extend(GROUPS[item])
        elif item in GPU_STRATEGIES or item == "sglang" or (
                item.startswith("ref:") and item[4:] in STRATEGIES):
            names.append(item)
        elif item:
            raise ValueError(
                f"unknown method {item!r}; methods: {', '.join(DEFAULT_METHODS)}, "
                f"ref:<{'|'.join(STRATEGIES)}>; groups: {', '.join(GROUPS)}")
    if not names:
        raise ValueError("no method selected")
    return [_method(name) for name in dict.fromkeys(names)]


def _method(name: str) -> ReplayMethod:
    if name == "sglang":
        return SGLangMethod()
    if name.startswith("ref:"):
        return ReferenceMethod(name[4:])
    return KernelMethod(name)


# ---------------------------------------------------------------------------- the replay
@dataclass
class _Measured:
    """One method's (or the no-attention row's) numbers over the replay."""

    name: str
    kind: str
    strategy: str | None
    status: str = "ok"
    reason: str | None = None
    timing: str | None = None  # of the attention steps: "graph", "eager", "eager-fallback"
    e2e_timing: str | None = None  # of the decoder steps
    capture_error: str | None = None
    attention_ms: list = field(default_factory=list)
    plan_ms: list = field(default_factory=list)
    e2e_ms: list = field(default_factory=list)
    traffic: dict = field(default_factory=lambda: dict.fromkeys(BYTE_KEYS, 0))
    rel_err: float | None = None
    graph: object = None  # CUDA graph of the layer loop
    e2e_graph: object = None  # CUDA graph of the decoder step
    version: int = -1  # the method's version the graphs were captured for


@dataclass
class _Batch:
    """Static decoder inputs of a step, padded to the capacity (CUDA graphs read them)."""

    tokens: torch.Tensor  # int64 [rows]
    positions: torch.Tensor  # int64 [rows]
    slots: torch.Tensor  # int64 [rows]

    def fill(self, tree, cache: TreeCache, scratch_slot: int, vocab: int, generator) -> None:
        """The step's queries: random token ids, their positions and slots; padding after."""
        n = tree.num_queries
        self.tokens.random_(0, vocab, generator=generator)
        self.positions.zero_()
        self.slots.fill_(scratch_slot)
        self.positions[:n] = torch.from_numpy(tree.visible_tokens - 1)
        self.slots[:n] = cache.token_slots(tree)[tree.query_token]


def replay(run, methods, *, model: DecoderConfig = LLAMA3_8B, e2e=False, max_steps=None,
           e2e_steps=None, dtype=torch.float16, page_size=16, timing="graph", check_steps=1,
           seed=0, device="cuda", progress=None) -> dict:
    """Replay a decoding run step by step and time every method over it.

    Parameters
    ----------
    run : deft.workloads.Run
        Its trees must have ``model``'s heads and head dim (their dtype is set to ``dtype``).
    methods : list of ReplayMethod
        E.g. ``parse_methods("all")``.
    model : DecoderConfig
        ``model.layers`` is the number of attention layers (each with its own KV cache); the
        whole model runs with ``e2e``.
    e2e : bool
        Also time the decoder step per method and without attention.
    max_steps, e2e_steps : int, optional
        Steps replayed (evenly spaced over the run) and, of those, steps run through the
        decoder (default: all).
    dtype : torch.float16 or torch.bfloat16
    page_size : int
        Tokens per cache page (SGLang reads the same cache with one slot per token).
    timing : "graph" or "eager"
        CUDA graphs where the method allows (else eager, marked ``eager-fallback``).
    check_steps : int
        Steps (the last, then evenly spaced) whose outputs are compared with the oracle.
    seed : int
    device : str or torch.device
    progress : callable, optional
        ``progress(done, total)`` after each replayed step.

    Returns
    -------
    dict
        ``format`` ``deft-replay/1``, ``env``, ``config``, ``workload``, ``methods`` (one entry
        per method: status, times in seconds measured and ``*_run`` extrapolated, the IO
        model's bytes of every layer, measured and ``*_run``, rel_err, per-step ms),
        ``upper_bound``, ``baseline``, ``speedups``, ``cache``.
    """
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype}")
    if timing not in ("graph", "eager"):
        raise ValueError(f"timing must be 'graph' or 'eager', got {timing!r}")
    device = torch.device(device)
    steps = sample_steps(len(run), max_steps)
    trees = [with_dtype(run.tree(i), dtype) for i in steps]
    shape = trees[0].attention
    if (shape.q_heads, shape.kv_heads, shape.head_dim) != (model.q_heads, model.kv_heads,
                                                           model.head_dim):
        raise ValueError(
            f"{run.name}: trees have {shape.q_heads}/{shape.kv_heads} heads of {shape.head_dim}, "
            f"the model {model.q_heads}/{model.kv_heads} of {model.head_dim}")
    capacity = Capacity.of(trees, page_size)
    cache = TreeCache(PagedKVCache(capacity.pages, page_size, 1, 1))  # page table only
    caches = LayerCaches(model.layers, capacity.pages, page_size, shape.kv_heads, shape.head_dim,
                         dtype, device)
    generator = torch.Generator(device).manual_seed(seed)
    q = torch.randn((capacity.queries, shape.q_heads, shape.head_dim), generator=generator,
                    device=device).to(dtype)
    out = torch.empty_like(q)
    graphs = timing == "graph" and device.type == "cuda"

    measured, active = [], []
    for method in methods:
        entry = _Measured(method.name, method.kind, method.strategy)
        measured.append(entry)
        try:
            entry.reason = method.unavailable(device)
            if entry.reason is None:
                method.setup(capacity, shape, device, caches.scratch_slot)
                entry.timing = entry.e2e_timing = "graph" if graphs and method.graphable \
                    else "eager"
                active.append((method, entry))
            else:
                entry.status = "skipped"
        except Exception as error:  # noqa: BLE001 - one failing method never stops the run
            entry.status, entry.reason = "error", one_line(error)

    decoder = batch = upper = None
    e2e_at = set()
    if e2e:
        decoder = Decoder(model, dtype, device, seed)
        batch = _Batch(*(torch.zeros(capacity.queries, dtype=torch.int64, device=device)
                         for _ in range(3)))
        upper = _Measured("no attention", "upper_bound", None,
                          e2e_timing="graph" if graphs else "eager")
        e2e_at = set(sample_steps(len(steps), e2e_steps))
    check_at = {len(steps) - 1 - k for k in sample_steps(len(steps), check_steps)}
    check_at = check_at if check_steps else set()

    def layer_loop(method, plan):
        for layer in range(model.layers):
            method.run(q, *caches.layer(layer), plan, out=out)
        return out

    def decoder_step(method, plan):
        attention = None if method is None else method.run
        return decoder.forward(batch.tokens, batch.positions, batch.slots, caches, attention, plan)

    for k, tree in enumerate(trees):
        slots = cache.apply(tree).to(device)
        caches.fill_random(slots, generator)
        oracle = None
        plans = {}
        for method, entry in list(active):
            try:
                plan_us, plan = time_plan(partial(method.plan, tree, cache), device, repeats=1)
                plans[method.name] = plan
                entry.plan_ms.append(plan_us / 1e3)
                if entry.version != method.version:  # new buffers: graphs are stale
                    entry.graph = entry.e2e_graph = None
                    entry.version = method.version
                entry.attention_ms.append(
                    _time_step(entry, "", partial(layer_loop, method, plan), device))
                for key, value in method.traffic(plan).items():
                    entry.traffic[key] += value * model.layers
                if k in check_at:
                    oracle = oracle if oracle is not None else _oracle(tree, q, caches, cache)
                    error = rel_err(out[: tree.num_queries].cpu(), oracle)
                    entry.rel_err = max(entry.rel_err or 0.0, error)
            except Exception as error:  # noqa: BLE001
                entry.status, entry.reason = "error", f"step {steps[k]}: {one_line(error)}"
                active.remove((method, entry))
        if k in e2e_at:
            batch.fill(tree, cache, caches.scratch_slot, model.vocab, generator)
            rows = [(None, upper)] if upper.status == "ok" else []
            for method, entry in rows + [m for m in active if m[0].name in plans]:
                plan = None if method is None else plans[method.name]
                step = partial(decoder_step, method, plan)
                try:
                    entry.e2e_ms.append(_time_step(entry, "e2e_", step, device))
                except Exception as error:  # noqa: BLE001
                    entry.status, entry.reason = "error", f"e2e step {steps[k]}: {one_line(error)}"
                    if method is not None:
                        active.remove((method, entry))
        if progress is not None:
            progress(k + 1, len(steps))

    for node in list(cache):
        if cache.is_live(node):
            cache.prune(node)
    cache.check()
    return _result(run, steps, sorted(e2e_at), measured, upper, capacity, cache, device, dict(
        dtype=str(dtype).removeprefix("torch."), page_size=page_size, layers=model.layers,
        timing=timing, seed=seed, e2e=e2e, model=asdict(model) if e2e else None,
        check_steps=check_steps, sglang_kv_splits=SGLANG_KV_SPLITS,
        tolerance=TOLERANCE[dtype]))


def _time_step(entry: _Measured, prefix: str, step, device) -> float:
    """Milliseconds of one step: attention (``prefix`` "") or decoder ("e2e_").

    Where ``entry.<prefix>timing`` is "graph", the CUDA graph ``entry.<prefix>graph`` of
    ``step`` (captured on first use) is replayed; else ``step`` runs eagerly. A capture failure
    falls back to eager for good and is recorded."""
    timing, graph = prefix + "timing", prefix + "graph"
    if getattr(entry, timing) == "graph" and getattr(entry, graph) is None:
        try:
            setattr(entry, graph, capture([step])[0])
        except GraphCaptureError as error:
            setattr(entry, timing, "eager-fallback")
            entry.capture_error = str(error)
    if getattr(entry, timing) == "graph":
        return _elapsed_ms(getattr(entry, graph).replay, device)
    return _elapsed_ms(step, device)


def _elapsed_ms(fn, device: torch.device) -> float:
    """Milliseconds of ``fn()``: CUDA events around it on a GPU, wall clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _oracle(tree, q, caches: LayerCaches, cache: TreeCache) -> torch.Tensor:
    """The float64 oracle of the last layer's attention (test layout, on the CPU)."""
    slots = cache.token_slots(tree).to(caches.k.device)
    k, v = (rows[slots].cpu() for rows in caches.rows(caches.layers - 1))
    return oracle_attention(tree, q[: tree.num_queries].cpu(), k, v)


def _result(run, steps, e2e_at, measured, upper, capacity, cache, device, config) -> dict:
    """The JSON-ready result of a replay (see `replay`)."""

    def seconds(ms_list):
        """(measured sum, mean x steps of the run), in seconds; Nones when nothing was measured."""
        if not ms_list:
            return None, None
        return float(np.sum(ms_list)) / 1e3, float(np.mean(ms_list)) * len(run) / 1e3

    entries = []
    for entry in measured:
        attention, attention_run = seconds(entry.attention_ms)
        plan, plan_run = seconds(entry.plan_ms)
        e2e, e2e_run = seconds(entry.e2e_ms)
        replayed = len(entry.attention_ms)
        entries.append({
            "method": entry.name, "kind": entry.kind, "strategy": entry.strategy,
            "status": entry.status, "reason": entry.reason, "timing": entry.timing,
            "e2e_timing": entry.e2e_timing if entry.e2e_ms else None,
            "capture_error": entry.capture_error,
            "attention_s": attention, "attention_s_run": attention_run,
            "plan_s": plan, "plan_s_run": plan_run, "e2e_s": e2e, "e2e_s_run": e2e_run,
            "traffic": dict(entry.traffic) if replayed else None,
            "kv_bytes_run": entry.traffic["kv_bytes"] * len(run) / replayed if replayed else None,
            "total_bytes_run": sum(entry.traffic.values()) * len(run) / replayed
            if replayed else None,
            "rel_err": entry.rel_err,
            "per_step_ms": {"attention": entry.attention_ms, "plan": entry.plan_ms,
                            "e2e": entry.e2e_ms},
        })
    upper_bound = None
    if upper is not None:
        e2e, e2e_run = seconds(upper.e2e_ms)
        upper_bound = {"status": upper.status, "reason": upper.reason,
                       "timing": upper.e2e_timing,
                       "capture_error": upper.capture_error, "e2e_s": e2e, "e2e_s_run": e2e_run,
                       "per_step_ms": upper.e2e_ms}
    ok = {e["method"]: e for e in entries if e["status"] == "ok" and e["attention_s"]}
    baseline = next((name for name in BASELINES if name in ok), None)
    speedups = {}
    if baseline is not None:
        base = ok[baseline]
        for name, e in ok.items():
            speedups[name] = {
                "attention": base["attention_s_run"] / e["attention_s_run"],
                "e2e": base["e2e_s_run"] / e["e2e_s_run"] if base["e2e_s"] and e["e2e_s"]
                else None,
            }
    return {
        "format": FORMAT,
        "env": environment(device),
        "config": config,
        "workload": {"name": run.name, "description": run.description, "steps": len(run),
                     "replayed": len(steps), "step_indices": steps,
                     "e2e_steps": [steps[k] for k in e2e_at], "capacity": asdict(capacity)},
        "methods": entries,
        "upper_bound": upper_bound,
        "baseline": baseline,
        "speedups": speedups,
        "cache": {"pages": capacity.pages,
                  "pages_in_use_at_end": cache.pool.num_pages - cache.pool.num_free,
                  "nodes_at_end": len(cache)},
    }


# ---------------------------------------------------------------------------- reports
def render(result: dict):
    """A rich table of one replay: a row per method, the upper bound last."""
    from rich.table import Table

    w, env, config = result["workload"], result["env"], result["config"]
    sampled = (f"{w['replayed']} of {w['steps']} steps replayed, totals "
               f"x{w['steps'] / w['replayed']:.2f}" if w["replayed"] < w["steps"]
               else f"all {w['steps']} steps")
    table = Table(
        title=f"{w['name']} on {env['card']}: {config['layers']} layers, {config['dtype']}, "
              f"{config['timing']} timing; {sampled}",
        caption=f"seconds over the whole run; speedups over {result['baseline'] or '(no baseline)'}"
                "; KV GB: the IO model's KV traffic of the run")
    for column in ("method", "timing", "attention s", "plan s", "KV GB", "attn speedup",
                   "decode s", "decode speedup", "rel_err", "note"):
        table.add_column(column, justify="left" if column in ("method", "timing", "note")
                         else "right")
    for e in result["methods"]:
        speed = result["speedups"].get(e["method"], {})
        table.add_row(
            e["method"], e["timing"] or "", _fmt(e["attention_s_run"], ".3f"),
            _fmt(e["plan_s_run"], ".3f"),
            _fmt(e["kv_bytes_run"] and e["kv_bytes_run"] / 1e9, ".1f"),
            _fmt(speed.get("attention"), ".2f"), _fmt(e["e2e_s_run"], ".2f"),
            _fmt(speed.get("e2e"), ".2f"), _fmt(e["rel_err"], ".1e"),
            e["reason"] or e["capture_error"] or "",
            style={"skipped": "dim", "error": "red"}.get(e["status"]))
    upper = result["upper_bound"]
    if upper:
        table.add_row("upper bound (no attention)", upper["timing"] or "", "", "", "", "",
                      _fmt(upper["e2e_s_run"], ".2f"), "", "", upper["reason"] or "",
                      style="dim")
    return table


TABLES = (
    # title, key of a method's entry, divisor, with the no-attention row, speedup kind
    ("Table 3: decoding latency (s)", "e2e_s_run", 1, True, "e2e"),
    ("Table 4: attention latency (s)", "attention_s_run", 1, False, "attention"),
    ("Planning time (s, host; not in Table 4)", "plan_s_run", 1, False, None),
    ("KV cache traffic (TB, IO model, all layers)", "kv_bytes_run", 1e12, False, None),
)
"""The Markdown tables of `markdown_tables`."""


def markdown_tables(results: list) -> str:
    """Tables 3 (decoding latency) and 4 (attention latency), planning time and KV traffic of
    saved replays, in Markdown.

    One row per result (a workload), one column per method that ran in any of them, totals of
    the whole run (extrapolated where steps were sampled; "-" where a method did not run), then
    ``deft_flatten``'s speedup over the baseline.
    """
    methods = list(dict.fromkeys(e["method"] for r in results for e in r["methods"]
                                 if e["status"] == "ok"))
    cards = sorted({f"{r['env']['card']} ({r['config']['dtype']}, {r['config']['timing']})"
                    for r in results})
    lines = [f"Measured on {', '.join(cards)}; totals over the whole run."]
    for title, key, divisor, upper, speedup in TABLES:
        header = ["workload", "steps", *methods]
        header += ["upper bound (no attention)"] if upper else []
        header += ["DeFT-Flatten speedup"] if speedup else []
        lines += ["", f"**{title}**", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for r in results:
            by_name = {e["method"]: e for e in r["methods"]}
            w = r["workload"]
            row = [w["name"], f"{w['replayed']}/{w['steps']}"]
            for m in methods:
                value = by_name[m][key] if m in by_name and by_name[m][key] is not None else None
                row.append("-" if value is None else f"{value / divisor:.2f}")
            if upper:
                row.append(_fmt((r["upper_bound"] or {}).get("e2e_s_run"), ".2f") or "-")
            if speedup:
                speed = r["speedups"].get("deft_flatten", {}).get(speedup)
                row.append(f"{speed:.2f}x over {r['baseline']}" if speed else "-")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m deft.replay RESULT.json ... (prints Tables 3 and 4)")
    print(markdown_tables([json.loads(open(path).read()) for path in sys.argv[1:]]), end="")
