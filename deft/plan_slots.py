"""The cache slot of every flattened position of a tree, laid out a page at a time, compiled.

`deft.fast_plan.NodePlanner` puts a tree's nodes in preorder; the ``token_slot`` plan buffer
then lists the cache slot (page * page_size + offset) of every flattened position. A page
holds a run of consecutive slots for consecutive positions of its node, so the slots are laid
out page run by page run (`page_runs`, `write_slots`), from the first run that differs from the
last plan's: a decode step that grows the last nodes of the preorder lays out only their pages.
`deft.fast_plan` writes the slots in turns (`deft.turn_buffers`), so the prefix is mostly in
place already.
"""

from __future__ import annotations

import numpy as np

from deft.compiled_plan import compiled


@compiled
def page_runs(order, ordered, page_ptr, pages, page_size, last_page, last_length):
    """The pages a tree's tokens use, in preorder.

    Parameters
    ----------
    order, ordered : int64 [nodes]
        The preorder and each preorder node's tokens.
    page_ptr : int64 [nodes + 1]
    pages : int64 [pages]
        The page table in node-index order.
    page_size : int
    last_page, last_length : int64
        The last plan's runs (empty: none to compare with).

    Returns
    -------
    run_page : int64 [runs]
        page * page_size of each used page, in preorder.
    run_length : int64 [runs]
        The tokens on it (``page_size``, fewer on a node's last page).
    short : int
        The first preorder position whose node has fewer pages than its tokens need, else -1.
    outside : int
        The first preorder position whose node's pages lie outside ``pages``, else -1.
    max_slot : int
        The largest slot used.
    same_runs, same_slots : int
        The first runs equal to the last plan's, and their slots.
    """
    runs = 0
    for i in range(len(order)):
        runs += (ordered[i] + page_size - 1) // page_size
    run_page = np.empty(runs, np.int64)
    run_length = np.empty(runs, np.int64)
    short, outside, max_slot, k = -1, -1, -1, 0
    for i in range(len(order)):
        v, tokens = order[i], ordered[i]
        used = (tokens + page_size - 1) // page_size
        if used > page_ptr[v + 1] - page_ptr[v]:
            short = i
            break
        if page_ptr[v] < 0 or page_ptr[v] + used > len(pages):
            outside = i
            break
        node_pages = pages[page_ptr[v]:page_ptr[v] + used]
        node_runs, node_lengths = run_page[k:k + used], run_length[k:k + used]
        for u in range(used):
            node_runs[u] = node_pages[u] * page_size
            node_lengths[u] = page_size
        if used:
            node_lengths[used - 1] = tokens - (used - 1) * page_size
            for u in range(used):
                max_slot = max(max_slot, node_runs[u] + node_lengths[u] - 1)
        k += used
    same_runs, same_slots = 0, 0
    if short < 0 and outside < 0:
        shared = min(runs, len(last_page))
        pages_now, lengths_now = run_page[:shared], run_length[:shared]
        pages_then, lengths_then = last_page[:shared], last_length[:shared]
        for same_runs in range(shared + 1):
            if same_runs == shared or pages_now[same_runs] != pages_then[same_runs] \
                    or lengths_now[same_runs] != lengths_then[same_runs]:
                break
            same_slots += lengths_now[same_runs]
    return run_page, run_length, short, outside, max_slot, same_runs, same_slots


@compiled
def write_slots(run_page, run_length, same_runs, same_slots, slots):
    """``slots[f]``, the cache slot of flattened position f, for every position past the
    first ``same_slots`` (those of the first ``same_runs`` runs). int64 [tokens]"""
    f = same_slots
    for k in range(same_runs, len(run_page)):
        page, length = run_page[k], run_length[k]
        run = slots[f:f + length]
        for j in range(length):
            run[j] = page + j
        f += length
