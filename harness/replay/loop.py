"""Whole-run replay: a decoding run step by step through the paged tree cache, timed per method.

This reproduces the paper's Table 4 (attention latency of a whole run) and, with ``e2e``, its
Table 3 (decoding latency of a Llama-3-8B-shaped model, `harness.decoder`). For every replayed
step:

1. the tree cache follows the run (`deft.cache.TreeCache.apply`: grow, branch, prune) and the
   step's new tokens get random K and V in every layer (`harness.decoder.LayerCaches`: each
   layer has its own cache, so no layer finds another's KV in L2);
2. every method plans the step once (host time, reported apart as the paper leaves it out);
3. every method runs attention once per layer, ``layers`` layers, timed with CUDA events around
   the step's layer loop — in ``"graph"`` timing one CUDA graph of that loop per method,
   captured once and replayed every step (plans refill fixed-capacity buffers in place, so the
   graph stays valid), as serving engines run decode; ``"eager"`` launches from Python;
4. with ``e2e``, the step's queries go through the decoder as one batch, once per method and
   once without attention (the "upper bound (no attention)" row), each a CUDA graph too.

Every method implements the IO model's view of one Table 1 strategy; the bytes its plan moves
(`iomodel.traffic`, one layer) times ``layers`` are summed over the run, and for this project's
kernels also the bytes they really read (`harness.kernel_traffic`: no bit mask, no page table,
int32 slots and Euler intervals instead). At ``check_steps`` steps (the last first) each
method's output of the last layer is compared with the float64 oracle.

Sampling. ``max_steps`` replays that many steps evenly spaced over the run (first and last
included); ``e2e_steps`` runs the decoder on that many of them, evenly spaced. Totals over the
whole run are extrapolated as (mean over the steps measured) x (steps of the run), reported
beside the measured sums (keys ``*_run``). Times are seconds.

Methods are the harness's stepping methods (`harness.registry.parse_methods` with
``steps=True``): this project's Triton strategies through `deft.TreeAttention`, ``sglang``
(`harness.sglang`: page size 1, one request per query, SGLang's server default of 8 KV
splits), and ``ref:<strategy>``, the PyTorch reference of any strategy (CPU tests). The result
(`harness.replay.result`) and its tables (`harness.replay.report`; ``python -m harness.replay
OUT/*.json`` prints Tables 3 and 4 of saved results as Markdown) live beside this loop.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch

from deft.cache import PagedKVCache, TreeCache
from deft.plan import BYTE_KEYS
from harness.inputs import DTYPES, with_dtype
from harness.bench.runner import TOLERANCE
from harness.decoder import LLAMA3_8B, Decoder, DecoderConfig, LayerCaches
from harness.kernel_traffic import KERNEL_BYTE_KEYS
from harness.methods import Capacity, time_plan
from harness.replay.result import replay_result
from harness.sglang import KV_SPLITS
from harness.timing import GraphCaptureError, capture, one_line
from reference import oracle_attention, rel_err


def sample_steps(steps: int, count=None) -> list:
    """``count`` step indices evenly spaced over ``range(steps)``, first and last included
    (all of them when ``count`` is None or at least ``steps``)."""
    if count is None or count >= steps:
        return list(range(steps))
    return np.unique(np.linspace(0, steps - 1, count).round().astype(np.int64)).tolist()



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
    kernel_traffic: dict | None = None  # by KERNEL_BYTE_KEYS, for methods that report it
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
    methods : list of harness.methods.Method
        Methods that step, e.g. ``harness.registry.parse_methods("all", steps=True)``.
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
        model's bytes of every layer and what the kernels read, measured and ``*_run``, rel_err,
        per-step ms),
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
                read = method.kernel_traffic(plan)
                if read is not None:
                    entry.kernel_traffic = entry.kernel_traffic or dict.fromkeys(
                        KERNEL_BYTE_KEYS, 0)
                    for key, value in read.items():
                        entry.kernel_traffic[key] += value * model.layers
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
    return replay_result(run, steps, sorted(e2e_at), measured, upper, capacity, cache, device, dict(
        dtype=str(dtype).removeprefix("torch."), page_size=page_size, layers=model.layers,
        timing=timing, seed=seed, e2e=e2e, model=asdict(model) if e2e else None,
        check_steps=check_steps, sglang_kv_splits=KV_SPLITS,
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


