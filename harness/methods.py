"""The method protocol of the harness: one attention method, as bench, replay and autotune use it.

A `Method` is this project's strategy (`harness.deft_methods`) or a peer (`harness.peers`,
`harness.sglang`). Every one answers `unavailable` (the reason it cannot run: a missing
package, no GPU, a tree shape it does not support) and `prepare`, the bench's one-shot entry.
A method that *steps* (``steps = True``) also runs over a paged tree cache step by step:

- `setup` allocates fixed-capacity buffers for the largest step (`Capacity`);
- `plan` does the host work of one step (page tables, partitions), outside timing;
- `run` is the attention of one layer; where ``graphable`` it does no host work, so a CUDA
  graph of it stays valid across plans (``version`` is bumped when `setup` or `plan` had to
  re-allocate: graphs must then be re-captured);
- `traffic` is the IO model's bytes of the plan (the paper's accounting of the strategy), and
  `kernel_traffic` the bytes this project's kernels really read (`harness.kernel_traffic`).

For a stepping method, `prepare` is derived: `paged_variant` lays the bench's KV copies into
paged caches, plans once (timed apart as ``plan_us``) and returns one call per copy. One-shot
peers (FlashInfer, SDPA, FlexAttention) implement `prepare` themselves and do not step.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from deft.cache import PagedKVCache, TreeCache, pages_for
from harness.timing import synchronize


@dataclass
class Variant:
    """One ready-to-time setting of a method on one workload.

    Attributes
    ----------
    calls : list of callables
        One per KV copy of the inputs, in order; each computes the whole attention call on
        its copy and returns the output ``[queries, q_heads, head_dim]`` (a view is fine).
    label : str
        What distinguishes this variant ("" when the method has one), e.g. ``"splits=8"``.
    plan_us : float or None
        Median host time of the method's planning step (None: it has none).
    poison : list of tensors
        Output buffers that ``calls[0]`` writes; the runner fills them with NaN before the
        correctness check, so rows the method never writes show up.
    params : dict
        Settings to record in the JSON (chunk and group sizes, page size, ...).
    """

    calls: list[Callable[[], torch.Tensor]]
    label: str = ""
    plan_us: float | None = None
    poison: list[torch.Tensor] = field(default_factory=list)
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Capacity:
    """The largest step a method must hold: what fixed-capacity buffers are sized to.

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
        """The capacity of a list of trees (one per step)."""
        return cls(
            queries=max(t.num_queries for t in trees),
            tokens=max(t.num_tokens for t in trees),
            pages=max(pages_for(t, page_size) for t in trees),
            visible=max(int(t.visible_tokens.sum()) for t in trees),
        )


