"""The plan buffers of the KV-guided strategies built straight from a tree's node arrays.

`deft.plan.build_plan` is the normative planner (the reference and the IO model read its
`Plan`); `deft.plan_buffers.plan_arrays` then encodes a plan for the kernels. Together they take
0.3-2 ms a decode step. `NodePlanner.arrays` builds the same buffers (equal field by field) for
deft_node, deft_node_chunk and deft_flatten in two compiled (numba) calls, `measure_step` and
`write_step`, that loop over nodes, chunks, queries and tokens (`deft.compiled_plan`: the
tree's preorder, flattened positions and chunks; `deft.plan_entries`: the partitions and
entries; `deft.plan_slots`: the cache slots), with no `Plan` and no numpy call but slices,
flags and the turn buffers' prefix copies (`deft.turn_buffers`).

It rests on one fact about flattened positions (`deft.plan_entries`): a chunk, a run of the
flattened order, is seen by the queries at flattened positions ``start <= F < reach``, where
``reach`` is the largest subtree end of its tokens; those are a run of the queries in
flattened order.

What depends only on the tree's shape (preorder, subtree ends in preorder positions, query
nodes) is kept per shape, and a decode step changes little of the rest, so the large fields
are written only past what they share with the last plan: the slots from the first page run
that differs, ``subtree_end`` from the first preorder node whose tokens or subtree end differ,
``entry_query`` from the first chunk whose queries differ (all the entries where every
chunk's queries are the last plan's), and ``entry_row`` from there too where the queries' rows
start at fixed places (`deft.plan_entries.row_starts`). They are written in turns into two
kept arrays (`deft.turn_buffers`): the one a step writes already holds the step before the
last's, so the unchanged prefix (most of a 64k-token tree) is neither copied nor rewritten, and
the plan buffers skip it (`deft.plan_buffers.PlanBuffers.fill`, ``kept``); an array `arrays`
returns keeps its values through the next call, not the one after.
"""

from __future__ import annotations

import numpy as np

from deft.compiled_plan import compiled, flat_chunks, flat_layout, node_chunks, same_runs, \
    tree_shape, write_subtree_end
from deft.plan_entries import chunk_ranks, gather_parts, write_entries
from deft.plan_slots import page_runs, write_slots
from deft.tree import INDEX_LIMIT
from deft.turn_buffers import TurnBuffers

FAST_STRATEGIES = ("deft_node", "deft_node_chunk", "deft_flatten")
"""The strategies `NodePlanner` plans (the others go through `deft.plan.build_plan`)."""

_NONE = np.zeros(0, np.int64)  # no last plan to compare with
_UNWRITTEN = (np.zeros(0, np.int32), np.zeros(0, np.int64))  # an output all kept: none written


@compiled
def _put(buffer, offset, values):
    """Copy ``values`` into ``buffer`` from ``offset``; return the offset past them."""
    into = buffer[offset:offset + len(values)]
    for k in range(len(values)):
        into[k] = values[k]
    return offset + len(values)


@compiled
def _unpack(step, nodes, chunks, runs):
    """The arrays of a `measure_step` ``step`` (views)."""
    at = len(step) - 3 * nodes - 4 * chunks - 2 * runs
    query_flat = step[:at]
    ordered, through = step[at:at + nodes], step[at + nodes:at + 2 * nodes]
    end = step[at + 2 * nodes:at + 3 * nodes]
    at += 3 * nodes
    chunk_start, chunk_tokens = step[at:at + chunks], step[at + chunks:at + 2 * chunks]
    lo, hi = step[at + 2 * chunks:at + 3 * chunks], step[at + 3 * chunks:at + 4 * chunks]
    at += 4 * chunks
    run_page, run_length = step[at:at + runs], step[at + runs:at + 2 * runs]
    return (query_flat, ordered, through, end, chunk_start, chunk_tokens, lo, hi, run_page,
            run_length)


