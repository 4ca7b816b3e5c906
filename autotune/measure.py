"""Measuring candidates on one workload, with the bench's timing discipline.

A `Workbench` holds one workload on the GPU: random inputs and `GRAPH_COPIES` different KV
copies in paged caches (`harness.inputs.make_inputs`, `deft.plan_buffers.paged_cache`), shared by
every candidate. Each candidate is the harness's method of its strategy with the candidate's
sizes and tile fixed (`harness.deft_methods.KernelMethod`, ``tuned=False``: sized to its plan,
no table consulted), planned once; its first call (which pays Triton's compilation) is checked against the default config's output, then one call per KV copy is captured in a CUDA
graph (`harness.timing.capture`): replaying it never finds the KV in L2. Timing interleaves
the candidates: each round times every candidate once (`do_bench` median of the replay, L2
flushed, divided by the copies), in an order rotated per round, and a candidate's time is the
median over rounds, so drift of clocks or temperature spreads over all of them alike.
Without CUDA (tests, ``TRITON_INTERPRET=1``) the first copy's call is timed eagerly.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from autotune.space import Candidate
from deft.plan_buffers import paged_cache
from deft.tree import Tree
from harness.bench.runner import GRAPH_COPIES, TOLERANCE
from harness.deft_methods import KernelMethod
from harness.inputs import make_inputs
from harness.timing import CudaTimer, WallTimer, capture, one_line
from reference.oracle import rel_err

ROUNDS = 3
"""Interleaved rounds of a first measurement."""

LEADER_ROUNDS = 5
"""Interleaved rounds when the leaders are re-timed."""

WARMUP_MS, REP_MS = 5, 20
"""do_bench budgets of one timing (one candidate, one round)."""

PAGE_SIZE = 16
"""Tokens per page of the measured caches (the bench's default)."""


@dataclass
class Measurement:
    """One candidate's result on one workload.

    Attributes
    ----------
    status : str
        ``ok``, ``wrong`` (output differs from the default's beyond the tolerance) or
        ``error`` (failed to plan, compile, run or capture).
    us : float or None
        Median over rounds of the per-call time, µs.
    rounds_us : list of float
        Per-call time of each round, µs.
    rel_err : float or None
        Against the default config's output.
    reason : str or None
    """

    status: str
    us: float | None = None
    rounds_us: list = field(default_factory=list)
    rel_err: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        return {"status": self.status, "us": self.us, "rounds_us": self.rounds_us,
                "rel_err": self.rel_err, "reason": self.reason}


@dataclass
class _Ready:
    replay: Callable[[], object]
    calls: int
    rel_err: float
    keep: tuple  # what the replay reads: the attention, its plan, outputs, the graph


class Workbench:
    """One strategy on one workload, ready to measure candidates (module docstring).

    Parameters
    ----------
    strategy : str
        A strategy of `deft.kernels.KERNELS`.
    tree : Tree
    reference : Candidate
        The config whose output every other candidate is checked against (the default); it is
        prepared here, and a failure raises.
    dtype : torch.float16 or torch.bfloat16
    device : str or torch.device
    page_size : int
    copies : int
        KV copies rotated in one graph.
    seed : int
    timer : optional
        Default: `harness.timing.CudaTimer` (`WARMUP_MS`, `REP_MS`) on CUDA, else a
        `WallTimer` (CPU dry runs under ``TRITON_INTERPRET=1``; never for reported numbers).
    """

    def __init__(self, strategy: str, tree: Tree, reference: Candidate, *, dtype=torch.float16,
                 device="cuda", page_size: int = PAGE_SIZE, copies: int = GRAPH_COPIES,
                 seed: int = 0, timer=None):
        self.strategy = strategy
        self.device = torch.device(device)
        self.page_size = page_size
        self.tolerance = TOLERANCE[dtype]
        if timer is None:
            timer = CudaTimer(WARMUP_MS, REP_MS) if self.device.type == "cuda" else WallTimer()
        self.timer = timer
        copies = copies if self.device.type == "cuda" else 1
        inputs = make_inputs(tree, dtype, copies, self.device, seed, page_size)
        self.tree, self.q, self.sm_scale = inputs.tree, inputs.q, inputs.sm_scale
        paged = [paged_cache(self.tree, k, v, page_size) for k, v in zip(inputs.k, inputs.v)]
        self.caches = [(k_cache, v_cache) for k_cache, v_cache, _ in paged]
        self.table = paged[0][2]
        self.expected = None
        self._prepared = {}  # candidate -> _Ready, or the Measurement of its failure
        self._measured = set()
        first = self._prepare(reference)
        if isinstance(first, Measurement):
            raise RuntimeError(f"the reference config {reference.label()} failed: {first.reason}")

    def measure(self, candidates, rounds: int = ROUNDS,
                progress: Callable[[Candidate], None] | None = None) -> dict:
        """Time `candidates` in `rounds` interleaved rounds.

        Candidates seen before are not prepared again (their graphs are kept), so re-timing
        leaders costs only the rounds. `progress` is called once per candidate, the first time
        it is measured.

        Returns
        -------
        dict
            Candidate -> `Measurement`, in the order given.
        """
        results, ready = {}, []
        for candidate in dict.fromkeys(candidates):
            prepared = self._prepared.get(candidate) or self._prepare(candidate)
            if isinstance(prepared, Measurement):
                results[candidate] = prepared
            else:
                ready.append(candidate)
            if progress is not None and candidate not in self._measured:
                progress(candidate)
            self._measured.add(candidate)
        times = {candidate: [] for candidate in ready}
        for r in range(rounds if ready else 0):
            shift = r % len(ready)
            for candidate in ready[shift:] + ready[:shift]:
                prepared = self._prepared[candidate]
                times[candidate].append(self.timer.eager(prepared.replay).median_us
                                        / prepared.calls)
        for candidate in ready:
            results[candidate] = Measurement("ok", statistics.median(times[candidate]),
                                             times[candidate], self._prepared[candidate].rel_err)
        return {candidate: results[candidate] for candidate in dict.fromkeys(candidates)}

    def close(self) -> None:
        """Free the graphs, workspaces and caches."""
        self._prepared.clear()
        self.caches = self.q = self.expected = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ one candidate
    def _prepare(self, candidate: Candidate):
        """Plan, run once, check, capture: a `_Ready`, or a failed `Measurement` (kept, so a
        failing candidate is not retried)."""
        try:
            method = KernelMethod(self.strategy, candidate.chunk_size, candidate.group_size,
                                  candidate.tile, tuned=False)
            method.setup_for(self.tree, self.page_size, self.device)
            plan = method.plan(self.tree, self.table)
            outs = [torch.empty_like(self.q) for _ in self.caches]
            calls = [lambda kv=kv, out=out: method.run(self.q, *kv, plan, out=out)
                     for kv, out in zip(self.caches, outs)]
            outs[0].fill_(float("nan"))
            first = calls[0]()
            if self.expected is None:
                self.expected = first.clone()
            error = rel_err(first, self.expected)
            if not error <= self.tolerance:  # NaN fails too
                failed = Measurement("wrong", rel_err=error,
                                     reason=f"rel_err {error:.3g} to the default's output")
                self._prepared[candidate] = failed
                return failed
            if self.device.type == "cuda":
                graph, _ = capture(calls)
                ready = _Ready(graph.replay, len(calls), error, (method, plan, outs, graph))
            else:
                ready = _Ready(calls[0], 1, error, (method, plan, outs))
        except Exception as error:  # noqa: BLE001 - a failing candidate never stops tuning
            failed = Measurement("error", reason=one_line(error))
            self._prepared[candidate] = failed
            return failed
        self._prepared[candidate] = ready
        return ready


def workbenches(dtype=torch.float16, device="cuda", page_size: int = PAGE_SIZE):
    """The ``make_bench`` of `autotune.tune.autotune`: a `Workbench` per (strategy, tree,
    reference) with these settings."""

    def make(strategy: str, tree: Tree, reference: Candidate) -> Workbench:
        return Workbench(strategy, tree, reference, dtype=dtype, device=device,
                         page_size=page_size)

    return make
