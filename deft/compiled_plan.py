"""The node planner's tree side, compiled: preorder, flattened positions, chunks, subtree ends.

`deft.fast_plan.NodePlanner` builds a KV-guided strategy's plan buffers in two compiled
(numba) calls a step that loop over nodes, chunks, queries and tokens and write their outputs
directly (numpy took some sixty calls of 0.5-2 us each). This module holds `compiled`, how
they are compiled, and the functions that read the tree: `tree_shape` (what its parents and
query counts fix, kept per shape), `flat_layout` (flattened ends and query positions, a step's
first), `flat_chunks` (deft_flatten's chunks), `node_chunks` (deft_node's and
deft_node_chunk's), `same_runs` and `write_subtree_end` (a subtree end as the buffers hold it:
`encoded_end`). The entries are `deft.plan_entries`', the slots `deft.plan_slots`'.

Every function is compiled on first call and cached on disk (numba's ``cache=True``: in
``__pycache__`` beside this file, or numba's fallback directories where that is not writable; in
memory where none is). numba checks a cached function against its own file only: a cached
function keeps the compiled body of any function it calls from another module
(`deft.fast_plan.measure_step` inlines `same_runs`), so after editing one of these modules
delete ``deft/__pycache__/*.nbi`` and ``*.nbc`` (a clean checkout, as CI's, has none). The loops
over tokens and entries write through views of their outputs, from index 0: a store indexed by
``base + j``, or a loop over ``range(start, n)``, keeps numba from vectorising it (a negative
index must wrap), and ran 3-10x slower on the 64k-token trees; numba's slice-to-slice copies ran
6x slower than such a loop.
"""

from __future__ import annotations

import warnings

import numba
import numpy as np

_uncached = []  # the functions compiled without an on-disk cache (none writable)

REACHES_END = 2**31 - 1
"""``subtree_end`` of a token whose subtree runs to the end of the flattened order: above every
query position whatever the tree's size (`deft.plan_buffers`, the field's encoding)."""