@compiled
def measure_step(order, last, query_order, query_shift, flat_query, in_order, tokens, flat,
                 chunk, group, page_ptr, pages, page_size, last_step, last_nodes, last_chunks,
                 last_runs, compare_ranks, compare_pages):
    """A step's layout, chunks, runs of queries and page runs, and what they share with the
    last plan's: all but the outputs' writing (`write_step`), which needs their sizes.

    Parameters
    ----------
    order, last, query_order, query_shift, flat_query, in_order
        The tree's shape (`deft.compiled_plan.tree_shape`).
    tokens : int64 [nodes]
    flat : bool
        deft_flatten's chunks, else deft_node's (``chunk`` 0) or deft_node_chunk's.
    chunk, group : int
        0 for None.
    page_ptr, pages, page_size
        The page table (`deft.plan_slots.page_runs`).
    last_step : int64
        The last plan's ``step`` (empty: none), with its nodes, chunks and page runs.
    compare_ranks, compare_pages : bool
        Whether its runs of queries (the same query ranks) and its page runs (the same page
        size) are to be compared with this step's.

    Returns
    -------
    step : int64
        One array (numba returns an array at 0.3 us a piece): ``query_flat`` [queries],
        ``ordered, through, end`` [nodes] (`deft.compiled_plan.flat_layout`), ``chunk_start,
        chunk_tokens, lo, hi`` [chunks] (`deft.plan_entries.chunk_ranks`), ``run_page,
        run_length`` [runs] (`deft.plan_slots.page_runs`).
    chunks, runs : int
    ints
        The flattened positions whose subtree ends are the last plan's, the entries, the
        partitions, the first chunks seen by the last plan's queries and their entries, the
        preorder positions of the first node short of pages and of the first whose pages lie
        outside ``pages`` (or -1), the largest slot, the first page runs equal to the last
        plan's and their slots.
    """
    nodes, queries = len(order), len(query_order)
    _, last_ordered, last_through, last_end, _, _, last_lo, last_hi, last_page, last_length = \
        _unpack(last_step, last_nodes, last_chunks, last_runs)
    if not compare_ranks:
        last_lo = last_hi = last_lo[:0]
    if not compare_pages:
        last_page = last_length = last_page[:0]
    ordered, through, end, query_flat = flat_layout(order, last, query_order, query_shift,
                                                    tokens, in_order)
    if flat:
        chunk_start, chunk_tokens, chunk_reach = flat_chunks(ordered, through, end, chunk)
    else:
        chunk_start, chunk_tokens, chunk_reach = node_chunks(order, ordered, through, end, chunk)
    chunks = len(chunk_start)
    lo, hi, entries, partitions, same_chunks, same_entries = chunk_ranks(
        chunk_start, chunk_reach, query_flat, flat_query, group, last_lo, last_hi)
    run_page, run_length, short, outside, max_slot, same_pages, same_slots = page_runs(
        order, ordered, page_ptr, pages, page_size, last_page, last_length)
    runs = len(run_page)
    step = np.empty(queries + 3 * nodes + 4 * chunks + 2 * runs, np.int64)
    at = _put(step, 0, query_flat)
    for values in (ordered, through, end, chunk_start, chunk_tokens, lo, hi, run_page,
                   run_length):
        at = _put(step, at, values)
    return (step, chunks, runs, through[-1] if nodes else 0,
            same_runs(ordered, through, end, last_ordered, last_through, last_end), entries,
            partitions, same_chunks, same_entries, short, outside, max_slot, same_pages,
            same_slots)


@compiled
def write_step(step, nodes, chunks, runs, same_ends, subtree_end, same_pages, same_slots, slots,
               rewrite, flat_query, queries_in_order, group, partitions, same_entries,
               entry_query, entry_row, rows_per_query, kept_rows, last_parts, last_partitions):
    """Write a step's ``subtree_end`` and slots past what they share with the last plan's and,
    where ``rewrite``, its entries (`deft.plan_entries.write_entries`; else the last plan's
    partitions are this one's: ``last_parts``, of ``last_partitions``).

    Returns
    -------
    parts : int64
        One array: ``part_chunk, part_entry [partitions + 1], query_rows [2 * queries],
        part_start, part_tokens`` (the last two gathered from the chunks).
    spaced : bool
        Where ``rewrite``, whether the rows start at ``n * rows_per_query`` (`write_entries`);
        else False (the last plan's rows stand).
    """
    (query_flat, ordered, through, end, chunk_start, chunk_tokens, lo, hi, run_page,
     run_length) = _unpack(step, nodes, chunks, runs)
    write_subtree_end(ordered, through, end, same_ends, subtree_end)
    write_slots(run_page, run_length, same_pages, same_slots, slots)
    if rewrite:
        part_chunk, part_entry, query_rows, spaced = write_entries(
            lo, hi, flat_query, queries_in_order, group, partitions, same_entries, entry_query,
            entry_row, rows_per_query, kept_rows)
    else:
        rows_end = 2 * last_partitions + 1 + 2 * len(query_flat)
        part_chunk = last_parts[:last_partitions]
        part_entry = last_parts[last_partitions:2 * last_partitions + 1]
        query_rows = last_parts[2 * last_partitions + 1:rows_end]
        spaced = False
    part_start, part_tokens = gather_parts(part_chunk, chunk_start, chunk_tokens)
    parts = np.empty(4 * len(part_chunk) + 1 + 2 * len(query_flat), np.int64)
    at = _put(parts, 0, part_chunk)
    for values in (part_entry, query_rows, part_start, part_tokens):
        at = _put(parts, at, values)
    return parts, spaced


