"""The partitions and entries of a KV-guided plan from which queries see which chunks, compiled.

`deft.fast_plan.NodePlanner` cuts the flattened tree into chunks (`deft.compiled_plan`); chunk
``c`` is seen by the queries at flattened positions ``chunk_start[c] <= F < chunk_reach[c]``:
let ``end[f]`` be the flattened position just past the subtree of token f's node; a query at F
sees token f iff ``f <= F < end[f]``, and every ``end[f] > f``, so a query sees some token of
a chunk ``[a, b)`` iff ``a <= F < max(end[a:b])``. The queries a chunk sees are then a run of
the queries in flattened order: ranks ``lo[c] <= r < hi[c]`` (`chunk_ranks`).

From those runs a plan needs its partitions (a chunk's queries, in groups) and its entries (one
per (partition, query) pair, chunk-major, a chunk's queries ascending) with their
partial-result rows (a query's entries in chunk order, from the query's first row,
`row_starts`: the plan buffers' layout, `deft.plan_buffers`), which `write_entries` writes in
one pass over the chunks. The entries of the first chunks whose runs are the last plan's are
not written again, nor their rows where the queries' first rows are the last plan's
(`deft.fast_plan` keeps ``entry_query`` and ``entry_row`` in turns, `deft.turn_buffers`).
"""

from __future__ import annotations

import numpy as np

from deft.compiled_plan import compiled


@compiled
def chunk_ranks(chunk_start, chunk_reach, query_flat, flat_query, group, last_lo, last_hi):
    """The run of queries (in flattened order) each chunk is seen by.

    Parameters
    ----------
    chunk_start, chunk_reach : int64 [chunks]
        A chunk is seen by the queries at flattened positions ``start <= F < reach``.
    query_flat : int64 [queries]
    flat_query : int64 [queries]
        The query at each flattened rank.
    group : int
        Queries per partition at most (0: a partition per chunk).
    last_lo, last_hi : int64
        The last plan's runs (empty: none to compare with).

    Returns
    -------
    lo, hi : int64 [chunks]
        Chunk c is seen by the queries of ranks ``lo[c] <= r < hi[c]``.
    entries, partitions : int
    same_chunks : int
        The first chunks whose runs are the last plan's.
    same_entries : int
        Their entries.
    """
    by_rank = query_flat[flat_query]
    lo = np.empty(len(chunk_start), np.int64)
    hi = np.empty(len(chunk_start), np.int64)
    entries, partitions = 0, 0
    for c in range(len(lo)):
        lo[c] = rank_of(by_rank, chunk_start[c])
        hi[c] = max(rank_of(by_rank, chunk_reach[c]), lo[c])
        width = hi[c] - lo[c]
        entries += width
        if group == 0:
            partitions += width > 0
        else:
            partitions += (width + group - 1) // group
    same_chunks, same_entries = 0, 0
    while same_chunks < min(len(lo), len(last_lo)) and lo[same_chunks] == last_lo[same_chunks] \
            and hi[same_chunks] == last_hi[same_chunks]:
        same_entries += hi[same_chunks] - lo[same_chunks]
        same_chunks += 1
    return lo, hi, entries, partitions, same_chunks, same_entries


