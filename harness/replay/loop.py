"""Whole-run replay: a decoding run step by step through the paged tree cache, timed per method.

This reproduces the paper's Table 4 (attention latency of a whole run) and, with ``e2e``, its
Table 3 (decoding latency of a Llama-3-8B-shaped model, `harness.decoder`). Every step of the
run is replayed (or of a range of it: ``steps=(start, stop)``, merged afterwards by
`harness.replay.merge`); for each:

1. the tree cache follows the run (`deft.cache.TreeCache.apply`: grow, branch, prune) and the
   step's new tokens get random K and V in every layer (`harness.decoder.LayerCaches`: each
   layer has its own cache, so no layer finds another's KV in L2);
2. every method runs attention once per layer, ``layers`` layers, timed with CUDA events around
   the step's layer loop (Table 4) — in ``"graph"`` timing one CUDA graph of that loop per
   method, captured once and replayed every step (plans refill fixed-capacity buffers in place,
   so the graph stays valid), as serving engines run decode; ``"eager"`` launches from Python;
3. with ``e2e``, the step's queries go through the decoder as one batch, each method's step a
   CUDA graph too, timed three ways (`harness.replay.measure`): without planning (GPU time, as
   the paper), with the step's plan in line (wall time of plan, run, synchronise) and with the
   next step's plan overlapped (wall time of launch, plan the next step, synchronise); the
   decoder without attention gives the "upper bound (no attention)" row.

Every method implements the IO model's view of one Table 1 strategy; the bytes its plan moves
(`iomodel.traffic`, one layer) times ``layers`` are summed over the run, and for this project's
kernels also the bytes they really read (`harness.kernel_traffic`: no bit mask, no page table,
int32 slots and Euler intervals instead). At ``check_steps`` steps (the last first) each
method's output of the last layer is compared with the float64 oracle.

``max_steps`` (debugging only) replays that many steps evenly spaced instead; the result is
marked ``sampled`` and its whole-run totals are extrapolated (mean x steps), which the tables
never call a full run. Times are seconds.

Methods are the harness's stepping methods (`harness.registry.parse_methods` with
``steps=True``): this project's Triton strategies through `deft.TreeAttention`, ``sglang``
(`harness.sglang`: page size 1, one request per query, SGLang's server default of 8 KV
splits), and ``ref:<strategy>``, the PyTorch reference of any strategy (CPU tests). The result
(`harness.replay.result`) and its tables (`harness.replay.report`; ``python -m harness.replay
OUT/*.json`` prints Tables 3 and 4 of saved results as Markdown) live beside this loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch

from deft.cache import PagedKVCache, TreeCache
from harness.inputs import DTYPES, with_dtype
from harness.bench.runner import TOLERANCE
from harness.decoder import LLAMA3_8B, Decoder, DecoderConfig, LayerCaches
from harness.kernel_traffic import KERNEL_BYTE_KEYS
from harness.methods import Capacity
from harness.replay.measure import Measured, runnable, time_step, timed_wall
from harness.replay.result import replay_result
from harness.sglang import KV_SPLITS
from harness.timing import one_line
from reference import oracle_attention, rel_err


def sample_steps(steps: int, count=None) -> list:
    """``count`` step indices evenly spaced over ``range(steps)``, first and last included
    (all of them when ``count`` is None or at least ``steps``)."""
    if count is None or count >= steps:
        return list(range(steps))
    return np.unique(np.linspace(0, steps - 1, count).round().astype(np.int64)).tolist()


def parse_step_range(text: str, steps: int) -> tuple:
    """``"A:B"`` (either end may be left out) as ``(start, stop)`` within ``range(steps)``."""
    first, sep, last = text.partition(":")
    try:
        if not sep:
            raise ValueError
        start, stop = int(first or 0), int(last) if last else steps
    except ValueError:
        raise ValueError(f"a step range is START:STOP, e.g. 0:400, got {text!r}") from None
    if not 0 <= start < stop <= steps:
        raise ValueError(f"step range {text!r} is not within the run's {steps} steps "
                         "(0 <= START < STOP <= steps)")
    return start, stop


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


def replay(run, methods, *, model: DecoderConfig = LLAMA3_8B, e2e=False, e2e_methods=None,
           steps=None, max_steps=None, dtype=torch.float16, page_size=16, timing="graph",
           check_steps=1, seed=0, device="cuda", progress=None) -> dict:
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
        Also time the decoder step, three ways per method, and without attention.
    e2e_methods : collection of str, optional
        With ``e2e``, the methods that run through the decoder (default: all); the others are
        timed for attention only.
    steps : (start, stop), optional
        Replay only the run's steps ``start`` to ``stop - 1`` (the cache is first brought to
        ``start`` on the host); default: every step.
    max_steps : int, optional
        Debugging only: that many steps, evenly spaced; the result is marked sampled.
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
        The JSON-ready result of `harness.replay.result.replay_result` (format
        ``deft-replay/2``).
    """
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype}")
    if timing not in ("graph", "eager"):
        raise ValueError(f"timing must be 'graph' or 'eager', got {timing!r}")
    if steps is not None and max_steps is not None:
        raise ValueError("steps (a range) and max_steps (sampling) do not go together")
    device = torch.device(device)
    start, stop = (0, len(run)) if steps is None else steps
    if not 0 <= start < stop <= len(run):
        raise ValueError(f"steps {start}:{stop} are not within the run's {len(run)} steps")
    indices = sample_steps(len(run), max_steps) if max_steps is not None \
        else list(range(start, stop))
    trees = [with_dtype(run.tree(i), dtype) for i in range(len(run))]
    shape = trees[0].attention
    if (shape.q_heads, shape.kv_heads, shape.head_dim) != (model.q_heads, model.kv_heads,
                                                           model.head_dim):
        raise ValueError(
            f"{run.name}: trees have {shape.q_heads}/{shape.kv_heads} heads of {shape.head_dim}, "
            f"the model {model.q_heads}/{model.kv_heads} of {model.head_dim}")
    capacity = Capacity.of(trees, page_size)  # of the whole run: every range sizes alike
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
        entry = Measured(method.name, method.kind, method.strategy)
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
    through_decoder = set()
    if e2e:
        decoder = Decoder(model, dtype, device, seed)
        batch = _Batch(*(torch.zeros(capacity.queries, dtype=torch.int64, device=device)
                         for _ in range(3)))
        upper = Measured("no attention", "upper_bound", None,
                         e2e_timing="graph" if graphs else "eager")
        through_decoder = {m.name for m in methods} if e2e_methods is None else set(e2e_methods)
    check_at = {len(indices) - 1 - k for k in sample_steps(len(indices), check_steps)}
    check_at = check_at if check_steps else set()
    current = {}  # method name -> its plan now in its buffers

    def plan_step(method, tree):
        current[method.name] = method.plan(tree, cache)

    def layer_loop(method):
        for layer in range(model.layers):
            method.run(q, *caches.layer(layer), current[method.name], out=out)
        return out

    def decoder_step(method):
        if method is None:
            return decoder.forward(batch.tokens, batch.positions, batch.slots, caches)
        return decoder.forward(batch.tokens, batch.positions, batch.slots, caches, method.run,
                               current[method.name])

    def advance(index):  # the cache to step `index`, its new tokens' K and V drawn
        slots = cache.apply(trees[index]).to(device)
        caches.fill_random(slots, generator)

    if max_steps is None:
        for index in range(start):  # bring the page table to the range's first step
            cache.apply(trees[index])
    for k, index in enumerate(indices):
        tree = trees[index]
        if k == 0 or max_steps is not None:
            advance(index)  # else the previous step's planning ahead did
        if e2e:
            batch.fill(tree, cache, caches.scratch_slot, model.vocab, generator)
        oracle = None
        for method, entry in list(active):
            try:
                _measure(entry, method, partial(plan_step, method, tree),
                         partial(layer_loop, method), partial(decoder_step, method),
                         method.name in through_decoder, device)
                plan = current[method.name]
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
                entry.status, entry.reason = "error", f"step {index}: {one_line(error)}"
                active.remove((method, entry))
        if e2e and upper.status == "ok":
            try:
                upper.per_step["e2e"].append(
                    time_step(upper, "e2e_", partial(decoder_step, None), device))
            except Exception as error:  # noqa: BLE001
                upper.status, upper.reason = "error", f"e2e step {index}: {one_line(error)}"
        following = indices[k + 1] if k + 1 < len(indices) else (
            stop if max_steps is None and stop < len(run) else None)
        if max_steps is None and following is not None:
            advance(following)  # planning ahead needs the next step's page table
        for method, entry in [m for m in active if m[0].name in through_decoder]:
            try:
                ahead = None if following is None else partial(plan_step, method,
                                                                trees[following])
                wall, _, _ = timed_wall(runnable(entry, "e2e_", partial(decoder_step, method)),
                                        device, overlapped=ahead)
                if index == 0:  # the run's first plan has nothing to hide behind
                    wall += entry.per_step["plan"][-1]
                entry.per_step["overlap"].append(wall)
            except Exception as error:  # noqa: BLE001
                entry.status, entry.reason = "error", f"overlapped step {index}: {one_line(error)}"
                active.remove((method, entry))
        if progress is not None:
            progress(k + 1, len(indices))

    for node in list(cache):
        if cache.is_live(node):
            cache.prune(node)
    cache.check()
    config = dict(
        dtype=str(dtype).removeprefix("torch."), page_size=page_size, layers=model.layers,
        timing=timing, seed=seed, e2e=e2e, model=asdict(model) if e2e else None,
        e2e_methods=sorted(through_decoder) if e2e else None, check_steps=check_steps,
        sglang_kv_splits=KV_SPLITS, tolerance=TOLERANCE[dtype])
    return replay_result(run, indices, None if max_steps is not None else (start, stop),
                         measured, upper, capacity, cache, device, config)