class _Shape:
    """What a tree's parents and query counts fix, whatever its token counts: the arrays of
    `deft.compiled_plan.tree_shape` (``order``, ``last``, ``query_order``, ``query_shift``,
    ``flat_query``, ``in_order``, ``queries_in_order``)."""

    def __init__(self, parent: np.ndarray, queries: np.ndarray):
        arrays, self.in_order, self.queries_in_order = tree_shape(parent, queries)
        n, q = len(parent), (len(arrays) - 2 * len(parent)) // 3
        self.order, self.last = arrays[:n], arrays[n:2 * n]
        self.query_order = arrays[2 * n:2 * n + q]
        self.query_shift = arrays[2 * n + q:2 * n + 2 * q]
        self.flat_query = arrays[2 * n + 2 * q:]


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
        # the last plan's shape, group, page size, step (`measure_step`) with its nodes,
        # chunks and runs, its parts (`write_step`) and partitions, and its entries' arrays
        self._last = (None, None, None, _NONE, 0, 0, 0, _NONE, 0, None)
        self._end_turns = TurnBuffers(np.int32)  # subtree_end
        self._slot_turns = TurnBuffers(np.int64)  # token_slot
        self._query_turns = TurnBuffers(np.int32)  # entry_query
        self._row_turns = TurnBuffers(np.int32)  # entry_row
        self._rows_per_query = 0  # the last plan's rows_per_query
        self._spaced_by = 0  # the same where its rows were spaced by it, else 0
        self._last_counts = (None, None)  # ((partitions, queries), the counts field)

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
               chunk_size=None, group_size=None, rows_per_query: int = 0) -> dict:
        """The plan buffers' contents, as `deft.plan_buffers.plan_arrays` returns them for
        ``build_plan(strategy, tree, chunk_size, group_size, page_size)`` and
        ``rows_per_query``.

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
        rows_per_query : int
            Where the queries' partial rows start (`deft.plan_entries.row_starts`).

        Returns
        -------
        dict of field name to int64 array (int32 for ``subtree_end``, ``entry_query`` and
        ``entry_row``), plus ``"max_slot"`` (int), ``"slots"``, the cache slot of every
        flattened position (the ``token_slot`` field itself), and ``"kept"``, what the arrays
        share with the last plan's (`deft.plan_buffers.PlanBuffers.fill`). Arrays the planner
        keeps between steps are read-only.
        """
        shape = self.shape(tree.parent, tree.queries)
        if len(page_ptr) != len(shape.order) + 1:
            raise ValueError(f"page_ptr must have nodes + 1 = {len(shape.order) + 1} entries, "
                             f"got {len(page_ptr)}")
        group = group_size or 0
        (last_shape, last_group, last_page_size, last_step, last_nodes, last_chunks, last_runs,
         last_parts, last_partitions, last_entries) = self._last
        comparable = last_shape is shape or last_shape is not None and (
            last_shape.queries_in_order and shape.queries_in_order
            and len(last_shape.flat_query) == len(shape.flat_query))  # the same query ranks
        (step, chunks, runs, total, same_ends, count, partitions, same_chunks, same_entries,
         short, outside, max_slot, same_pages, same_slots) = measure_step(
            shape.order, shape.last, shape.query_order, shape.query_shift, shape.flat_query,
            shape.in_order, tree.tokens, self.strategy == "deft_flatten", chunk_size or 0, group,
            page_ptr, pages, page_size, last_step, last_nodes, last_chunks, last_runs,
            comparable, page_size == last_page_size)
        if short >= 0:
            node = int(shape.order[short])
            raise ValueError(f"node index {node} holds {tree.tokens[node]} tokens but the page "
                             f"table gives it {page_ptr[node + 1] - page_ptr[node]} pages of "
                             f"{page_size}")
        if outside >= 0:
            node = int(shape.order[outside])
            raise ValueError(f"node index {node}'s pages run past the page table's "
                             f"{len(pages)} pages")
        if max_slot > INDEX_LIMIT:
            raise ValueError(f"cache slot {max_slot} is beyond the int32 limit")
        kept, num_queries = {}, len(shape.flat_query)
        subtree_end = self._end_turns.latest  # the last plan's (or None)
        ends_out = self._turn(self._end_turns, "subtree_end", total, same_ends, kept)
        slots = self._slot_turns.latest
        slots_out = self._turn(self._slot_turns, "token_slot", total, same_slots, kept)
        rewrite = not (comparable and group == last_group and same_chunks == chunks
                       == last_chunks and rows_per_query == self._rows_per_query)  # else every
        # chunk is seen by the last plan's queries, and their rows are where they were
        if rewrite:
            entry_query, entry_row = self._query_turns.latest, self._row_turns.latest
            queries_out = self._turn(self._query_turns, "entry_query", count, same_entries, kept)
            kept_rows = same_entries if rows_per_query == self._spaced_by > 0 else 0
            rows_out = self._row_turns.begin(count, kept_rows)
        else:
            queries_out, rows_out, kept_rows = _UNWRITTEN[0], _UNWRITTEN[0], 0
        parts, spaced = write_step(
            step, len(shape.order), chunks, runs, same_ends, ends_out, same_pages, same_slots,
            slots_out, rewrite, shape.flat_query, shape.queries_in_order, group, partitions,
            same_entries, queries_out, rows_out, rows_per_query, kept_rows, last_parts,
            last_partitions)
        if ends_out is not _UNWRITTEN[0]:
            subtree_end = self._end_turns.finish(total, same_ends)
        if slots_out is not _UNWRITTEN[1]:
            slots = self._slot_turns.finish(total, same_slots)
        rows = 2 * partitions + 1 + 2 * num_queries  # parts: where the partitions' starts begin
        if rewrite:
            if queries_out is not _UNWRITTEN[0]:
                entry_query = self._query_turns.finish(count, same_entries)
            kept_rows = kept_rows if spaced else 0
            if kept_rows:
                kept["entry_row"] = (entry_row, kept_rows)
            self._rows_per_query, self._spaced_by = rows_per_query, rows_per_query * spaced
            part_entry, query_rows = parts[partitions:2 * partitions + 1], \
                parts[2 * partitions + 1:rows]
            part_entry.setflags(write=False)
            query_rows.setflags(write=False)
            last_entries = (part_entry, entry_query, self._row_turns.finish(count, kept_rows),
                            query_rows)
        self._last = (shape, group, page_size, step, len(shape.order), chunks, runs, parts,
                      partitions, last_entries)
        part_entry, entry_query, entry_row, query_rows = last_entries
        return dict(
            counts=self._counts(partitions, num_queries),
            part_start=parts[rows:rows + partitions],
            part_tokens=parts[rows + partitions:],
            part_entry=part_entry,
            entry_query=entry_query,
            entry_row=entry_row,
            query_rows=query_rows,
            query_flat=step[:num_queries],
            token_slot=slots,
            subtree_end=subtree_end,
            max_slot=int(max_slot),
            slots=slots,
            kept=kept,
        )

    @staticmethod
    def _turn(turns: TurnBuffers, name: str, n: int, same: int, kept: dict) -> np.ndarray:
        """The array to write a field of ``n`` values into, in turns, whose first ``same``
        are the last plan's (noted in ``kept``); none (an empty array) where all of them are:
        the last plan's array is the field again."""
        if not same:
            return turns.begin(n, 0)
        kept[name] = (turns.latest, same)
        if same == n == len(turns.latest):
            return _UNWRITTEN[int(turns.latest.dtype == np.int64)]
        return turns.begin(n, same)

    def _counts(self, num_partitions: int, num_queries: int) -> np.ndarray:
        """The ``counts`` field, int64 [2] read-only: the last plan's array where they are the
        same (the plan buffers then skip it)."""
        if self._last_counts[0] != (num_partitions, num_queries):
            counts = np.array([num_partitions, num_queries])
            counts.flags.writeable = False
            self._last_counts = ((num_partitions, num_queries), counts)
        return self._last_counts[1]
