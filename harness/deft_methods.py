"""This project's strategies as harness methods: the Triton kernels and the PyTorch references.

`KernelMethod` runs one strategy's Triton kernels through `deft.TreeAttention` over a paged
cache (bench, replay and autotune's measurements); under ``TRITON_INTERPRET=1`` it runs on the
CPU too (tests). `ReferenceMethod` runs the PyTorch reference of any strategy (`reference`):
under its plain name in the bench (flash_attention, tree_attention_m, vanilla_tree: the test
layout through `reference.output`, planning inside the call), as ``ref:<strategy>`` in the replay
(reading K and V through the cache's slots).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from deft.plan import build_plan
from deft.strategies import LISTS_SLOTS
from harness.kernel_traffic import kernel_traffic, plan_traffic
from harness.methods import Method, Variant, need_cuda

GROWTHS = 8
"""Times a `KernelMethod` doubles its partial-result capacity for one plan before giving up."""


class KernelMethod(Method):
    """One of this project's Triton strategies, through `deft.TreeAttention` (graphable on CUDA).

    Parameters
    ----------
    strategy : str
        One of `deft.strategies.KERNEL_STRATEGIES`.
    chunk_size, group_size : int, optional
        Fixed sizes (autotune's candidates); None: TreeAttention takes them from the tuned
        table, as a caller that sets none does.
    config : deft.kernels.partials.TileConfig, optional
        A fixed tile (autotune's candidates).
    tuned : bool
        True: where nothing is fixed, each plan takes its sizes and tile from the tuned table
        (as a `deft.TreeAttention` caller that sets none). False: exactly the sizes and tile
        given (None: the strategy's defaults and the kernel's tile), as autotune measures.

    Capacities are the replay's peaks (`setup`) or one tree's exact needs (`setup_for`, as
    `deft.attention` sizes them); a plan that needs more (partial-result entries of a deep
    tree) doubles them and re-allocates.
    """

    kind = "deft"
    steps = True

    def __init__(self, strategy: str, chunk_size=None, group_size=None, config=None, *,
                 tuned: bool = True):
        self.name = self.strategy = strategy
        self.description = f"deft.TreeAttention({strategy!r}) over a paged TreeCache (Triton)"
        self.chunk_size, self.group_size, self.config = chunk_size, group_size, config
        self.tuned = tuned
        self._sized = None  # (tree, its plan) of setup_for when untuned: plan() reuses it

    def unavailable(self, device, tree=None):
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return need_cuda(device)

    def setup(self, capacity, shape, device, scratch_slot):
        self._device = device
        self._sizes = dict(max_queries=capacity.queries, max_tokens=capacity.tokens,
                           max_entries=None,
                           max_kv_slots=capacity.visible if self.strategy in LISTS_SLOTS
                           else None)
        self._sized = None
        self._build()

    def setup_for(self, tree, page_size, device):
        sizing = build_plan(self.strategy, tree, self.chunk_size, self.group_size, page_size)
        self._device = device
        self._sizes = dict(max_queries=tree.num_queries, max_tokens=tree.num_tokens,
                           max_entries=len(sizing.query_index),
                           max_kv_slots=int(sizing.tokens.sum()) if self.strategy in LISTS_SLOTS
                           else None)
        self._sized = None if self.tuned else (tree, sizing)
        self._build()

    def _build(self):
        from deft import TreeAttention

        self.graphable = self._device.type == "cuda"
        self.attention = TreeAttention(self.strategy, self.chunk_size, self.group_size,
                                       config=self.config, device=self._device, **self._sizes)
        self._sizes["max_entries"] = self.attention.max_entries
        self.version += 1

    def plan(self, tree, cache):
        from deft.plan_buffers import CapacityError

        reference = self._sized[1] if self._sized and self._sized[0] is tree else None
        for _ in range(GROWTHS):
            try:
                return self.attention.plan(tree, cache, reference)
            except CapacityError:
                self._sizes["max_entries"] *= 2
                if self._sizes["max_kv_slots"] is not None:
                    self._sizes["max_kv_slots"] *= 2
                self._build()
        return self.attention.plan(tree, cache, reference)  # its CapacityError says why

    def run(self, q, k_cache, v_cache, plan, out=None):
        return self.attention.run(q, k_cache, v_cache, plan, out=out)

    def traffic(self, plan):
        return plan_traffic(plan.reference)

    def kernel_traffic(self, plan):
        return kernel_traffic(plan.reference)

    def params(self, plan):
        reference = plan.reference
        sizes = {"chunk_size": reference.chunk_size, "group_size": reference.group_size,
                 "max_entries": self._sizes["max_entries"]}
        if self.strategy in LISTS_SLOTS:
            sizes["max_kv_slots"] = self._sizes["max_kv_slots"]
        return sizes


@dataclass(frozen=True)
class _ReferencePlan:
    tree: object
    plan: object  # deft.plan.Plan
    slots: torch.Tensor  # int64 [tokens], test layout


class ReferenceMethod(Method):
    """The PyTorch reference of a strategy (`reference`): K and V of any device, computed on
    the host (slow, eager only).

    Parameters
    ----------
    strategy : str
        One of `deft.strategies.STRATEGIES`.
    name : str, optional
        Default ``ref:<strategy>`` (kind ``"reference"``); the bench registers the strategies
        without a kernel under their plain names (kind ``"deft"``).
    """

    steps = True
    first_call = "no compilation"

    def __init__(self, strategy: str, name: str | None = None):
        from reference import MODULES

        self.strategy = strategy
        self.name = name or f"ref:{strategy}"
        self.kind = "reference" if name is None else "deft"
        self.description = f"reference.output({strategy!r}, ...): the PyTorch reference"
        self._module = MODULES[strategy]

    def unavailable(self, device, tree=None):
        return None

    def prepare(self, inputs):
        """The test-layout call of `reference.output` (planning inside the call)."""
        import reference

        def call(k, v):
            return reference.output(self.strategy, inputs.tree, inputs.q, k, v,
                                    page_size=inputs.page_size, sm_scale=inputs.sm_scale)

        return [Variant([lambda k=k, v=v: call(k, v) for k, v in zip(inputs.k, inputs.v)],
                        params={"page_size": inputs.page_size})]

    def setup(self, capacity, shape, device, scratch_slot):
        self._device = device

    def plan(self, tree, cache):
        plan = self._module.plan(tree, page_size=cache.pool.page_size)
        return _ReferencePlan(tree, plan, cache.token_slots(tree).to(self._device))

    def run(self, q, k_cache, v_cache, plan, out=None):
        n = plan.tree.num_queries
        k = k_cache.flatten(0, 1)[plan.slots].cpu()
        v = v_cache.flatten(0, 1)[plan.slots].cpu()
        # The reference indexes with host tensors: it computes on the host, as reference.output.
        rows, _ = self._module.attention(plan.tree, q[:n].cpu(), k, v, plan.plan)
        out = torch.empty_like(q) if out is None else out
        out[:n] = rows.to(device=out.device, dtype=out.dtype)
        out[n:] = 0
        return out

    def traffic(self, plan):
        return plan_traffic(plan.plan)
