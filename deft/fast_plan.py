"""The plan buffers of the KV-guided strategies built straight from a tree's node arrays.

`deft.plan.build_plan` is the normative planner (the reference and the IO model read its
`Plan`); `deft.plan_buffers.plan_arrays` then encodes a plan for the kernels. Together they take
0.3-2 ms a decode step, mostly numpy's per-call overhead on small arrays. `NodePlanner.arrays`
builds the same buffers (equal field by field) for deft_node, deft_node_chunk and deft_flatten
with a few numpy calls over nodes, chunks and tokens, and no `Plan`.

It rests on one fact about flattened positions. Let ``end[f]`` be the flattened position just
past the subtree of token f's node (the ``subtree_end`` buffer). A query at flattened position F
sees token f iff ``f <= F < end[f]``; every token's ``end[f] > f``. So a query sees some token
of a chunk ``[a, b)`` (a run inside the flattened order) iff ``a <= F < max(end[a:b])``: if
F lies inside the chunk it sees its own token, if F is past the chunk it needs one token whose
subtree reaches past F, and it sees nothing before its own position. Every chunk is then an
interval test against the queries: one ``[chunks, queries]`` comparison for a small plan; a
large one first counts the leading chunks every query sees (a shared prompt's: those that
start at or before the first query and reach past the last), writes their entries in closed
form and compares only the others (`deft.plan_entries`).

What depends only on the tree's shape (preorder, subtree ends in preorder positions, query
nodes) is kept per shape, so a decode step that only grows nodes reuses it; and what depends
only on which queries see which chunks (partitions, entries, partial rows) is kept from the
last plan, so a step that moves the chunks' bounds but not their queries reuses that too.
The cache slots are laid out a page at a time (a page is a run of consecutive slots), from
the first page run that differs from the last plan's (`deft.plan_slots`); the plan buffers
then rewrite only the slots from there, skip the entries kept, and the entry queries of the
leading chunks every query sees where they are as many as the last plan's
(`deft.plan_buffers.PlanBuffers.fill`).
The slots and those entry queries are written in turns into two kept arrays
(`deft.turn_buffers`): the one a step writes already holds the step before the last's, so
the unchanged prefix (most of a 64k-token tree) is neither copied nor rewritten; an array
`arrays` returns keeps its values through the next call, not the one after.
A page table passed again, read-only (the tree cache's while the steps take no new page),
keeps its pages in preorder from the last plan.
"""

from __future__ import annotations

import numpy as np

from deft.plan_entries import entry_rows, partitions, range_rows
from deft.plan_slots import SlotLayout
from deft.tree import INDEX_LIMIT
from deft.turn_buffers import TurnBuffers

FAST_STRATEGIES = ("deft_node", "deft_node_chunk", "deft_flatten")
"""The strategies `NodePlanner` plans (the others go through `deft.plan.build_plan`)."""

DENSE_LIMIT = 2048
"""Plans of at most this many (chunk, query) pairs compare each chunk with each query (fewer
numpy calls); larger ones write the first chunks every query sees in closed form
(`deft.plan_entries.entry_rows`)."""

RANGE_LIMIT = 4096
"""Plans whose other chunks (those not every query sees) make more than this many (chunk,
query) pairs list each chunk's queries as a run of the queries in flattened order
(`deft.plan_entries.range_rows`) rather than compare each chunk with each query: on the
branches of 256 samples a chunk sees a few queries."""


