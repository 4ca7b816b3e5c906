"""`TreePlan`: one decode step's plan, as `deft.TreeAttention.plan` leaves it in its buffers."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from deft.plan import Plan, build_plan
from deft.tree import Tree


@dataclass(frozen=True, eq=False)
class TreePlan:
    """One decode step's plan, living in its `TreeAttention`'s device buffers.

    A later `TreeAttention.plan` overwrites the buffers: this plan then becomes stale and `run`
    refuses it.

    Attributes
    ----------
    strategy : str
    tree : Tree
    chunk_size, group_size : int or None
        The sizes the plan was built with.
    page_size : int
    num_queries, num_partitions, num_entries : int
    per_query_merge : bool
        The merge runs one program per query (`deft.kernels.reduction.per_query_merge`).
    merge_block : int
        Else the rows its per-head merge takes a loop step (`deft.kernels.reduction.merge_block`
        of the plan's most partial rows of a query).
    small_grid : bool
        The Gluon backend runs its small-grid kernel: the work items (partitions x the tree's
        KV heads) fit one CTA per SM (`deft.kernels.deft_flatten_sm90.launch_spec`).
    max_slot : int
        The largest cache slot the plan reads (``k_cache`` must hold more rows).
    generation : int
        Which `plan` call of its owner made it.
    owner : TreeAttention
    reference : deft.plan.Plan
        The normative partitions the buffers encode (built on first use where `plan` took the
        node planner's fast path, `deft.fast_plan`).
    slots : int64 [tokens]
        Cache slot of every test-layout token (computed on first use, while the plan is
        current: the node planner writes its slots in turns, `deft.turn_buffers`).
    """

    strategy: str
    tree: Tree
    chunk_size: int | None
    group_size: int | None
    page_size: int
    num_queries: int
    num_partitions: int
    num_entries: int
    per_query_merge: bool
    merge_block: int
    small_grid: bool
    max_slot: int
    generation: int
    owner: "TreeAttention"
    _reference: Plan | None
    _slots: np.ndarray
    _slots_flat: bool  # _slots by flattened position (the node planner) or test layout

    @cached_property
    def reference(self) -> Plan:
        if self._reference is not None:
            return self._reference
        return build_plan(self.strategy, self.tree, self.chunk_size, self.group_size,
                          self.page_size)

    @cached_property
    def slots(self) -> np.ndarray:
        if not self._slots_flat:
            return self._slots
        self.owner._check_current(self)
        slots = np.empty_like(self._slots)
        slots[self.tree.flat_tokens] = self._slots
        return slots

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
