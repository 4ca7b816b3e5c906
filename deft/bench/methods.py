"""The registry of benchmarked methods: this project's strategies and the peers, by name.

This project's Triton strategies run through `deft.TreeAttention` over a paged cache
(`deft.cache.PagedKVCache` and `TreeCache`, ``page_size`` tokens a page): the plan is built
once, outside timing, and its host time is reported separately as ``plan_us``. They are
benchmarked by default; the PyTorch ones (flash_attention, tree_attention_m, vanilla_tree)
only when named. Under ``TRITON_INTERPRET=1`` the Triton strategies run on the CPU too (tests).
"""

from __future__ import annotations

import os

import torch

from deft.bench.base import Method, Variant, need_cuda, time_plan
from deft.bench.peers import PEERS
from deft.strategies import KERNEL_STRATEGIES, LISTS_SLOTS, REFERENCE_ONLY

GPU_STRATEGIES = tuple(reversed(KERNEL_STRATEGIES))
"""This project's Triton strategies, in the table's order (DeFT-Flatten first)."""

PYTORCH_STRATEGIES = REFERENCE_ONLY
"""Strategies that run in PyTorch: benchmarked only when named in ``--methods``."""

KV_SLOT_STRATEGIES = LISTS_SLOTS
"""Strategies whose TreeAttention takes ``max_kv_slots`` (one listed slot per visible token)."""


class DeftStrategy(Method):
    """One of this project's strategies.

    The Triton strategies run through ``deft.TreeAttention`` over a `deft.cache.TreeCache`
    (plan once, run per call), sized to the plan as `deft.attention` sizes it; the PyTorch ones
    through the test-layout wrapper ``deft.attention`` (their reference; planning included in
    the call).
    """

    kind = "deft"

    def __init__(self, strategy: str):
        self.name = strategy
        if strategy in GPU_STRATEGIES:
            self.description = f"deft.TreeAttention({strategy!r}) over a paged TreeCache (Triton)"
        else:
            self.description = f"deft.attention({strategy!r}, ...): the PyTorch reference"
            self.first_call = "no compilation"

    def unavailable(self, inputs):
        if self.name in GPU_STRATEGIES and os.environ.get("TRITON_INTERPRET") != "1":
            return need_cuda(inputs.device)
        return None

    def prepare(self, inputs):
        if self.name in PYTORCH_STRATEGIES:
            return [self._reference(inputs)]
        return [self._kernel(inputs)]

    def _reference(self, inputs) -> Variant:
        import deft

        def call(k, v):
            return deft.attention(self.name, inputs.tree, inputs.q, k, v,
                                  page_size=inputs.page_size, sm_scale=inputs.sm_scale)

        return Variant([lambda k=k, v=v: call(k, v) for k, v in zip(inputs.k, inputs.v)],
                       params={"page_size": inputs.page_size})

    def _kernel(self, inputs) -> Variant:
        from deft import TreeAttention
        from deft.cache import PagedKVCache, TreeCache, pages_for
        from deft.plan import build_plan

        tree = inputs.tree
        shape = tree.attention
        device = inputs.device
        pool = PagedKVCache(pages_for(tree, inputs.page_size), inputs.page_size, shape.kv_heads,
                            shape.head_dim, dtype=inputs.dtype, device=device)
        cache = TreeCache(pool)
        slots = cache.apply(tree)  # every token is new: slots of the test layout
        pool.write(slots, inputs.k[0], inputs.v[0])
        caches = [(pool.k, pool.v)]
        for k, v in zip(inputs.k[1:], inputs.v[1:]):
            k_cache, v_cache = torch.zeros_like(pool.k), torch.zeros_like(pool.v)
            k_cache.view(-1, shape.kv_heads, shape.head_dim)[slots] = k
            v_cache.view(-1, shape.kv_heads, shape.head_dim)[slots] = v
            caches.append((k_cache, v_cache))
        # Capacities of exactly this step, as deft.attention sizes them.
        sizing = build_plan(self.name, tree, page_size=inputs.page_size)
        capacity = {"max_entries": len(sizing.query_index)}
        if self.name in KV_SLOT_STRATEGIES:
            capacity["max_kv_slots"] = int(sizing.tokens.sum())
        attention = TreeAttention(self.name, max_queries=tree.num_queries,
                                  max_tokens=tree.num_tokens, device=device, **capacity)
        plan_us, plan = time_plan(lambda: attention.plan(tree, cache), device)
        outs = [torch.empty_like(inputs.q) for _ in caches]

        def call(k_cache, v_cache, out):
            attention.run(inputs.q, k_cache, v_cache, plan, out=out, sm_scale=inputs.sm_scale)
            return out

        reference = plan.reference
        params = {"page_size": inputs.page_size, "chunk_size": reference.chunk_size,
                  "group_size": reference.group_size, **capacity}
        return Variant([lambda kv=kv, out=out: call(*kv, out) for kv, out in zip(caches, outs)],
                       plan_us=plan_us, poison=outs[:1], params=params)


METHODS = {
    **{name: DeftStrategy(name) for name in GPU_STRATEGIES + PYTORCH_STRATEGIES},
    **{peer.name: peer() for peer in PEERS},
}
"""Every method by name."""

GROUPS = {
    "all": GPU_STRATEGIES + tuple(peer.name for peer in PEERS),
    "strategies": GPU_STRATEGIES,
    "peers": tuple(peer.name for peer in PEERS),
}
"""Names ``--methods`` accepts for several methods at once."""

DEFAULT_METHODS = GROUPS["all"]


def parse_methods(text: str) -> list[Method]:
    """The methods of a ``--methods`` value: names and groups, comma-separated, in order.

    Raises ValueError naming the unknown entry and listing the valid ones.
    """
    names = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item in GROUPS:
            names.extend(GROUPS[item])
        elif item in METHODS:
            names.append(item)
        else:
            raise ValueError(
                f"unknown method {item!r}; methods: {', '.join(METHODS)}; "
                f"groups: {', '.join(GROUPS)}"
            )
    if not names:
        raise ValueError("no method selected")
    return [METHODS[name] for name in dict.fromkeys(names)]