class Method:
    """An attention method of the harness (module docstring). Subclasses set the attributes
    and implement `unavailable`, and `prepare` or the stepping methods.

    Attributes
    ----------
    name : str
        As given to ``--methods``, in the tables and the JSON.
    kind : str
        ``"deft"`` (this project's strategies), ``"peer"`` or ``"reference"`` (PyTorch).
    strategy : str or None
        The Table 1 strategy it implements (its IO-model traffic); None for one-shot peers.
    description : str
        One line: what is called and how.
    first_call : str
        What the first call pays besides the work (JIT compilation), for the progress log.
    steps : bool
        Whether it implements `setup`, `plan`, `run` and `traffic` (replay, autotune).
    page_size : int or None
        The cache page size it reads (None: the caller's).
    graphable : bool
        Whether `run` does no host work (set by `setup`).
    version : int
        Bumped whenever buffers were re-allocated.
    """

    name = ""
    kind = "peer"
    strategy: str | None = None
    description = ""
    first_call = "Triton compiles on first use"
    steps = False
    page_size: int | None = None
    graphable = False
    version = 0

    def unavailable(self, device: torch.device, tree=None) -> str | None:
        """Why this method cannot run on ``device`` (and ``tree``, when given), or None."""
        raise NotImplementedError

    def prepare(self, inputs) -> list[Variant]:
        """Plan and lay out everything once for `inputs` (`harness.inputs.Inputs`);
        return the variants to check and time. Stepping methods: `paged_variant`."""
        return [paged_variant(self, inputs)]

    def setup(self, capacity: Capacity, shape, device: torch.device, scratch_slot: int) -> None:
        """Allocate for ``capacity`` (shape: the trees' `deft.tree.AttentionShape`); padding rows
        of q read the KV at ``scratch_slot``."""
        raise NotImplementedError

    def setup_for(self, tree, page_size: int, device: torch.device) -> None:
        """`setup` sized to exactly one tree (the bench's and autotune's one-off calls)."""
        self.setup(Capacity.of([tree], page_size), tree.attention, device, scratch_slot=0)

    def plan(self, tree, cache: TreeCache):
        """Plan one step over the cache's page table; returns the plan `run` takes."""
        raise NotImplementedError

    def run(self, q, k_cache, v_cache, plan, out=None):
        """Attention of one layer. q, out [rows >= queries, q_heads, head_dim] (rows past the
        plan's queries are padding); k_cache, v_cache [pages, page_size, kv_heads, head_dim]."""
        raise NotImplementedError

    def traffic(self, plan) -> dict:
        """The IO model's bytes of the plan (`iomodel.traffic`), by `deft.plan.BYTE_KEYS`."""
        raise NotImplementedError

    def kernel_traffic(self, plan) -> dict | None:
        """The bytes this method's kernels read and write (`harness.kernel_traffic`), or None
        where the method's own accounting is the IO model's."""
        return None

    def params(self, plan) -> dict:
        """Settings of a plan to record in the JSON (chunk and group sizes, ...)."""
        return {}

    def __repr__(self):
        return f"<{self.kind} method {self.name}>"


def paged_variant(method: Method, inputs, label: str = "") -> Variant:
    """The bench's variant of a stepping method: the KV copies of `inputs` in paged caches
    (``method.page_size`` tokens a page, else the bench's), one plan, one call per copy."""
    tree = inputs.tree
    shape = tree.attention
    device = inputs.device
    page_size = method.page_size or inputs.page_size
    pool = PagedKVCache(pages_for(tree, page_size), page_size, shape.kv_heads, shape.head_dim,
                        dtype=inputs.dtype, device=device)
    cache = TreeCache(pool)
    slots = cache.apply(tree)  # every token is new: slots of the test layout
    pool.write(slots, inputs.k[0], inputs.v[0])
    caches = [(pool.k, pool.v)]
    for k, v in zip(inputs.k[1:], inputs.v[1:]):
        k_cache, v_cache = torch.zeros_like(pool.k), torch.zeros_like(pool.v)
        k_cache.view(-1, shape.kv_heads, shape.head_dim)[slots] = k
        v_cache.view(-1, shape.kv_heads, shape.head_dim)[slots] = v
        caches.append((k_cache, v_cache))
    method.setup_for(tree, page_size, device)
    plan_us, plan = time_plan(lambda: method.plan(tree, cache), device)
    outs = [torch.empty_like(inputs.q) for _ in caches]
    calls = [lambda kv=kv, out=out: method.run(inputs.q, *kv, plan, out=out)
             for kv, out in zip(caches, outs)]
    return Variant(calls, label=label, plan_us=plan_us, poison=outs[:1],
                   params={"page_size": page_size, **method.params(plan)})


def need_cuda(device: torch.device) -> str | None:
    """The reason to skip a GPU-only method on `device`, or None on a CUDA device."""
    if device.type != "cuda":
        return f"needs a CUDA device (inputs are on {device.type})"
    return None


def need_module(module: str, hint: str = "") -> str | None:
    """The reason to skip a method whose package `module` is not installed, or None."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed" + (f" ({hint})" if hint else "")
    return None


def time_plan(plan: Callable[[], object], device: torch.device, repeats: int = 5):
    """Run `plan` `repeats` times; return (median µs, the last result).

    Host wall time, with the device synchronised before and after each call, so what the
    planner leaves running on the GPU counts too.
    """
    times = []
    result = None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = plan()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e6)
    return float(np.median(times)), result