def _measure(entry: Measured, method, plan, layer_loop, decoder_step, through_decoder: bool,
             device) -> None:
    """One step of one method: its plan, attention of all layers and, ``through_decoder``, the
    decoder step without planning and with its plan in line (`harness.replay.measure`).

    Graphs are (re)captured against a plan already in the method's buffers; a plan that had to
    re-allocate them (``method.version`` bumped) makes them stale, and is measured again."""
    for _ in range(2):
        if entry.version != method.version:
            plan()
            entry.graph = entry.e2e_graph = None
            entry.version = method.version
        if through_decoder:
            inline, gpu, plan_ms = timed_wall(runnable(entry, "e2e_", decoder_step), device,
                                              host=plan)
        else:
            _, _, plan_ms = timed_wall(lambda: None, device, host=plan)
        if entry.version == method.version:
            break
    entry.per_step["plan"].append(plan_ms)
    if through_decoder:
        entry.per_step["e2e"].append(gpu)
        entry.per_step["inline"].append(inline)
    entry.per_step["attention"].append(time_step(entry, "", layer_loop, device))


def _oracle(tree, q, caches: LayerCaches, cache: TreeCache) -> torch.Tensor:
    """The float64 oracle of the last layer's attention (test layout, on the CPU)."""
    slots = cache.token_slots(tree).to(caches.k.device)
    k, v = (rows[slots].cpu() for rows in caches.rows(caches.layers - 1))
    return oracle_attention(tree, q[: tree.num_queries].cpu(), k, v)