def compiled(function):
    """``function`` compiled by numba (no Python objects), cached on disk where a cache
    directory is writable; else compiled in memory on each process's first call (numba raises
    where no cache directory is writable: a warning says so, once)."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError as error:  # "cannot cache function ...: no locator available"
        if not _uncached:
            warnings.warn(f"the compiled planner is not cached on disk ({error}): each "
                          "process compiles it again", RuntimeWarning, stacklevel=2)
        _uncached.append(function.__name__)
        return numba.njit(nogil=True)(function)


@compiled
def tree_shape(parent, queries):
    """What a tree's parents and query counts fix, whatever its token counts.

    Parameters
    ----------
    parent : int64 [nodes]
        -1 for a root.
    queries : int64 [nodes]

    Returns
    -------
    arrays : int64 [2 nodes + 3 queries]
        One array (numba returns an array at 0.3 us a piece) holding, one after the other:
        ``order`` [nodes], node indices in DFS preorder (roots ascending, children
        ascending); ``last`` [nodes], the preorder position of the last node of each preorder
        position's subtree; ``query_order`` [queries], the preorder position of each query's
        node (queries in test layout); ``query_shift`` [queries], each query's flattened
        position less its node's flattened end (minus the node's queries for its first
        query, up to -1 for its last); ``flat_query`` [queries], the query at each flattened
        rank (lowest position first: a query's flattened position grows with its node's
        preorder position, then with its own).
    in_order, queries_in_order : bool
        Whether the preorder is the node-index order, and whether query r is at rank r.
    """
    n, num_queries = len(parent), queries.sum()
    arrays = np.empty(2 * n + 3 * num_queries, np.int64)
    order, last = arrays[:n], arrays[n:2 * n]
    query_order = arrays[2 * n:2 * n + num_queries]
    query_shift = arrays[2 * n + num_queries:2 * n + 2 * num_queries]
    flat_query = arrays[2 * n + 2 * num_queries:]
    child_ptr = np.zeros(n + 2, np.int64)  # list 0: the roots; list v + 1: node v's children
    for v in range(n):
        child_ptr[parent[v] + 2] += 1
    for k in range(n + 1):
        child_ptr[k + 1] += child_ptr[k]
    children = np.empty(n, np.int64)
    fill = child_ptr[:-1].copy()
    for v in range(n):  # ascending: each list comes out ascending
        children[fill[parent[v] + 1]] = v
        fill[parent[v] + 1] += 1
    position = np.empty(n, np.int64)  # preorder position of each node
    last_of = np.empty(n, np.int64)  # by node index
    stack = np.empty(n + 1, np.int64)  # the path from a root: nodes
    cursor = np.empty(n + 1, np.int64)  # and the next child to visit at each
    stack[0], cursor[0], depth, done = -1, child_ptr[0], 1, 0
    while depth:
        v, k = stack[depth - 1], cursor[depth - 1]
        if k < child_ptr[v + 2]:
            c = children[k]
            cursor[depth - 1] = k + 1
            order[done], position[c] = c, done
            done += 1
            stack[depth], cursor[depth] = c, child_ptr[c + 1]
            depth += 1
        else:
            if v >= 0:
                last_of[v] = done - 1
            depth -= 1
    for i in range(n):
        last[i] = last_of[order[i]]
    query_start = np.empty(n + 1, np.int64)
    query_start[0] = 0
    for v in range(n):
        query_start[v + 1] = query_start[v] + queries[v]
    for v in range(n):
        for j in range(queries[v]):
            query_order[query_start[v] + j] = position[v]
            query_shift[query_start[v] + j] = j - queries[v]
    rank, in_order, queries_in_order = 0, True, True
    for i in range(n):
        v = order[i]
        in_order = in_order and v == i
        for j in range(queries[v]):
            flat_query[rank] = query_start[v] + j
            queries_in_order = queries_in_order and flat_query[rank] == rank
            rank += 1
    return arrays, in_order, queries_in_order


@compiled
def flat_layout(order, last, query_order, query_shift, tokens, in_order):
    """A step's flattened positions.

    Parameters
    ----------
    order, last, query_order, query_shift : int64
        The tree's shape (`tree_shape`).
    tokens : int64 [nodes]
        By node index.
    in_order : bool

    Returns
    -------
    ordered : int64 [nodes]
        Tokens of each preorder node.
    through : int64 [nodes]
        Flattened end of each preorder node.
    end : int64 [nodes]
        Flattened end of each preorder node's subtree.
    query_flat : int64 [queries]
        Flattened position of each query's token.
    """
    n = len(order)
    ordered = tokens.copy() if in_order else tokens[order]
    through = np.empty(n, np.int64)
    total = 0
    for i in range(n):
        total += ordered[i]
        through[i] = total
    end = through[last]
    query_flat = through[query_order] + query_shift
    return ordered, through, end, query_flat


@compiled
def flat_chunks(ordered, through, end, chunk):
    """(start, tokens, reach) of deft_flatten's chunks, the flattened order cut into runs of
    ``chunk`` tokens: each one's first flattened position, its length and the largest subtree
    end of its tokens (a query at flattened position F sees a token f iff ``f <= F <
    end[f]``). int64 [chunks] each."""
    total = through[-1] if len(through) else 0
    num_chunks = (total + chunk - 1) // chunk
    chunk_start = np.arange(0, num_chunks * chunk, chunk)
    chunk_tokens = np.full(num_chunks, chunk, np.int64)
    if num_chunks:
        chunk_tokens[-1] = total - (num_chunks - 1) * chunk
    reach = np.zeros(num_chunks, np.int64)
    for i in range(len(ordered)):
        if ordered[i] == 0:
            continue
        start = through[i] - ordered[i]
        for c in range(start // chunk, (through[i] + chunk - 1) // chunk):
            reach[c] = max(reach[c], end[i])
    return chunk_start, chunk_tokens, reach


@compiled
def node_chunks(order, ordered, through, end, chunk):
    """(start, tokens, reach) of deft_node's chunks (``chunk`` 0: one per node) or
    deft_node_chunk's (each node's run cut into runs of ``chunk`` tokens), nodes by index:
    each chunk's first flattened position, its length and its node's subtree end. int64
    [chunks] each."""
    n = len(order)
    if chunk == 0:
        num_chunks = n
    else:
        num_chunks = 0
        for i in range(n):
            num_chunks += (ordered[i] + chunk - 1) // chunk
    start = np.empty(num_chunks, np.int64)
    length = np.empty(num_chunks, np.int64)
    reach = np.empty(num_chunks, np.int64)
    position = np.empty(n, np.int64)  # preorder position of each node
    for i in range(n):
        position[order[i]] = i
    c = 0
    for v in range(n):
        i = position[v]
        first, node_end = through[i] - ordered[i], through[i]
        if chunk == 0:
            start[c], length[c], reach[c] = first, ordered[i], end[i]
            c += 1
            continue
        for a in range(first, node_end, chunk):
            start[c], length[c], reach[c] = a, min(chunk, node_end - a), end[i]
            c += 1
    return start, length, reach


@compiled
def encoded_end(end, total):
    """A subtree end as the buffers hold it: `REACHES_END` where it is the tree's end
    (``total`` tokens)."""
    return REACHES_END if end == total else end


@compiled
def same_runs(ordered, through, end, last_ordered, last_through, last_end):
    """The flattened positions whose encoded subtree ends (`write_subtree_end`) are the last
    plan's: those of the preorder nodes up to the first whose encoded subtree end differs (a
    subtree end at each tree's own end is `REACHES_END` in both) or whose tokens do, of which
    the positions both plans have (a prompt that grew keeps its old positions' values)."""
    total = through[-1] if len(through) else 0
    last_total = last_through[-1] if len(last_through) else 0
    same = 0
    for k in range(min(len(ordered), len(last_ordered))):
        if encoded_end(end[k], total) != encoded_end(last_end[k], last_total):
            break
        if ordered[k] != last_ordered[k]:
            return same + min(ordered[k], last_ordered[k])
        same += ordered[k]
    return same


@compiled
def write_subtree_end(ordered, through, end, first, out):
    """``out[f] = end`` of position f's preorder node, `REACHES_END` where that is the tree's
    end, for every flattened position f >= ``first`` (``out``: int32 or int64 [tokens])."""
    total = through[-1] if len(through) else 0
    for i in range(len(ordered)):
        if through[i] > first:  # a slice assignment: numba's loop of indexed stores is 10x
            out[max(through[i] - ordered[i], first):through[i]] = encoded_end(end[i], total)
