"""The public API: `TreeAttention` (plan once per decode step, run once per layer) and the
test-layout wrapper `deft.attention`.

    attn = deft.TreeAttention("deft_flatten", max_queries=256, max_tokens=32768)
    plan = attn.plan(tree, cache)          # host work; refills the device buffers in place
    out = attn.run(q, k_cache, v_cache, plan)   # per layer: two kernels, no host sync

`run` is registered as the custom op ``torch.ops.deft.tree_attention`` (so it traces under
torch.compile), reads every plan-dependent number from device memory and launches grids sized by
the capacity alone, so a CUDA graph captured over `run` stays valid after a new `plan`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from deft.kernels import KERNELS, flat as flat_addressing, tile_config
from deft.kernels.partials import TileConfig, _partials_kernel, partials
from deft.kernels.reduction import merge, per_query_merge
from deft.plan_buffers import (
    PlanBuffers,
    cache_page_size,
    paged_cache,
    plan_arrays,
    token_slots,
    views_of,
)
from deft.tree import Tree
from deft.plan import Plan, build_plan, check_parameters
from deft.strategies import DEFAULT_CHUNK_SIZE, KERNEL_STRATEGIES


DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)
"""Head dims the kernels take (powers of two: tl.arange; at least 16: tl.dot)."""
CPU_PROGRAMS = 4
"""Persistent programs under the Triton interpreter (no GPU)."""
INTERPRETED = not hasattr(_partials_kernel, "params")
"""Whether the kernels loaded under the Triton interpreter (TRITON_INTERPRET=1)."""


def check_runnable(device: torch.device, dtype: str | torch.dtype | None = None) -> None:
    """Refuse, saying what to do, a device or dtype the kernels cannot run (ValueError)."""
    if device.type == "cpu" and not INTERPRETED:
        raise ValueError("the Triton kernels need a GPU: set TRITON_INTERPRET=1 before importing "
                         "deft to run them on the CPU")
    if device.type == "cpu" and dtype in ("bfloat16", torch.bfloat16):
        raise ValueError("bf16 kernels need a GPU; under the interpreter use float16 or float32")


@dataclass(frozen=True)
class TreePlan:
    """One decode step's plan, living in its `TreeAttention`'s device buffers.

    A later `TreeAttention.plan` overwrites the buffers: this plan then becomes stale and `run`
    refuses it.

    Attributes
    ----------
    strategy : str
    tree : Tree
    reference : deft.plan.Plan
        The normative partitions the buffers encode.
    page_size : int
    num_queries, num_partitions, num_entries : int
    max_slot : int
        The largest cache slot the plan reads (``k_cache`` must hold more rows).
    slots : int64 [tokens]
        Cache slot of every test-layout token.
    generation : int
        Which `plan` call of its owner made it.
    owner : TreeAttention
    """

    strategy: str
    tree: Tree
    reference: Plan
    page_size: int
    num_queries: int
    num_partitions: int
    num_entries: int
    per_query_merge: bool
    max_slot: int
    slots: np.ndarray
    generation: int
    owner: "TreeAttention"

    def partition_sets(self) -> list:
        """Every partition as (queries, test-layout tokens), decoded from the device buffers.

        The form `deft.plan.Plan.partition_sets` returns, for plan-equality tests.
        """
        self.owner._check_current(self)
        read = self.owner.buffers.read
        start, tokens, entry = read("part_start"), read("part_tokens"), read("part_entry")
        entry_query, slot = read("entry_query"), read("token_slot")
        token_of_slot = dict(zip(self.slots.tolist(), range(len(self.slots))))
        sets = []
        for p in range(self.num_partitions):
            part_slots = slot[start[p]: start[p] + tokens[p]].tolist()
            sets.append((tuple(entry_query[entry[p]: entry[p + 1]].tolist()),
                         tuple(token_of_slot[s] for s in part_slots)))
        return sets


class TreeAttention:
    """Tree attention over a paged KV cache with one strategy's kernels.

    Parameters
    ----------
    strategy : str
        One of `KERNEL_STRATEGIES` (flash_attention, tree_attention_m and vanilla_tree run as
        their PyTorch reference through `deft.attention`).
    chunk_size, group_size : int, optional
        As for `deft.plan.build_plan` (None: the strategy's default; refused where the
        strategy takes none). When chunk_size, group_size and config are all None, each
        `plan` takes them from the tuned table of this GPU for the tree's bucket
        (`autotune.lookup`: exact card, same-architecture sibling, IO-model heuristic, else
        the defaults); ``tuned_from`` then names the rung used.
    max_queries : int
        Most queries of a plan (rows of ``q`` and ``out``).
    max_tokens : int
        Most KV tokens of a tree.
    max_entries : int, optional
        Most (partition, query) entries of a plan: the partial-result workspace holds
        ``max_entries x q_heads x (head_dim + 1)`` fp32 values. Default
        ``max_queries x ceil(max_tokens / chunk)``, enough for every plan of flash_decoding,
        radix, tree_attention_s and deft_flatten within the other capacities (deft_node and
        deft_node_chunk on deep trees may need more: `plan` says so).
    max_kv_slots : int, optional
        flash_decoding and radix only: most listed KV slots, the sum over queries of visible
        tokens (default ``max_queries x max_tokens``).
    config : TileConfig, optional
        Tiles and launch options (default: the strategy's table by head dim).
    device : str or torch.device
    """

    def __init__(self, strategy="deft_flatten", chunk_size=None, group_size=None, *,
                 max_queries: int, max_tokens: int, max_entries=None, max_kv_slots=None,
                 config: TileConfig | None = None, device="cuda"):
        if strategy not in KERNELS:
            raise ValueError(
                f"TreeAttention runs {', '.join(KERNEL_STRATEGIES)}; {strategy!r} has no "
                "kernel (flash_attention, tree_attention_m and vanilla_tree run as their "
                "reference through deft.attention)"
            )
        self.strategy = strategy
        self.chunk_size, self.group_size, _ = check_parameters(strategy, chunk_size, group_size, 1)
        self.flat = flat = flat_addressing(strategy)
        if max_entries is None:
            max_entries = max_queries * -(-max_tokens // (self.chunk_size or DEFAULT_CHUNK_SIZE))
        if max_kv_slots is None:
            max_kv_slots = max_tokens if flat else max_queries * max_tokens
        elif flat:
            raise ValueError(f"{strategy} takes no max_kv_slots (its slots are max_tokens)")
        for name, value in dict(max_queries=max_queries, max_tokens=max_tokens,
                                max_entries=max_entries, max_kv_slots=max_kv_slots).items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.max_queries, self.max_tokens = int(max_queries), int(max_tokens)
        self.max_entries = int(max_entries)
        self.config = config
        self._autotune = chunk_size is None and group_size is None and config is None
        self.tuned_from, self._tuned_config = None, None
        self.device = torch.device(device)
        check_runnable(self.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.buffers = PlanBuffers(self.max_queries, self.max_entries, int(max_kv_slots), flat,
                                   self.device, "max_tokens" if flat else "max_kv_slots")
        self._generation = 0
        self._workspace = None
        self._launch_cache = None

    # ------------------------------------------------------------------ plan
    @classmethod
    def for_plan(cls, reference: Plan, *, config: TileConfig | None = None,
                 device="cuda") -> "TreeAttention":
        """A TreeAttention whose capacities fit one reference plan exactly (one-off calls)."""
        flat = reference.strategy not in KERNELS or flat_addressing(reference.strategy)
        return cls(
            reference.strategy, reference.chunk_size, reference.group_size,
            max_queries=reference.tree.num_queries, max_tokens=reference.tree.num_tokens,
            max_entries=len(reference.query_index),
            max_kv_slots=None if flat else int(reference.tokens.sum()), config=config,
            device=device,
        )

    def plan(self, tree: Tree, cache, reference: Plan | None = None) -> TreePlan:
        """Plan one decode step: build the partitions and refill the device buffers in place.

        Parameters
        ----------
        tree : Tree
            The step's tree (test layout: queries by node index, then position).
        cache : page table
            Anything with ``node_pages(tree) -> (page_ptr [nodes + 1], pages)`` and
            ``page_size`` (`deft.plan_buffers.PageTable`, `deft.cache.TreeCache`).
        reference : deft.plan.Plan, optional
            This step's partitions if already built (`deft.plan.build_plan` with this
            TreeAttention's strategy, chunk and group sizes and the cache's page size).

        Returns
        -------
        TreePlan
        """
        check_runnable(self.device, tree.attention.dtype)
        if tree.num_tokens > self.max_tokens:
            raise ValueError(f"the tree holds {tree.num_tokens} tokens but this TreeAttention "
                             f"was built with max_tokens={self.max_tokens}")
        page_size = cache_page_size(cache)
        self.tuned_from, self._tuned_config = None, None
        if reference is None and self._autotune:  # nothing fixed by the caller: tuned config
            from autotune.lookup import tuned_plan

            reference, tuned = tuned_plan(self.strategy, tree, page_size, self.device,
                                          self.max_entries)
            self.tuned_from, self._tuned_config = tuned.rung, tuned.config
        elif reference is None:
            reference = build_plan(self.strategy, tree, self.chunk_size, self.group_size,
                                   page_size)
        elif (reference.tree is not tree or reference.strategy != self.strategy
              or reference.chunk_size != self.chunk_size
              or reference.group_size != self.group_size or reference.page_size != page_size):
            raise ValueError("reference is not this TreeAttention's plan of this tree and cache")
        page_ptr, pages = cache.node_pages(tree)
        arrays = plan_arrays(reference, page_ptr, pages, self.flat)
        self.buffers.fill(arrays)
        self._generation += 1
        return TreePlan(
            strategy=self.strategy, tree=tree, reference=reference, page_size=page_size,
            num_queries=tree.num_queries, num_partitions=reference.num_partitions,
            num_entries=len(reference.query_index),
            per_query_merge=per_query_merge(tree.num_queries, len(reference.query_index),
                                            self._sm_count()),
            max_slot=arrays["max_slot"],
            slots=token_slots(tree, page_ptr, pages, page_size),
            generation=self._generation, owner=self,
        )

    def _check_current(self, plan: TreePlan) -> None:
        if not isinstance(plan, TreePlan) or plan.owner is not self:
            raise ValueError("plan must come from this TreeAttention's plan()")
        if plan.generation != self._generation:
            raise ValueError("plan is stale: a later plan() of this TreeAttention replaced it")

    # ------------------------------------------------------------------ run
    def run(self, q, k_cache, v_cache, plan: TreePlan, out=None, sm_scale=None,
            return_lse=False):
        """Attention of the plan's queries over the paged cache.

        Parameters
        ----------
        q : [rows, q_heads, head_dim]
            Queries in test-layout order; rows >= plan.num_queries (rows past them, padding for
            CUDA graphs, get zeros), rows <= max_queries. head_dim contiguous.
        k_cache, v_cache : [num_pages, page_size, kv_heads, head_dim]
            q's dtype (float16, bfloat16 or float32) and device; pages contiguous.
        plan : TreePlan
            The current plan of this TreeAttention.
        out : [rows, q_heads, head_dim], optional
            Written in place (q's dtype); allocated if None. With `out` given and return_lse
            False, a call allocates nothing after the first (which sizes the workspace).
        sm_scale : float, optional
            Softmax scale (default 1 / sqrt(head_dim)).
        return_lse : bool
            Also return the natural-log log-sum-exp of every row.

        Returns
        -------
        out : [rows, q_heads, head_dim]
        lse : fp32 [rows, q_heads], only with return_lse
        """
        self._check_current(plan)
        self._check_inputs(q, k_cache, v_cache, plan, out)
        rows, q_heads, head_dim = q.shape
        kv_heads = k_cache.shape[2]
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(rows, q_heads, dtype=torch.float32, device=q.device) if return_lse \
            else None
        o_part, lse_part = self._partials_workspace(q_heads, head_dim)
        config, num_programs = self._launch_config(head_dim, q_heads, kv_heads)
        sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
        if torch.compiler.is_compiling():  # traced: the custom op keeps the graph opaque
            torch.ops.deft.tree_attention(
                q, k_cache, v_cache, self.buffers.data, self.buffers.layout(), o_part,
                lse_part, out, lse, self.flat, sm_scale, config.as_ints(), num_programs,
                plan.per_query_merge)
        else:  # eager: the same launches without the custom op's dispatch (host time)
            _launch(q, k_cache, v_cache, self.buffers.views, o_part, lse_part, out, lse,
                    self.flat, sm_scale, config, num_programs, plan.per_query_merge)
        return (out, lse) if return_lse else out

    def _partials_workspace(self, q_heads: int, head_dim: int):
        """(o_part, lse_part), allocated on first use for a head shape (warm-up), then reused."""
        shape = (self.max_entries, q_heads, head_dim)
        if self._workspace is None or self._workspace[0].shape != shape:
            self._workspace = (
                torch.empty(shape, dtype=torch.float32, device=self.device),
                torch.empty(shape[:2], dtype=torch.float32, device=self.device),
            )
        return self._workspace

    def _launch_config(self, head_dim: int, q_heads: int, kv_heads: int):
        """(TileConfig, persistent grid size) for a head shape, resolved once per shape and
        config (run's host time matters: a decode step calls it once per layer)."""
        cached, shape = self._launch_cache, (head_dim, q_heads, kv_heads)
        if (cached is None or cached[0] is not self.config
                or cached[1] is not self._tuned_config or cached[2] != shape):
            config = self.config or self._tuned_config or tile_config(
                self.strategy, head_dim, q_heads // kv_heads)
            config = config.for_group(q_heads // kv_heads)
            cached = (self.config, self._tuned_config, shape, config,
                      self._num_programs(kv_heads, config))
            self._launch_cache = cached
        return cached[3], cached[4]

    def _num_programs(self, kv_heads: int, config: TileConfig) -> int:
        """Persistent grid: enough programs to fill the device, never more than work items."""
        items = self.max_entries * kv_heads  # partitions <= entries
        if self.device.type == "cuda":
            return min(items, self._sm_count() * config.programs_per_sm)
        return min(items, CPU_PROGRAMS)

    def _sm_count(self) -> int:
        """Multiprocessors of the device (`CPU_PROGRAMS` under the interpreter)."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).multi_processor_count
        return CPU_PROGRAMS

    def _check_inputs(self, q, k_cache, v_cache, plan, out) -> None:
        def fail(message):
            raise ValueError(f"TreeAttention.run: {message}")

        for name, x, dims in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4)):
            if not isinstance(x, torch.Tensor) or x.dim() != dims:
                fail(f"{name} must be a {dims}-D tensor, got "
                     f"{getattr(x, 'shape', type(x).__name__)}")
            if x.device != self.device:
                fail(f"{name} is on {x.device}, this TreeAttention on {self.device}")
            if x.stride(-1) != 1:
                fail(f"{name} must have a contiguous last (head_dim) dimension")
        if q.dtype not in DTYPES:
            fail(f"q must be float16, bfloat16 or float32, got {q.dtype}")
        for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
            if x.dtype != q.dtype:
                fail(f"{name} is {x.dtype} but q is {q.dtype}")
            if x.stride(0) != x.shape[1] * x.stride(1):
                fail(f"{name} must hold each page's tokens contiguously "
                     "(stride(0) == page_size * stride(1))")
        if k_cache.shape != v_cache.shape:
            fail(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} differ")
        rows, q_heads, head_dim = q.shape
        num_pages, page_size, kv_heads, cache_dim = k_cache.shape
        if cache_dim != head_dim:
            fail(f"q has head_dim {head_dim}, the caches {cache_dim}")
        if head_dim not in HEAD_DIMS:
            fail(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
        if q_heads % kv_heads:
            fail(f"q_heads ({q_heads}) must be a multiple of the caches' kv_heads ({kv_heads})")
        if page_size != plan.page_size:
            fail(f"the caches have pages of {page_size} tokens, the plan {plan.page_size}")
        if num_pages * page_size <= plan.max_slot:
            fail(f"the plan reads slot {plan.max_slot} but the caches hold "
                 f"{num_pages * page_size} slots")
        if not plan.num_queries <= rows <= self.max_queries:
            fail(f"q has {rows} rows; it needs between the plan's {plan.num_queries} queries "
                 f"and max_queries={self.max_queries}")
        if out is not None:
            if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
                fail(f"out must be {q.dtype} {list(q.shape)} on {q.device}, got {out.dtype} "
                     f"{list(out.shape)} on {out.device}")
            if out.stride(-1) != 1:
                fail("out must have a contiguous last (head_dim) dimension")


# ---------------------------------------------------------------------------- the launches
def _launch(q, k_cache, v_cache, buffers, o_part, lse_part, out, lse, flat, sm_scale, config,
            num_programs, per_query_merge) -> None:
    """Partial results, then the merge, on q's device."""
    other_device = q.is_cuda and q.device.index != torch.cuda.current_device()
    with torch.cuda.device(q.device) if other_device else contextlib.nullcontext():
        partials(q, k_cache, v_cache, o_part, lse_part, buffers, flat=flat, sm_scale=sm_scale,
                 config=config, num_programs=num_programs)
        merge(o_part, lse_part, buffers, out, lse, per_query=per_query_merge)


# ---------------------------------------------------------------------------- the custom op
@torch.library.custom_op("deft::tree_attention", mutates_args=("o_part", "lse_part", "out", "lse"))
def _tree_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan_data: torch.Tensor,
    plan_layout: list[int], o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor | None, flat: bool, sm_scale: float, tile: list[int],
    num_programs: int, per_query_merge: bool,
) -> None:
    """The two kernels of one `TreeAttention.run`, as an opaque op for torch.compile."""
    _launch(q, k_cache, v_cache, views_of(plan_data, plan_layout), o_part, lse_part, out, lse,
            flat, sm_scale, TileConfig.from_ints(tile), num_programs, per_query_merge)


@_tree_attention_op.register_fake
def _(q, k_cache, v_cache, plan_data, plan_layout, o_part, lse_part, out, lse, flat, sm_scale,
      tile, num_programs, per_query_merge) -> None:
    return None


# ---------------------------------------------------------------------------- test layout
def attention(strategy, tree: Tree, q, k, v, *, chunk_size=None, group_size=None, page_size=1,
              sm_scale=None):
    """Tree attention of every strategy in the test layout (`reference.attention`'s signature).

    Kernel strategies copy K and V into a paged cache (each node on fresh pages), plan and run;
    flash_attention, tree_attention_m and vanilla_tree run their PyTorch reference (on the host,
    the result copied back to q's device).

    Parameters
    ----------
    strategy : str
        One of `reference.STRATEGIES`.
    tree : Tree
    q : [queries, q_heads, head_dim]
        Queries by node index, then position.
    k, v : [tokens, kv_heads, head_dim]
        KV tokens by node index, then position.
    chunk_size, group_size : int, optional
        As for `deft.plan.build_plan`.
    page_size : int
    sm_scale : float, optional
        Default 1 / sqrt(head_dim).

    Returns
    -------
    out : [queries, q_heads, head_dim] in q's dtype
    """
    if strategy not in KERNELS:  # the reference computes on the host: run it there
        import reference

        out, _ = reference.attention(strategy, tree, q.cpu(), k.cpu(), v.cpu(),
                                     chunk_size=chunk_size, group_size=group_size,
                                     page_size=page_size, sm_scale=sm_scale)
        return out.to(device=q.device, dtype=q.dtype)
    check_runnable(q.device, q.dtype)
    k_cache, v_cache, table = paged_cache(tree, k, v, page_size)
    plan = build_plan(strategy, tree, chunk_size, group_size, page_size)
    attn = TreeAttention.for_plan(plan, device=q.device)
    return attn.run(q, k_cache, v_cache, attn.plan(tree, table, plan), sm_scale=sm_scale)
