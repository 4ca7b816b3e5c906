"""The public API: `TreeAttention` (plan once per decode step, run once per layer); the
test-layout wrapper `deft.attention` is `deft.layout_attention`.

    attn = deft.TreeAttention("deft_flatten", max_queries=256, max_tokens=32768)
    plan = attn.plan(tree, cache)          # host work; refills the device buffers in place
    out = attn.run(q, k_cache, v_cache, plan)   # per layer: two kernels, no host sync

`run` is registered as the custom op ``torch.ops.deft.tree_attention``
(`deft.kernels.tree_attention_op`, so it traces under torch.compile), reads every
plan-dependent number from device memory and launches grids sized by the capacity alone, so a
CUDA graph captured over `run` stays valid after a new `plan`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from deft.kernels import KERNELS, deft_flatten_sm90, flat as flat_addressing, tile_config
from deft.kernels.fill import multiprocessors
from deft.kernels.partials import TileConfig
from deft.kernels.reduction import merge_block, per_query_merge
from deft.kernels.tree_attention_op import check_runnable, launch_tree_attention, register_owner
from deft.kernels.tuned import reuse_key, tuned_plan
from deft.bound_run import BoundRun, RunCache, argument_key, check_inputs
from deft.fast_plan import FAST_STRATEGIES, NodePlanner
from deft.field_writes import most_rows
from deft.plan_buffers import (
    PATH_STRATEGIES,
    PlanBuffers,
    cache_page_size,
    default_max_entries,
    host_node_pages,
    plan_arrays,
)
from deft.tree import Tree
from deft.tree_plan import TreePlan
from deft.plan import Plan, build_plan, check_parameters
from deft.strategies import KERNEL_STRATEGIES


CPU_PROGRAMS = 4
"""Persistent programs under the Triton interpreter (no GPU)."""


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
        `plan` takes the sizes and the tile from the tuned configs of this GPU for the tree's
        bucket (`deft.kernels.tuned`: exact card, its other 16-bit dtype's buckets,
        same-architecture sibling, else the chunk that fills the GPU, else the defaults);
        ``tuned_from`` then names the rung used. A plan of a tree with the last one's
        `deft.kernels.tuned.reuse_key` (a decode step's) reuses the last choice.
    max_queries : int
        Most queries of a plan (rows of ``q`` and ``out``).
    max_tokens : int
        Most KV tokens of a tree.
    max_entries : int, optional
        Most (partition, query) entries of a plan: the partial-result workspace holds
        ``max_entries x q_heads x (head_dim + 1)`` fp32 values. Default: `default_max_entries`,
        enough for every plan `plan` builds of a tree within the other capacities.
    max_kv_slots : int, optional
        flash_decoding and radix only: most listed KV slots, the sum over queries of visible
        tokens (default ``max_queries x max_tokens``).
    max_path_nodes : int, optional
        deft_node and deft_node_chunk only: most nodes on the path from a root to a query's node
        (default ``max_tokens``, the worst case: a chain of one-token nodes). Their entries grow
        with it, so a small value shrinks the default ``max_entries`` a lot (at the worst case
        it is ``max_queries x max_tokens``, and so is the workspace's first dimension: pass
        it, or build with `for_trees`); `plan` refuses a tree with a longer path.
    config : TileConfig, optional
        Tiles and launch options (default: the strategy's table by head dim).
    device : str or torch.device
    backend : {"gluon", "triton"}, optional
        The partials kernel (default: env ``DEFT_BACKEND``, else the Hopper Gluon kernel for
        deft_flatten on sm_90 where triton has Gluon, else Triton; see
        `deft.kernels.deft_flatten_sm90.resolve_backend`).
    max_graphs : int
        Argument sets of `run` kept, each with its CUDA graph once it repeats
        (`deft.bound_run`; 0: no graphs, every call checks its arguments and launches).

    Attributes
    ----------
    chunk_size, group_size : int or None
        The sizes every plan uses, as fixed by the caller (the strategy's default for one
        left None); both None where each plan takes them from the tuned configs: then
        `TreePlan.chunk_size` and `TreePlan.group_size` say what a plan used.
    tuned_from : str or None
        The rung (`deft.kernels.tuned.RUNGS`) of the last plan's tuned config; None where the
        caller fixed the sizes or the tile, or passed the plan's reference.
    """

    def __init__(self, strategy="deft_flatten", chunk_size=None, group_size=None, *,
                 max_queries: int, max_tokens: int, max_entries=None, max_kv_slots=None,
                 max_path_nodes=None, config: TileConfig | None = None, device="cuda",
                 backend=None, max_graphs: int = 64):
        if strategy not in KERNELS:
            raise ValueError(
                f"TreeAttention runs {', '.join(KERNEL_STRATEGIES)}; {strategy!r} has no "
                "kernel (flash_attention, tree_attention_m and vanilla_tree run as their "
                "reference through deft.attention)"
            )
        self.strategy = strategy
        self._use_tuned_configs = chunk_size is None and group_size is None and config is None
        sizes = check_parameters(strategy, chunk_size, group_size, 1)[:2]
        self.chunk_size, self.group_size = (None, None) if self._use_tuned_configs else sizes
        self.flat = flat = flat_addressing(strategy)
        if max_kv_slots is None:
            max_kv_slots = max_tokens if flat else max_queries * max_tokens
        elif flat:
            raise ValueError(f"{strategy} takes no max_kv_slots (its slots are max_tokens)")
        if max_path_nodes is not None and strategy not in ("deft_node", "deft_node_chunk"):
            raise ValueError(f"{strategy} takes no max_path_nodes (its entries do not depend "
                             "on the paths' nodes)")
        for name, value in dict(max_queries=max_queries, max_tokens=max_tokens,
                                max_entries=max_entries, max_kv_slots=max_kv_slots,
                                max_path_nodes=max_path_nodes).items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.max_path_nodes = min(int(max_path_nodes or max_tokens), int(max_tokens))
        if max_entries is None:
            max_entries = default_max_entries(strategy, max_queries, max_tokens, sizes[0],
                                              self.max_path_nodes)
        self.max_queries, self.max_tokens = int(max_queries), int(max_tokens)
        self.max_entries = int(max_entries)
        self.rows_per_query = self.max_entries // self.max_queries  # where queries' partial
        # rows start (`deft.plan_entries.row_starts`)
        self.config = config
        self.tuned_from, self._tuned_config = None, None
        self._last_tuned = None  # (reuse_key, Tuned) of the last tuned plan
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device here (device=\"cpu\" plans on "
                             "the host and runs the kernels under TRITON_INTERPRET=1)")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.buffers = PlanBuffers(self.max_queries, self.max_entries, int(max_kv_slots), flat,
                                   self.device, "max_tokens" if flat else "max_kv_slots")
        self._generation = 0
        self.latest_plan = None
        self._handle = register_owner(self)
        self._workspace = None
        self._launch_cache = None
        self._node_planner = NodePlanner(strategy) if strategy in FAST_STRATEGIES else None
        self.backend = deft_flatten_sm90.resolve_backend(strategy, backend, self.device)
        self._runs = RunCache(max_graphs)

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

    @classmethod
    def for_trees(cls, strategy: str, trees, chunk_size=None, group_size=None,
                  **options) -> "TreeAttention":
        """A TreeAttention whose default capacities fit every plan of the given trees.

        ``TreeAttention.for_trees(strategy, run)`` sizes one for every step of a run: the most
        queries and tokens of a tree, for deft_node and deft_node_chunk the most nodes on a
        query's path (`max_path_nodes`, which keeps their ``max_entries`` far below the
        worst case), for flash_decoding and radix the most listed slots. `options` are the
        other constructor arguments (config, device, max_graphs).
        """
        sizes = dict(max_queries=1, max_tokens=1)
        node_paths = strategy in PATH_STRATEGIES
        listed = strategy in KERNELS and not flat_addressing(strategy)
        for tree in trees:
            sizes["max_queries"] = max(sizes["max_queries"], tree.num_queries)
            sizes["max_tokens"] = max(sizes["max_tokens"], tree.num_tokens)
            if node_paths:
                sizes["max_path_nodes"] = max(sizes.get("max_path_nodes", 1),
                                              int(tree.depth[tree.query_node].max()) + 1)
            if listed:
                sizes["max_kv_slots"] = max(sizes.get("max_kv_slots", 1),
                                            int(tree.visible_tokens.sum()))
        return cls(strategy, chunk_size, group_size, **sizes, **options)

    def plan(self, tree: Tree, cache, reference: Plan | None = None) -> TreePlan:
        """Plan one decode step: build the partitions and refill the device buffers in place.

        With chunk and group sizes fixed, the KV-guided strategies' buffers come straight from
        the tree's node arrays (`deft.fast_plan`, the same partitions as
        `deft.plan.build_plan`); the plan's ``reference`` is then built on first use.

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
        if tree.num_tokens > self.max_tokens:
            raise ValueError(f"the tree holds {tree.num_tokens} tokens but this TreeAttention "
                             f"was built with max_tokens={self.max_tokens}")
        page_size = cache_page_size(cache)
        self.tuned_from, self._tuned_config = None, None
        if self.max_path_nodes < self.max_tokens and self.strategy in PATH_STRATEGIES:
            path_nodes = int(tree.depth[tree.query_node].max()) + 1
            if path_nodes > self.max_path_nodes:
                raise ValueError(f"the tree has a query {path_nodes} nodes below its root but "
                                 f"this TreeAttention was built with max_path_nodes="
                                 f"{self.max_path_nodes}")
        page_ptr, pages = host_node_pages(cache, tree)
        arrays = None
        if reference is None and self._use_tuned_configs:  # nothing fixed by the caller
            build = None if self._node_planner is None else (
                lambda chunk, group: self._node_arrays(tree, page_ptr, pages, page_size, chunk,
                                                       group))
            key, last = reuse_key(tree), self._last_tuned
            built, tuned = tuned_plan(self.strategy, tree, page_size, self.device,
                                      self.max_entries, build,
                                      last[1] if last is not None and last[0] == key else None)
            self._last_tuned = (key, tuned)
            self.tuned_from, self._tuned_config = tuned.rung, tuned.config
            chunk, group = tuned.chunk_size, tuned.group_size
            reference, arrays = (built, None) if build is None else (None, built)
        elif reference is None and self._node_planner is not None:  # fixed sizes, KV-guided
            chunk, group = self.chunk_size, self.group_size
            arrays, _ = self._node_arrays(tree, page_ptr, pages, page_size, chunk, group)
        elif reference is None:
            reference = build_plan(self.strategy, tree, self.chunk_size, self.group_size,
                                   page_size)
        elif (reference.tree is not tree or reference.strategy != self.strategy
              or reference.page_size != page_size or not self._use_tuned_configs and (
                  reference.chunk_size != self.chunk_size
                  or reference.group_size != self.group_size)):
            raise ValueError("reference is not this TreeAttention's plan of this tree and cache")
        if arrays is None:
            arrays = plan_arrays(reference, page_ptr, pages, self.flat, self.rows_per_query)
            chunk, group = reference.chunk_size, reference.group_size
        self.buffers.fill(arrays)
        self._generation += 1
        entries = len(arrays["entry_query"])
        num_partitions, num_queries = arrays["counts"].tolist()  # the tree's queries
        sm_count = self._sm_count()
        query_rows = arrays["query_rows"]
        self.latest_plan = TreePlan(
            strategy=self.strategy, tree=tree, chunk_size=chunk, group_size=group,
            page_size=page_size, num_queries=num_queries, num_partitions=num_partitions,
            num_entries=entries,
            per_query_merge=per_query_merge(num_queries, entries, sm_count),
            merge_block=merge_block(most_rows(query_rows, num_queries)),
            small_grid=self.backend == "gluon"
            and num_partitions * tree.attention.kv_heads <= sm_count,
            max_slot=arrays["max_slot"], generation=self._generation, owner=self,
            _reference=reference, _slots=arrays["slots"], _slots_flat=reference is None,
        )
        return self.latest_plan

    def _node_arrays(self, tree, page_ptr, pages, page_size, chunk, group):
        """(the node planner's plan arrays, their entries) for one chunk and group size."""
        arrays = self._node_planner.arrays(tree, page_ptr, pages, page_size, chunk, group,
                                           self.rows_per_query)
        return arrays, len(arrays["entry_query"])

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
            The current plan of this TreeAttention. Under torch.compile it is not read (dynamo
            would recompile for every plan): the latest plan runs, checked when the op runs.
        out : [rows, q_heads, head_dim], optional
            Written in place (q's dtype); allocated if None. With `out` given and return_lse
            False, a call allocates nothing after the first (which sizes the workspace). On a
            GPU the second call with the same tensors (out and lse included, allocated or not)
            captures a CUDA graph that later calls replay (`deft.bound_run`: about 3 us of host
            time instead of two launches).
        sm_scale : float, optional
            Softmax scale (default 1 / sqrt(head_dim)).
        return_lse : bool
            Also return the natural-log log-sum-exp of every row.

        Returns
        -------
        out : [rows, q_heads, head_dim]
        lse : fp32 [rows, q_heads], only with return_lse
        """
        if torch.compiler.is_compiling():  # traced: the custom op keeps the graph opaque
            return self._run_traced(q, k_cache, v_cache, out, sm_scale, return_lse)
        if plan.__class__ is not TreePlan or plan.owner is not self \
                or plan.generation != self._generation:
            self._check_current(plan)
        if out is None and not isinstance(q, torch.Tensor):
            check_inputs(q, k_cache, v_cache, plan, out, self.device, self.max_queries)
        out, lse = _outputs(q, out, return_lse)
        self._launch(q, k_cache, v_cache, plan, out, lse, sm_scale)
        return (out, lse) if return_lse else out

    def _launch(self, q, k_cache, v_cache, plan, out, lse, sm_scale) -> None:
        """The kernels of one call on its argument set (`deft.bound_run`): found (else checked
        and bound), then its graph replayed or the kernels launched. `run`'s path, and the
        custom op's body with this TreeAttention's latest plan (``plan`` is current)."""
        key = argument_key(q, k_cache, v_cache, out, lse, sm_scale, plan.per_query_merge,
                           plan.small_grid, plan.merge_block)
        bound = self._runs.get(key) if key is not None else None
        config_source = (self.config, self._tuned_config)
        if bound is None or not bound.fits(plan, config_source):
            bound = self._bind(key, q, k_cache, v_cache, plan, out, lse, sm_scale,
                               config_source)
        if bound.replay is not None and not torch._C._cuda_isCurrentStreamCapturing():
            bound.replay()
        else:
            self._runs.launch(bound, lambda: launch_tree_attention(
                q, k_cache, v_cache, self.buffers.views, bound.o_part, bound.lse_part, out, lse,
                self.flat, bound.sm_scale, bound.config, bound.num_programs,
                plan.per_query_merge, self.backend == "gluon", plan.small_grid,
                plan.merge_block), self.device)

    def _bind(self, key, q, k_cache, v_cache, plan, out, lse, sm_scale,
              config_source) -> BoundRun:
        """Check one argument set and resolve what its launches take (`deft.bound_run`)."""
        check_inputs(q, k_cache, v_cache, plan, out, self.device, self.max_queries, lse)
        check_runnable(self.device, q.dtype)
        _, q_heads, head_dim = q.shape
        config, num_programs = self._launch_config(head_dim, q_heads, k_cache.shape[2])
        sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
        bound = BoundRun(q, k_cache, config_source, config, num_programs, sm_scale,
                         self._partials_workspace(q_heads, head_dim))
        self._runs.put(key, bound)
        return bound

    def _run_traced(self, q, k_cache, v_cache, out, sm_scale, return_lse):
        """`run` under torch.compile: the custom op, which finds this TreeAttention by its
        handle and runs its latest plan when it runs (`_launch`, which checks each new argument
        set as eager `run` does).

        Nothing of this TreeAttention but its handle is read while tracing: dynamo would guard
        on the plan and recompile for every new one (every decode step; past its recompile
        limit a ``fullgraph`` compile raises), every tensor read (plan buffers, workspace)
        would be a graph input with its guards and inductor's size checks on every call, and
        every check made here a guard more. The graph holds the op alone (with ``out=None`` or
        ``return_lse``, the allocations before it)."""
        out, lse = _outputs(q, out, return_lse)
        torch.ops.deft.tree_attention(q, k_cache, v_cache, out, lse,
                                      None if sm_scale is None else float(sm_scale),
                                      self._handle)
        return (out, lse) if return_lse else out

    def _partials_workspace(self, q_heads: int, head_dim: int):
        """(o_part, lse_part), allocated on first use for a head shape (warm-up), then reused.

        A new head shape replaces them, and with them every argument set bound to the old ones.
        """
        shape = (self.max_entries, q_heads, head_dim)
        if self._workspace is None or self._workspace[0].shape != shape:
            self._runs.clear()
            self._workspace = (
                torch.empty(shape, dtype=torch.float32, device=self.device),
                torch.empty(shape[:2], dtype=torch.float32, device=self.device),
            )
        return self._workspace

    def _launch_config(self, head_dim: int, q_heads: int, kv_heads: int):
        """(TileConfig, persistent grid size) for a head shape, resolved once per shape and
        config."""
        cached, shape = self._launch_cache, (head_dim, q_heads, kv_heads)
        if (cached is None or cached[0] is not self.config
                or cached[1] is not self._tuned_config or cached[2] != shape):
            config = self.config or self._tuned_config or tile_config(
                self.strategy, head_dim, q_heads // kv_heads)
            config = config.for_group(q_heads // kv_heads)
            cached = (self.config, self._tuned_config, shape, config,
                      self._num_programs(kv_heads, config))
            self._launch_cache = cached
        return cached[3:]

    def _num_programs(self, kv_heads: int, config: TileConfig) -> int:
        """Persistent grid: enough programs to fill the device, never more than work items."""
        items = self.max_entries * kv_heads  # partitions <= entries
        if self.device.type == "cuda":
            return min(items, self._sm_count() * config.programs_per_sm)
        return min(items, CPU_PROGRAMS)

    def _sm_count(self) -> int:
        """Multiprocessors of the device (`CPU_PROGRAMS` under the interpreter)."""
        return multiprocessors(self.device) if self.device.type == "cuda" else CPU_PROGRAMS


def _outputs(q, out, return_lse: bool) -> tuple:
    """(out, lse) of a `run` call: ``out`` as given or allocated like ``q``; an fp32
    [rows, q_heads] lse where `return_lse`, else None."""
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    return out, lse
