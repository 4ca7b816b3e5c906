"""Query groups of the KV-guided strategies (`group_size`) as partition classes.

A KV-guided chunk's seeing queries, in query order, are cut into groups of `group` queries;
each group is a partition whose work is the sum of its queries' visible tokens in the chunk.
Those per-query works come in *runs* of consecutive ranks: constant (a node's queries below
every segment they see) or a ramp rising by one a rank (a node's own queries on the first
tokens of its segment). Groups inside one constant run are equal and counted together; the few
groups that cross a run boundary, overlap a ramp or end short are summed one by one.
"""

from __future__ import annotations

import numpy as np

from deft.plan import ranks
from deft.tree import Tree


def group_classes(tree: Tree, chunks, seeing, tokens, pages, group: int, holder, ancestor):
    """Classes of the groups of every chunk.

    Parameters
    ----------
    chunks : deft.plan._Sequences
        The chunks (`deft.plan_aggregates._kv_chunks`).
    seeing, tokens, pages : int64 [chunks]
        Queries that see each chunk, its tokens and pages.
    group : int
    holder, ancestor : int64 [pairs]
        Every (node with queries, strict ancestor) pair, sorted by node.

    Returns
    -------
    dict of int64 [K]: ``tokens``, ``queries``, ``pages``, ``work``, ``count``.
    """
    single = np.diff(chunks.ptr) == 1
    runs = [_single_segment_runs(tree, chunks, seeing, single, holder, ancestor),
            _many_segment_runs(tree, chunks, ~single, holder, ancestor)]
    run = {key: np.concatenate([r[key] for r in runs]) for key in runs[0]}
    keep = run["length"] > 0
    run = {key: value[keep] for key, value in run.items()}
    order = np.lexsort((run["start"], run["chunk"]))
    run = {key: value[order] for key, value in run.items()}
    chunk, queries, work, count = _split(run, seeing, group)
    keep = count > 0
    chunk = chunk[keep]
    return {"tokens": tokens[chunk], "queries": queries[keep], "pages": pages[chunk],
            "work": work[keep], "count": count[keep]}


def _runs(chunk, start, length, first, slope) -> dict:
    return {"chunk": chunk, "start": start, "length": length, "first": first, "slope": slope}


def _single_segment_runs(tree, chunks, seeing, single, holder, ancestor) -> dict:
    """Runs of one-segment chunks (u, a, len), by rank: the r0 queries below u on lower node
    indices (work len), u's queries on j >= a (a ramp up to len, then len), the rest (len)."""
    c = np.flatnonzero(single)
    at = chunks.ptr[c]
    u, a, length = chunks.node[at], chunks.pos[at], chunks.length[at]
    t, q = tree.tokens[u], tree.queries[u]
    begin = np.maximum(a, t - q)  # u's first query that sees the chunk
    own = t - begin
    short = np.clip(a + length - 1 - begin, 0, own)  # those that see part of it
    lower = holder < ancestor
    r0 = np.bincount(ancestor[lower], tree.queries[holder[lower]], tree.num_nodes)
    r0 = r0.astype(np.int64)[u]
    zero = np.zeros_like(c)
    return _runs(np.tile(c, 4), np.concatenate([zero, r0, r0 + short, r0 + own]),
                 np.concatenate([r0, short, own - short, seeing[c] - r0 - own]),
                 np.concatenate([length, begin + 1 - a, length, length]),
                 np.concatenate([zero, zero + 1, zero, zero]))