@compiled
def rank_of(ascending, value):
    """How many of ``ascending``'s values are below ``value`` (a binary search, after the two
    answers of most chunks: none, a chunk before the queries, and all, a shared prompt's)."""
    if value <= ascending[0]:
        return 0
    if value > ascending[-1]:
        return len(ascending)
    lo, hi = 0, len(ascending)
    while lo < hi:
        mid = (lo + hi) // 2
        if ascending[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@compiled
def row_starts(per_query, rows_per_query):
    """Each query's first partial-result row: ``n * rows_per_query`` for query n where every
    query has at most ``rows_per_query`` rows (> 0), so that a query's rows stay where they
    were while other queries gain or lose some, else one query's after another's.

    Parameters
    ----------
    per_query : int64 [queries]
        The rows of each query.
    rows_per_query : int
        0: always one after another.

    Returns
    -------
    starts : int64 [queries]
    spaced : bool
        Whether they are ``n * rows_per_query``.
    """
    starts = np.empty(len(per_query), np.int64)
    spaced = rows_per_query > 0
    for q in range(len(per_query)):
        spaced = spaced and per_query[q] <= rows_per_query
    total = 0
    for q in range(len(per_query)):
        starts[q] = q * rows_per_query if spaced else total
        total += per_query[q]
    return starts, spaced


@compiled
def write_entries(lo, hi, flat_query, queries_in_order, group, partitions, kept, entry_query,
                  entry_row, rows_per_query, kept_rows):
    """Write a plan's entries; return its partitions.

    Parameters
    ----------
    lo, hi : int64 [chunks]
        `chunk_ranks`.
    flat_query : int64 [queries]
    queries_in_order : bool
        Whether query r is at rank r (``flat_query`` is 0, 1, ...).
    group, partitions : int
        As for and from `chunk_ranks`.
    kept : int
        The first entries' queries are in ``entry_query`` already (not written).
    entry_query, entry_row : int32 [entries]
        Written: each entry's query, and its partial-result row.
    rows_per_query : int
        `row_starts`.
    kept_rows : int
        The first entries' rows are in ``entry_row`` already where the queries' rows start
        at ``n * rows_per_query`` (the last plan's, spaced so too): not written then.

    Returns
    -------
    part_chunk : int64 [partitions]
        The chunk of each partition.
    part_entry : int64 [partitions + 1]
        Partition p's entries are ``part_entry[p]:part_entry[p + 1]``.
    query_rows : int64 [2 * queries]
        Query n's rows are ``query_rows[2n]:query_rows[2n + 1]``.
    spaced : bool
        Whether the rows start at ``n * rows_per_query`` (`row_starts`; else ``kept_rows``
        was ignored and every row written).
    """
    num_queries = len(flat_query)
    per_rank = np.zeros(num_queries + 1, np.int64)  # a difference array over the ranks
    for c in range(len(lo)):
        if hi[c] > lo[c]:
            per_rank[lo[c]] += 1
            per_rank[hi[c]] -= 1
    per_query = np.empty(num_queries, np.int64)
    seen = 0
    for r in range(num_queries):
        seen += per_rank[r]
        per_query[flat_query[r]] = seen
    starts, spaced = row_starts(per_query, rows_per_query)
    query_rows = np.empty(2 * num_queries, np.int64)
    for q in range(num_queries):
        query_rows[2 * q], query_rows[2 * q + 1] = starts[q], starts[q] + per_query[q]
    kept_rows = kept_rows if spaced else 0
    next_row = starts.astype(np.int32)  # (int32: the rows' type, which lets the copy loops
    # below vectorise)
    part_chunk = np.empty(partitions, np.int64)
    part_entry = np.empty(partitions + 1, np.int64)
    part_entry[0] = 0
    chunk_queries = np.empty(num_queries, np.int64)
    ids = np.arange(num_queries).astype(np.int32)
    e, p = 0, 0
    pending = 0  # the chunks seen by every query since next_row last counted them
    for c in range(len(lo)):
        width = hi[c] - lo[c]
        if width <= 0:
            continue
        queries, rows = entry_query[e:e + width], entry_row[e:e + width]
        skip = min(max(kept - e, 0), width)  # (loops index views from 0 only: numba then
        if queries_in_order or width == num_queries:  # vectorises them) queries base, base + 1
            base = lo[c] if queries_in_order else 0
            written, chunk_ids = queries[skip:], ids[base + skip:base + width]
            for j in range(width - skip):
                written[j] = chunk_ids[j]
        else:
            chunk_queries[:width] = np.sort(flat_query[lo[c]:hi[c]])
            for j in range(width):
                if j >= skip:
                    queries[j] = chunk_queries[j]
        skip_rows = min(max(kept_rows - e, 0), width)
        if width == num_queries:  # one read and one write an entry (a shared prompt's)
            written_rows, chunk_rows = rows[skip_rows:], next_row[skip_rows:]
            for j in range(width - skip_rows):
                written_rows[j] = chunk_rows[j] + pending
            pending += 1
        else:
            if pending:
                for q in range(num_queries):
                    next_row[q] += pending
                pending = 0
            if queries_in_order:
                chunk_rows = next_row[lo[c]:lo[c] + width]
                for j in range(width):
                    if j >= skip_rows:
                        rows[j] = chunk_rows[j]
                    chunk_rows[j] += 1
            else:
                for j in range(width):
                    q = chunk_queries[j]
                    if j >= skip_rows:
                        rows[j] = next_row[q]
                    next_row[q] += 1
        size = width if group == 0 else group
        for first in range(0, width, size):
            part_chunk[p] = c
            part_entry[p + 1] = e + min(first + size, width)
            p += 1
        e += width
    return part_chunk, part_entry, query_rows, spaced


@compiled
def gather_parts(part_chunk, chunk_start, chunk_tokens):
    """(part_start, part_tokens): each partition's chunk's first flattened position and
    tokens. int64 [partitions] each."""
    return chunk_start[part_chunk], chunk_tokens[part_chunk]
