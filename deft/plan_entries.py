"""The partitions and entries of a KV-guided plan from which queries see which chunks.

`deft.fast_plan.NodePlanner` cuts the flattened tree into chunks; chunk ``c`` is seen by the
queries at flattened positions ``chunk_start[c] <= F < chunk_reach[c]``. From that, a plan
needs its partitions (a chunk's queries, in groups), and its entries (one per (partition,
query) pair, chunk-major, a chunk's queries ascending) with their partial-result rows
(numbered query by query, a query's entries in chunk order: the plan buffers' layout,
`deft.plan_buffers`).

`dense_rows` compares every chunk with every query; `block_rows` does the same in far fewer
element operations when many chunks are seen by every query (a shared prompt's), which is
what a plan of 256 queries over a 64k-token prompt is made of.
"""

from __future__ import annotations

import numpy as np

FULL_RUNS = 16
"""Runs of chunks seen by every query that `block_rows` writes in closed form; past that it
compares those chunks query by query like the others."""


def partitions(per_chunk: np.ndarray, group_size) -> tuple:
    """(chunk of each partition, int64 [partitions]; ``part_entry``, int64 [partitions + 1]).

    per_chunk : int64 [chunks], the queries of each chunk. group_size None: a partition per
    chunk with queries; else each chunk's queries cut into groups of ``group_size``.
    """
    if group_size is None:
        has = per_chunk > 0
        return has.nonzero()[0], pointers(per_chunk[has])
    groups = -(-per_chunk // group_size)
    part_chunk = np.repeat(np.arange(len(per_chunk)), groups)
    rank = np.arange(len(part_chunk)) - np.repeat(np.cumsum(groups) - groups, groups)
    return part_chunk, pointers(np.minimum(group_size, per_chunk[part_chunk] - rank * group_size))


def dense_rows(seen: np.ndarray, query_ids: np.ndarray) -> tuple:
    """(entry_query, entry_row: int64 [entries]; query_row_ptr: int64 [queries + 1]) of chunks
    the queries see as ``seen`` (bool [chunks, queries])."""
    row_of = seen.T.ravel().cumsum().reshape(seen.shape[1], seen.shape[0]).T
    return (np.broadcast_to(query_ids, seen.shape)[seen], row_of[seen] - 1,
            pointers(seen.sum(axis=0)))


def block_rows(chunk_start, chunk_reach, query_flat, query_ids, per_chunk) -> tuple:
    """`dense_rows` of the chunks ``chunk_start <= F < chunk_reach`` (int64 [chunks] each),
    with ``per_chunk`` (int64 [chunks]) queries each.

    A run of chunks every query sees is a block of entries: its queries are ``query_ids``
    chunk after chunk, and a query's row grows by one from a chunk to the next. Only the other
    chunks are compared query by query. ``entry_query`` and ``entry_row`` come as int32 (the
    plan buffers' type) while the entries fit in it.
    """
    num_queries = len(query_flat)
    full = per_chunk == num_queries
    runs = _runs(full)
    if len(runs) > FULL_RUNS:
        full, runs = np.zeros_like(full), runs[:0]
    num_full = int(full.sum())
    full_before = np.cumsum(full) - full  # chunks every query sees, before each chunk
    rest = np.flatnonzero(~full & (per_chunk > 0))
    seen = (chunk_start[rest, None] <= query_flat) & (query_flat < chunk_reach[rest, None])
    # the rest's entries numbered query-major: [queries, rest], entries up to each one
    through = np.cumsum(seen.T.ravel()).reshape(num_queries, len(rest))
    rest_through = through[:, -1] if len(rest) else np.zeros(num_queries, dtype=np.int64)
    query_row_ptr = pointers(num_full + np.diff(rest_through, prepend=0))
    full_rows = num_full * query_ids  # rows the queries before take in the full chunks
    rest_query = np.broadcast_to(query_ids, seen.shape)[seen]
    rest_row = (full_rows + full_before[rest][:, None] + through.T - 1)[seen]
    entry_ptr = pointers(per_chunk)
    # int32 (the plan buffers' type, half the bytes to write) while the rows fit in it
    entry_query = np.empty(int(entry_ptr[-1]), dtype=np.int32 if entry_ptr[-1] < 2**31
                           else np.int64)
    entry_row = np.empty_like(entry_query)
    taken = 0  # rest entries placed
    for a, b in runs.tolist():
        block_start = int(entry_ptr[a])
        upto = block_start - num_queries * int(full_before[a])  # rest entries before chunk a
        entry_query[block_start - (upto - taken): block_start] = rest_query[taken:upto]
        entry_row[block_start - (upto - taken): block_start] = rest_row[taken:upto]
        taken = upto
        rest_before = int(np.searchsorted(rest, a))
        before = full_rows + int(full_before[a])  # each query's row in chunk a
        before += through[:, rest_before - 1] if rest_before else query_row_ptr[:-1] - full_rows
        block = slice(block_start, block_start + (b - a) * num_queries)
        entry_query[block].reshape(b - a, num_queries)[:] = query_ids
        np.add(before, np.arange(b - a)[:, None], out=entry_row[block].reshape(b - a, -1))
    entry_query[len(entry_query) - (len(rest_query) - taken):] = rest_query[taken:]
    entry_row[len(entry_row) - (len(rest_row) - taken):] = rest_row[taken:]
    return entry_query, entry_row, query_row_ptr


def pointers(counts: np.ndarray) -> np.ndarray:
    """CSR offsets of consecutive runs of the given lengths. int64 [len(counts) + 1]"""
    ptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr


def _runs(mask: np.ndarray) -> np.ndarray:
    """[start, end) of every run of True in a bool array. int64 [runs, 2]"""
    edge = np.empty(len(mask) + 1, dtype=bool)
    edge[0], edge[-1] = mask[0], mask[-1]
    np.not_equal(mask[1:], mask[:-1], out=edge[1:-1])
    return np.flatnonzero(edge).reshape(-1, 2)