def _many_segment_runs(tree, chunks, many, holder, ancestor) -> dict:
    """Runs of chunks holding several segments (deft_flatten): a block per (chunk, query node
    v), in node order, whose queries see v's ancestors' segments in the chunk (``base``) and
    their own position range of v's segment there, if any."""
    segment = np.flatnonzero(np.repeat(many, np.diff(chunks.ptr)))
    seg_node = chunks.node[segment]
    by_node = np.argsort(seg_node, kind="stable")
    ptr = np.searchsorted(seg_node[by_node], np.arange(tree.num_nodes + 1))
    holders = np.flatnonzero(tree.queries > 0)
    v = np.concatenate([holder, holders])  # every query node with each ancestor and itself
    x = np.concatenate([ancestor, holders])
    per = ptr[x + 1] - ptr[x]
    entry_v = np.repeat(v, per)
    entry_seg = segment[by_node[np.repeat(ptr[x], per) + ranks(per)]]
    entry_chunk = np.repeat(np.arange(len(many)), np.diff(chunks.ptr))[entry_seg]
    mine = chunks.node[entry_seg] == entry_v
    key, block = np.unique(entry_chunk * tree.num_nodes + entry_v, return_inverse=True)
    c, v = key // tree.num_nodes, key % tree.num_nodes
    base = np.bincount(block, np.where(mine, 0, chunks.length[entry_seg]), len(key))
    base = base.astype(np.int64)
    has_own = np.zeros(len(key), dtype=bool)
    has_own[block[mine]] = True
    a, length = np.zeros(len(key), np.int64), np.zeros(len(key), np.int64)
    a[block[mine]], length[block[mine]] = chunks.pos[entry_seg[mine]], chunks.length[entry_seg[mine]]
    t, q = tree.tokens[v], tree.queries[v]
    begin = np.where(has_own, np.maximum(a, t - q), t - q)
    size = t - begin
    short = np.where(has_own, np.clip(a + length - 1 - begin, 0, size), 0)
    rank = np.cumsum(size) - size
    first_of_chunk = np.searchsorted(c, c)  # the chunk's first block
    rank = rank - rank[first_of_chunk]
    return _runs(np.tile(c, 2), np.concatenate([rank, rank + short]),
                 np.concatenate([short, size - short]),
                 np.concatenate([base + begin + 1 - a, base + length]),
                 np.concatenate([np.ones_like(c), np.zeros_like(c)]))


def _split(run: dict, seeing: np.ndarray, group: int):
    """Groups of `group` consecutive ranks over each chunk's runs: (chunk, queries, work, count)."""
    chunk, start, length, first, slope = (run[k] for k in ("chunk", "start", "length", "first",
                                                          "slope"))
    end = start + length
    # groups inside one constant run
    pure = np.where(slope == 0, np.maximum(end // group - -(-start // group), 0), 0)
    # every other group: across a run start, over a ramp, or the short last one
    ramp = np.flatnonzero(slope > 0)
    ramp_groups = (end[ramp] - 1) // group - start[ramp] // group + 1
    inner = start % group != 0
    short_last = np.flatnonzero(seeing % group)
    impure_chunk = np.concatenate([chunk[inner], np.repeat(chunk[ramp], ramp_groups),
                                   short_last])
    impure_k = np.concatenate([start[inner] // group,
                               np.repeat(start[ramp] // group, ramp_groups) + ranks(ramp_groups),
                               seeing[short_last] // group])
    span = int(seeing.max(initial=0)) // group + 1
    key = np.unique(impure_chunk * span + impure_k)
    g_chunk, k = key // span, key % span
    lo, hi = k * group, np.minimum((k + 1) * group, seeing[g_chunk])
    # cumulative work up to a rank: runs' global starts and their work before them in the chunk
    offset = np.concatenate([[0], np.cumsum(seeing)])
    global_start = offset[chunk] + start
    total = length * first + slope * length * (length - 1) // 2
    before = np.cumsum(total) - total
    before = before - before[np.searchsorted(chunk, chunk)]

    def cumulative(rank, inside):
        """Work of ranks [0, rank) of each group's chunk; `inside` is a rank of the same run."""
        r = np.searchsorted(global_start, offset[g_chunk] + inside, side="right") - 1
        n = offset[g_chunk] + rank - global_start[r]
        return before[r] + n * first[r] + slope[r] * n * (n - 1) // 2

    work = cumulative(hi, hi - 1) - cumulative(lo, lo)
    return (np.concatenate([chunk, g_chunk]), np.concatenate([np.full_like(chunk, group), hi - lo]),
            np.concatenate([group * first, work]),
            np.concatenate([pure, np.ones_like(g_chunk)]))
