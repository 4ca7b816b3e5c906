"""The partitions and entries of a KV-guided plan from which queries see which chunks.

`deft.fast_plan.NodePlanner` cuts the flattened tree into chunks; chunk ``c`` is seen by the
queries at flattened positions ``chunk_start[c] <= F < chunk_reach[c]``. From that, a plan
needs its partitions (a chunk's queries, in groups), and its entries (one per (partition,
query) pair, chunk-major, a chunk's queries ascending) with their partial-result rows
(numbered query by query, a query's entries in chunk order: the plan buffers' layout,
`deft.plan_buffers`).

`entry_rows` writes the first chunks, those every query sees (a shared prompt's), in closed
form and compares only the others with each query: a plan of 256 queries over a 64k-token
prompt is mostly made of the former.
"""

from __future__ import annotations

import numpy as np


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
    rank = np.arange(len(part_chunk)) - np.repeat(np.add.accumulate(groups) - groups, groups)
    return part_chunk, pointers(np.minimum(group_size, per_chunk[part_chunk] - rank * group_size))


def entry_rows(full: int, seen: np.ndarray, query_grid: np.ndarray, turns=None,
               block_kept: bool = False) -> tuple:
    """(entry_query, entry_row: int [entries]; query_row_ptr: int64 [queries + 1]) of a plan
    whose first ``full`` chunks every query sees and whose other chunks the queries see as
    ``seen`` (bool [chunks - full, queries]).

    The first chunks are one block of entries: queries 0, 1, ... chunk after chunk, a query's
    row growing by one from a chunk to the next. ``query_grid`` (int [at least chunks - full,
    queries]) holds the query ids 0, 1, ... in every row. The entries are int32 (the plan
    buffers' type, half the bytes to write) where there are full chunks and fewer than 2**31
    entries, else int64. ``turns`` (int32 `deft.turn_buffers.TurnBuffers`, optional) then
    holds entry_query; ``block_kept``: its latest array starts with this plan's block (as
    many full chunks and queries), which is then not written again.
    """
    rest, num_queries = seen.shape
    ids = query_grid[0]
    # the other chunks' entries numbered query-major, up to each one: [queries, rest]
    through = np.add.accumulate(seen.T.ravel(), dtype=np.int64).reshape(num_queries, rest)
    query_row_ptr = np.zeros(num_queries + 1, dtype=np.int64)
    if rest:
        query_row_ptr[1:] = through[:, -1]
    if not full:
        rest_row = through.T[seen]
        rest_row -= 1
        return query_grid[:rest][seen], rest_row, query_row_ptr
    full_through = ids * full
    full_through += full  # the full chunks' entries of each query and of those before it
    query_row_ptr[1:] += full_through
    full_through -= 1
    rest_row = (through.T + full_through)[seen]  # a query's rows: its full chunks' first
    return _with_block(full, ids, query_grid[:rest][seen], rest_row, query_row_ptr, turns,
                       block_kept)


def range_rows(full: int, lo: np.ndarray, hi: np.ndarray, flat_query, query_ids: np.ndarray,
               turns=None, block_kept: bool = False) -> tuple:
    """`entry_rows` of a plan whose other chunks the queries see by flattened-position ranges:
    chunk ``full + c`` is seen by the queries of flattened ranks ``lo[c] <= r < hi[c]``.

    A chunk is seen by the queries at flattened positions ``start <= F < reach``: a run of
    the queries in flattened order. Where those runs are short (a few queries each, as on the
    branches of 256 samples), listing them costs less than comparing every chunk with every
    query.

    Parameters
    ----------
    full : int
    lo, hi : int64 [chunks - full]
    flat_query : int64 [queries] or None
        The query of each flattened rank (None: query r is at rank r).
    query_ids : int64 [queries]
        0, 1, ..., queries - 1.
    turns, block_kept
        As for `entry_rows`.
    """
    width = hi - lo  # each chunk's queries
    count = int(width.sum())
    rank = np.arange(count)
    rank -= np.repeat(np.add.accumulate(width) - width - lo, width)  # each entry's flat rank
    rest_query = rank if flat_query is None else flat_query[rank]
    if flat_query is not None:  # a chunk's queries ascending
        chunk_of = np.repeat(np.arange(len(width)), width)
        rest_query = rest_query[np.lexsort((rest_query, chunk_of))]
    by_query = np.argsort(rest_query, kind="stable")  # a query's chunks ascending
    rest_row = np.empty(count, dtype=np.int64)
    rest_row[by_query] = np.arange(count)  # a query's rows one after the other
    per_query = np.bincount(rest_query, minlength=len(query_ids))
    query_row_ptr = np.empty(len(query_ids) + 1, dtype=np.int64)
    query_row_ptr[0] = 0
    if full:
        per_query += full
        rest_row += (rest_query + 1) * full  # after the query's full chunks and those before
    np.add.accumulate(per_query, out=query_row_ptr[1:])
    if not full:
        return rest_query, rest_row, query_row_ptr
    return _with_block(full, query_ids, rest_query, rest_row, query_row_ptr, turns, block_kept)


def _with_block(full, ids, rest_query, rest_row, query_row_ptr, turns, block_kept) -> tuple:
    """(entry_query, entry_row, query_row_ptr): the closed-form block of the ``full`` chunks
    every query sees, then the other chunks' entries (``rest_query``, ``rest_row``, int
    [entries - full * queries]); ``ids``: 0, 1, ..., queries - 1. See `entry_rows` for
    ``turns`` and ``block_kept``."""
    num_queries = len(ids)
    block = full * num_queries
    count = block + len(rest_row)
    entry_row = np.empty(count, dtype=np.int32 if count < 2**31 else np.int64)
    in_turns = turns is not None and entry_row.dtype == np.int32
    kept = block if in_turns and block_kept else 0
    entry_query = turns.begin(count, kept) if in_turns else np.empty_like(entry_row)
    entry_query[block:] = rest_query
    entry_row[block:] = rest_row
    if not kept:
        entry_query[:block].reshape(full, num_queries)[:] = ids
    if in_turns:
        entry_query = turns.finish(count, kept)
    block_rows(query_row_ptr[:-1], entry_row[:block].reshape(full, num_queries))
    return entry_query, entry_row, query_row_ptr


def block_rows(first: np.ndarray, rows: np.ndarray) -> None:
    """Write ``rows[c] = first + c`` (int [chunks, queries]): each query's rows of the chunks
    every query sees, from its first. Row after row doubled (``rows[k:2k] = rows[:k] + k``)
    where the rows are many: numpy's broadcast add of a column ran 1.2-3x slower than
    contiguous adds of a scalar (46 against 37 us on 492 x 256 rows, 2-core CPU)."""
    if len(rows) < 64:
        np.add(first.astype(rows.dtype), np.arange(len(rows), dtype=rows.dtype)[:, None],
               out=rows)
        return
    rows[0] = first
    done = 1
    while done < len(rows):
        step = min(done, len(rows) - done)
        np.add(rows[:step], done, out=rows[done:done + step])
        done += step


def pointers(counts: np.ndarray) -> np.ndarray:
    """CSR offsets of consecutive runs of the given lengths. int64 [len(counts) + 1]"""
    ptr = np.empty(len(counts) + 1, dtype=np.int64)
    ptr[0] = 0
    np.add.accumulate(counts, out=ptr[1:])  # np.cumsum's wrapper costs more than the sum
    return ptr
