"""The plan buffers of the KV-guided strategies built straight from a tree's node arrays.

`deft.plan.build_plan` is the normative planner (the reference and the IO model read its
`Plan`); `deft.plan_buffers.plan_arrays` then encodes a plan for the kernels. Together they take
0.3-2 ms a decode step. `NodePlanner.arrays` builds the same buffers (equal field by field) for
deft_node, deft_node_chunk and deft_flatten with a few compiled (numba) functions that loop
over nodes, chunks, queries and tokens (`deft.compiled_plan`: the tree's preorder, flattened
positions and chunks; `deft.plan_entries`: the partitions and entries; `deft.plan_slots`: the
cache slots), and no `Plan`.

It rests on one fact about flattened positions (`deft.plan_entries`): a chunk, a run of the
flattened order, is seen by the queries at flattened positions ``start <= F < reach``, where
``reach`` is the largest subtree end of its tokens; those are a run of the queries in
flattened order.

What depends only on the tree's shape (preorder, subtree ends in preorder positions, query
nodes) is kept per shape, and a decode step changes little of the rest, so the large fields
are written only past what they share with the last plan: the slots from the first page run
that differs, ``subtree_end`` from the first preorder node whose tokens or subtree end differ,
``entry_query`` from the first chunk whose queries differ (all the entries where every
chunk's queries are the last plan's). They are written in turns into two kept arrays
(`deft.turn_buffers`): the one a step writes already holds the step before the last's, so the
unchanged prefix (most of a 64k-token tree) is neither copied nor rewritten, and the plan
buffers skip it (`deft.plan_buffers.PlanBuffers.fill`, ``kept``); an array `arrays` returns
keeps its values through the next call, not the one after.
"""

from __future__ import annotations

import numpy as np

from deft.compiled_plan import flat_chunks, flat_layout, node_chunks, same_runs, tree_shape, \
    write_subtree_end
from deft.plan_entries import chunk_ranks, gather_parts, write_entries
from deft.plan_slots import SlotLayout
from deft.turn_buffers import TurnBuffers

FAST_STRATEGIES = ("deft_node", "deft_node_chunk", "deft_flatten")
"""The strategies `NodePlanner` plans (the others go through `deft.plan.build_plan`)."""

_NONE = np.zeros(0, np.int64)
_UNWRITTEN = np.zeros(0, np.int32)  # an entry_query all kept: `write_entries` writes none


class _Shape:
    """What a tree's parents and query counts fix, whatever its token counts: the arrays of
    `deft.compiled_plan.tree_shape` (``order``, ``last``, ``query_order``, ``query_shift``,
    ``flat_query``, ``in_order``, ``queries_in_order``)."""

    def __init__(self, parent: np.ndarray, queries: np.ndarray):
        (self.order, self.last, self.query_order, self.query_shift, self.flat_query,
         self.in_order, self.queries_in_order) = tree_shape(parent, queries)