class _Shape:
    """What a tree's parents and query counts fix, whatever its token counts.

    Attributes
    ----------
    order : int64 [nodes]
        Node indices in DFS preorder (roots ascending, children ascending).
    last : int64 [nodes]
        Preorder position of the last node of each preorder position's subtree.
    query_order : int64 [queries]
        Preorder position of each query's node (queries in test layout).
    query_shift : int64 [queries]
        Each query's flattened position less its node's flattened end: minus the node's
        queries for its first query, up to -1 for its last.
    in_order : bool
        Whether the preorder is the node-index order (a page table then lists its pages in
        preorder already).
    first_query, last_query : int
        The queries at the lowest and the highest flattened position (a query's flattened
        position grows with its node's preorder position, then with its own).
    flat_query : int64 [queries] or None
        The query at each flattened rank (lowest position first); None where query r is at
        rank r.
    """

    def __init__(self, parent: np.ndarray, queries: np.ndarray):
        n = len(parent)
        children = [[] for _ in range(n)]
        roots = []
        for v, p in enumerate(parent.tolist()):  # ascending index: children come out ascending
            (roots if p < 0 else children[p]).append(v)
        order, last = [], [0] * n
        stack = [(v, False) for v in reversed(roots)]
        while stack:  # iterative DFS; a node's subtree closes when it is popped again
            v, closing = stack.pop()
            if closing:
                last[v] = len(order) - 1
                continue
            order.append(v)
            stack.append((v, True))
            stack.extend((c, False) for c in reversed(children[v]))
        self.order = np.array(order, dtype=np.int64)
        self.last = np.array(last, dtype=np.int64)[self.order]
        preorder_position = np.empty(n, dtype=np.int64)
        preorder_position[self.order] = np.arange(n)
        self.query_order = np.repeat(preorder_position, queries)
        query_ids = np.arange(len(self.query_order))
        self.query_shift = query_ids - np.repeat(np.cumsum(queries), queries)
        by_flat = np.lexsort((self.query_shift, self.query_order))
        self.first_query, self.last_query = int(by_flat[0]), int(by_flat[-1])
        self.flat_query = None if (by_flat == query_ids).all() else by_flat
        self.in_order = bool((self.order == np.arange(n)).all())


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
        self._last_entries = None  # (what the last plan's chunks saw, its entries)
        self._kept_entries = None  # (the last entry_query, the values this one shares)
        self._slot_layout = SlotLayout()  # the slots (`deft.plan_slots`)
        self._entry_turns = TurnBuffers(np.int32)  # entry_query of plans with full chunks
        self._last_counts = (None, None)  # ((partitions, queries), the counts field)
        self._chunk_starts = (None, None)  # ((chunks, chunk size), deft_flatten's chunk starts)
        self._grid = np.zeros((0, 0), dtype=np.int64)  # `_query_grid`

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
        dict of field name to int64 array (int32 for ``subtree_end`` and the entries of a
        large plan), plus
        ``"max_slot"`` (int), ``"slots"``, the cache slot of every flattened position (the
        ``token_slot`` field itself), and ``"kept"``, what the arrays share with the last
        plan's (`deft.plan_buffers.PlanBuffers.fill`). Arrays the planner keeps between steps
        are read-only.
        """
        shape = self.shape(tree.parent, tree.queries)
        ordered = tree.tokens if shape.in_order else tree.tokens[shape.order]
        # (np.add.accumulate: np.cumsum's wrapper costs three times the sum on small arrays)
        through = np.add.accumulate(ordered)  # flattened end of each preorder node
        total = int(through[-1])
        end = through[shape.last]  # flattened end of each preorder node's subtree
        query_flat = through[shape.query_order] + shape.query_shift
        # per flattened position; int32 (the buffers' type) halves the bytes written twice
        subtree_end = (end.astype(np.int32) if total <= INDEX_LIMIT else end).repeat(ordered)
        chunk_start, chunk_tokens, chunk_reach = self._chunks(shape.order, ordered, through,
                                                              end, subtree_end, chunk_size)
        part_chunk, part_entry, query_index, entry_row, query_row_ptr = self._entries(
            shape, chunk_start, chunk_reach, query_flat, group_size)
        slots, max_slot, kept = self._slot_layout.lay_out(shape, ordered, total, page_ptr,
                                                          pages, page_size)
        if self._kept_entries:
            kept["entry_query"] = self._kept_entries
        if max_slot > INDEX_LIMIT:
            raise ValueError(f"cache slot {max_slot} is beyond the int32 limit")
        every_chunk = group_size is None and len(part_chunk) == len(chunk_start)
        return dict(
            counts=self._counts(len(part_chunk), len(query_flat)),
            part_start=chunk_start if every_chunk else chunk_start[part_chunk],
            part_tokens=chunk_tokens if every_chunk else chunk_tokens[part_chunk],
            part_entry=part_entry,
            entry_query=query_index,
            entry_row=entry_row,
            query_row_ptr=query_row_ptr,
            query_flat=query_flat,
            token_slot=slots,
            subtree_end=subtree_end,
            max_slot=max_slot,
            slots=slots,
            kept=kept,
        )

    def _query_grid(self, num_queries: int, rows: int) -> np.ndarray:
        """The query ids 0, 1, ..., num_queries - 1 in each of at least ``rows`` rows (and one),
        int64 [rows', num_queries] read-only, kept."""
        if self._grid.shape[1] != num_queries or len(self._grid) < rows:
            self._grid = np.empty((max(rows, 1), num_queries), dtype=np.int64)
            self._grid[:] = np.arange(num_queries)
            self._grid.flags.writeable = False
        return self._grid

    def _entries(self, shape, chunk_start, chunk_reach, query_flat, group_size) -> tuple:
        """The partitions and entries of a plan whose chunk ``c`` is seen by the queries at
        flattened positions ``chunk_start[c] <= F < chunk_reach[c]``, kept for the next step:
        a decode step often changes the chunks' lengths but not who sees them. A plan with as
        many full chunks and queries as the last one shares its block of entry queries
        (``_kept_entries``).

        A small plan compares every chunk with every query; a larger one first counts the
        chunks every query sees up front (a shared prompt's), which take a closed form
        (`deft.plan_entries.entry_rows`), and compares only the others, or, where those are
        many (`RANGE_LIMIT`), lists each one's queries as a run of the queries in flattened
        order (`deft.plan_entries.range_rows`).

        Returns
        -------
        part_chunk : int64 [partitions]
            Chunk of each partition.
        part_entry : int64 [partitions + 1]
        entry_query, entry_row : int [entries]
        query_row_ptr : int64 [queries + 1]
            As the plan buffers of the same names (read-only: shared between steps).
        """
        num_chunks, num_queries = len(chunk_start), len(query_flat)
        full = 0  # the first chunks, seen by every query
        if num_chunks * num_queries > DENSE_LIMIT:
            missed = (chunk_start > query_flat[shape.first_query]) \
                | (chunk_reach <= query_flat[shape.last_query])
            full = int(missed.argmax())
            if not missed[full]:
                full = num_chunks
        rest = (num_chunks - full, num_queries)
        ranges = rest[0] * num_queries > RANGE_LIMIT
        if ranges:  # each chunk's queries: a run of ranks
            by_rank = query_flat if shape.flat_query is None else query_flat[shape.flat_query]
            lo = by_rank.searchsorted(chunk_start[full:])
            hi = by_rank.searchsorted(chunk_reach[full:])
            key = (full, rest, (shape, lo.tobytes(), hi.tobytes()), group_size)
        else:
            seen = (chunk_start[full:, None] <= query_flat) \
                & (query_flat < chunk_reach[full:, None])
            key = (full, rest, seen.tobytes(), group_size)
        last = self._last_entries
        self._kept_entries = None
        if last is not None and last[0] == key:
            return last[1]
        block_kept = bool(full) and last is not None and last[0][0] == full \
            and last[0][1][1] == num_queries
        if block_kept:
            self._kept_entries = (last[1][2], full * num_queries)  # the same block first
        if full:
            per_chunk = np.empty(num_chunks, dtype=np.int64)
            per_chunk[:full] = num_queries
            if ranges:
                np.subtract(hi, lo, out=per_chunk[full:])
            else:
                np.add.reduce(seen, axis=1, out=per_chunk[full:])
        else:
            per_chunk = hi - lo if ranges else np.add.reduce(seen, axis=1)
        block_kept = block_kept and last[1][2] is self._entry_turns.latest
        if ranges:
            rows = range_rows(full, lo, hi, shape.flat_query,
                              self._query_grid(num_queries, 1)[0], self._entry_turns, block_kept)
        else:
            rows = entry_rows(full, seen, self._query_grid(num_queries, rest[0]),
                              self._entry_turns, block_kept)
        entries = (*partitions(per_chunk, group_size), *rows)
        for array in entries:
            array.setflags(write=False)  # (cheaper than through .flags)
        self._last_entries = (key, entries)
        return entries

    def _counts(self, num_partitions: int, num_queries: int) -> np.ndarray:
        """The ``counts`` field, int64 [2] read-only: the last plan's array where they are the
        same (the plan buffers then skip it)."""
        if self._last_counts[0] != (num_partitions, num_queries):
            counts = np.array([num_partitions, num_queries])
            counts.flags.writeable = False
            self._last_counts = ((num_partitions, num_queries), counts)
        return self._last_counts[1]

    def _chunks(self, order, ordered, through, end, subtree_end, chunk):
        """(start, tokens, reach) of every chunk in plan order: its flattened run and the
        largest subtree end of its tokens. int64 [chunks] each."""
        if self.strategy == "deft_flatten":  # the flattened order cut into even blocks
            total = len(subtree_end)
            num_chunks = -(-total // chunk)
            if self._chunk_starts[0] != (num_chunks, chunk):  # kept read-only: fill skips it
                starts = np.arange(0, total, chunk)  # (a strided view of a kept arange missed
                # cache on 64k tokens)
                starts.flags.writeable = False
                self._chunk_starts = ((num_chunks, chunk), starts)
            chunk_start = self._chunk_starts[1]
            chunk_tokens = np.empty(num_chunks, dtype=np.int64)
            chunk_tokens.fill(chunk)
            chunk_tokens[-1] = total - (num_chunks - 1) * chunk
            reach = np.maximum.reduceat(subtree_end, chunk_start)
            return chunk_start, chunk_tokens, reach.astype(np.int64)  # compared with int64s
        # deft_node, deft_node_chunk: each node's run by node index, cut into chunks
        by_index = np.empty_like(order)
        by_index[order] = np.arange(len(order))
        node_start, node_end, node_reach = (x[by_index] for x in (through - ordered, through,
                                                                   end))
        if chunk is None:
            return node_start, node_end - node_start, node_reach
        count = -(-(node_end - node_start) // chunk)
        node = np.repeat(np.arange(len(count)), count)
        offset = (np.arange(count.sum()) - np.repeat(np.add.accumulate(count) - count, count)) \
            * chunk
        chunk_start = node_start[node] + offset
        chunk_tokens = np.minimum(chunk_start + chunk, node_end[node]) - chunk_start
        return chunk_start, chunk_tokens, node_reach[node]