class NodePlanner:
    """Plan buffers of one KV-guided strategy, with the tree shapes seen lately kept.

    Parameters
    ----------
    strategy : str
        One of `FAST_STRATEGIES`.
    shapes : int
        How many tree shapes to keep (least recently used dropped first).
    """

    def __init__(self, strategy: str, shapes: int = 8):
        if strategy not in FAST_STRATEGIES:
            raise ValueError(f"NodePlanner plans {', '.join(FAST_STRATEGIES)}, not {strategy!r}")
        self.strategy = strategy
        self._shapes, self._keep = {}, shapes
        self._last_shape = None  # (parent, queries, their shape) of the last lookup
        self._last_ends = (_NONE, _NONE)  # the last plan's ordered tokens and subtree ends
        self._last_entries = None  # (shape, group, lo, hi, the entries `_entries` returned)
        self._slot_layout = SlotLayout()  # the slots (`deft.plan_slots`)
        self._end_turns = TurnBuffers(np.int32)  # subtree_end
        self._query_turns = TurnBuffers(np.int32)  # entry_query
        self._row_turns = TurnBuffers(np.int32)  # entry_row
        self._last_counts = (None, None)  # ((partitions, queries), the counts field)
        self._chunk_starts = (None, None)  # ((chunks, chunk size), deft_flatten's chunk starts)

    def shape(self, parent: np.ndarray, queries: np.ndarray) -> _Shape:
        """The shape of a tree with these parents and query counts (node arrays); read-only
        arrays passed again (a reasoning run's steps share their segment's) give the last
        shape without being read."""
        last = self._last_shape
        if last is not None and parent is last[0] and queries is last[1] \
                and not parent.flags.writeable and not queries.flags.writeable:
            return last[2]
        key = (parent.tobytes(), queries.tobytes())
        found = self._shapes.pop(key, None)
        if found is None:
            found = _Shape(parent, queries)
            if len(self._shapes) >= self._keep:
                del self._shapes[next(iter(self._shapes))]
        self._shapes[key] = found  # most recent last
        self._last_shape = (parent, queries, found)
        return found

    def arrays(self, tree, page_ptr: np.ndarray, pages: np.ndarray, page_size: int,
               chunk_size=None, group_size=None) -> dict:
        """The plan buffers' contents, as `deft.plan_buffers.plan_arrays` returns them for
        ``build_plan(strategy, tree, chunk_size, group_size, page_size)``.

        Parameters
        ----------
        tree : Tree
            Only ``parent``, ``tokens`` and ``queries`` (node arrays) are read.
        page_ptr : int64 [nodes + 1]
        pages : int64 [pages]
            The page table in the tree's node-index order (numpy, on the host).
        page_size : int
        chunk_size, group_size : int or None
            As resolved by `deft.plan.check_parameters` (deft_node takes no chunk).

        Returns
        -------
        dict of field name to int64 array (int32 for ``subtree_end``, ``entry_query`` and
        ``entry_row``), plus ``"max_slot"`` (int), ``"slots"``, the cache slot of every
        flattened position (the ``token_slot`` field itself), and ``"kept"``, what the arrays
        share with the last plan's (`deft.plan_buffers.PlanBuffers.fill`). Arrays the planner
        keeps between steps are read-only.
        """
        shape = self.shape(tree.parent, tree.queries)
        ordered, through, end, query_flat = flat_layout(
            shape.order, shape.last, shape.query_order, shape.query_shift, tree.tokens,
            shape.in_order)
        total = int(through[-1])
        kept = {}
        subtree_end = self._subtree_end(ordered, through, end, total, kept)
        if self.strategy == "deft_flatten":
            chunk_start = self._flat_starts(total, chunk_size)
            chunk_tokens, chunk_reach = flat_chunks(ordered, through, end, chunk_size)
        else:
            chunk_start, chunk_tokens, chunk_reach = node_chunks(shape.order, ordered, through,
                                                                 end, chunk_size or 0)
        part_chunk, part_entry, entry_query, entry_row, query_row_ptr = self._entries(
            shape, chunk_start, chunk_reach, query_flat, group_size or 0, kept)
        slots, max_slot, slots_kept = self._slot_layout.lay_out(shape.order, ordered, total,
                                                                page_ptr, pages, page_size)
        kept.update(slots_kept)
        if group_size is None and len(part_chunk) == len(chunk_start):  # every chunk
            part_start, part_tokens = chunk_start, chunk_tokens
        else:
            part_start, part_tokens = gather_parts(part_chunk, chunk_start, chunk_tokens)
        return dict(
            counts=self._counts(len(part_chunk), len(query_flat)),
            part_start=part_start,
            part_tokens=part_tokens,
            part_entry=part_entry,
            entry_query=entry_query,
            entry_row=entry_row,
            query_row_ptr=query_row_ptr,
            query_flat=query_flat,
            token_slot=slots,
            subtree_end=subtree_end,
            max_slot=max_slot,
            slots=slots,
            kept=kept,
        )

    def _subtree_end(self, ordered, through, end, total, kept) -> np.ndarray:
        """The ``subtree_end`` field (int32 [tokens], read-only), written in turns from the
        first preorder node whose tokens or subtree end differ from the last plan's."""
        last = self._end_turns.latest
        first = same_runs(ordered, end, *self._last_ends) if last is not None else 0
        self._last_ends = (ordered, end)
        if first:
            kept["subtree_end"] = (last, first)
            if first == total == len(last):
                return last
        write_subtree_end(ordered, through, end, first, self._end_turns.begin(total, first))
        return self._end_turns.finish(total, first)

    def _flat_starts(self, total: int, chunk: int) -> np.ndarray:
        """deft_flatten's chunk starts 0, chunk, 2 chunk, ... (int64, read-only), kept: the
        plan buffers skip them while they are the same."""
        num_chunks = -(-total // chunk)
        if self._chunk_starts[0] != (num_chunks, chunk):
            starts = np.arange(0, total, chunk)
            starts.flags.writeable = False
            self._chunk_starts = ((num_chunks, chunk), starts)
        return self._chunk_starts[1]

    def _entries(self, shape, chunk_start, chunk_reach, query_flat, group, kept) -> tuple:
        """(part_chunk, part_entry, entry_query, entry_row, query_row_ptr) of a plan whose
        chunk ``c`` is seen by the queries at flattened positions ``chunk_start[c] <= F <
        chunk_reach[c]`` (`deft.plan_entries`), read-only; ``group`` 0 for None. The last
        plan's where every chunk is seen by the same queries (with the same group size); else
        ``entry_query`` is written past the first chunks seen by the last plan's queries
        (``kept``)."""
        last = self._last_entries
        comparable = last is not None and (last[0] is shape or (
            last[0].queries_in_order and shape.queries_in_order
            and len(last[0].flat_query) == len(shape.flat_query)))
        lo, hi, count, partitions, same_chunks, same_entries = chunk_ranks(
            chunk_start, chunk_reach, query_flat, shape.flat_query, group,
            last[2] if comparable else _NONE, last[3] if comparable else _NONE)
        if comparable and group == last[1] and same_chunks == len(lo) == len(last[2]):
            self._last_entries = (shape, group, lo, hi, last[4])
            return last[4]
        last_query = self._query_turns.latest
        if same_entries:
            kept["entry_query"] = (last_query, same_entries)
        reuse_queries = same_entries == count == len(last_query) if same_entries else False
        entry_query = last_query if reuse_queries else self._query_turns.begin(count,
                                                                                same_entries)
        entry_row = self._row_turns.begin(count, 0)
        part_chunk, part_entry, query_row_ptr = write_entries(
            lo, hi, shape.flat_query, shape.queries_in_order, group, partitions, same_entries,
            _UNWRITTEN if reuse_queries else entry_query, entry_row)
        if not reuse_queries:
            entry_query = self._query_turns.finish(count, same_entries)
        entries = (part_chunk, part_entry, entry_query, self._row_turns.finish(count, 0),
                   query_row_ptr)
        for array in (part_chunk, part_entry, query_row_ptr):
            array.setflags(write=False)
        self._last_entries = (shape, group, lo, hi, entries)
        return entries

    def _counts(self, num_partitions: int, num_queries: int) -> np.ndarray:
        """The ``counts`` field, int64 [2] read-only: the last plan's array where they are the
        same (the plan buffers then skip it)."""
        if self._last_counts[0] != (num_partitions, num_queries):
            counts = np.array([num_partitions, num_queries])
            counts.flags.writeable = False
            self._last_counts = ((num_partitions, num_queries), counts)
        return self._last_counts[1]
