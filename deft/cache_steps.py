"""`deft.cache.TreeCache.apply` on a cache that holds just the last applied tree's nodes, in
numpy over that tree's arrays and page table: no per-node Python.

After an apply the cache holds exactly the applied tree's nodes, all live, each holding its
tokens, their pages listed by the tree's page table. The next step's tree then either grows
those nodes (`grow_step`, a decode step) or keeps some of them, drops the others and adds new
ones (`replace_step`, a speculative step renames every candidate). Both hand pages out and take
them back as `TreeCache.apply`'s general path does: the dropped nodes freed in the order the
node-by-node release frees them, the new pages taken in one allocation, node after node in
preorder. Both check everything before changing anything and return the step's page table,
``(page_ptr [nodes + 1], pages)`` read-only int64, and the new tokens' slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from deft.page_pool import CacheError, OutOfPagesError, PagedKVCache, table_slots
from deft.tree import Tree


@dataclass
class HeldNodes:
    """The nodes a `deft.cache.TreeCache` holds, by id: its parent (None for a root), held
    children, tokens and pages, and the ids of the live ones."""

    parent: dict = field(default_factory=dict)
    children: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    pages: dict = field(default_factory=dict)
    live: set = field(default_factory=set)

    @classmethod
    def of(cls, tree: Tree, page_ptr, pages, taken_at) -> HeldNodes:
        """The nodes of an applied tree, all live, with their pages in its page table
        ``(page_ptr [nodes + 1], pages)``, listed in the order the cache took them
        (``taken_at``, int64 [nodes]: increasing with it)."""
        index = np.argsort(taken_at)
        ids, parent = tree.node_ids[index].tolist(), tree.parent[index]
        parents = [None if p < 0 else p
                   for p in np.where(parent < 0, -1, tree.node_ids[parent]).tolist()]
        children = {node: set() for node in ids}
        for node, p in zip(ids, parents):
            if p is not None:
                children[p].add(node)
        listed = pages.tolist()
        page_lists = [listed[start:end] for start, end in zip(page_ptr[index].tolist(),
                                                               page_ptr[index + 1].tolist())]
        return cls(dict(zip(ids, parents)), children, dict(zip(ids, tree.tokens[index].tolist())),
                   dict(zip(ids, page_lists)), set(ids))


def grow_step(last: Tree, table: tuple, tree: Tree, pool: PagedKVCache):
    """`apply` of ``tree`` after ``last`` (page table ``table``) when ``tree`` has last's nodes
    and parents, each holding as many tokens or more: the grown nodes' new pages taken in one
    allocation in preorder. Returns ``(table, slots)``, or None (nothing changed) for any
    other tree or one needing more pages than are free."""
    if last.num_nodes != tree.num_nodes or (
            last.node_ids is not tree.node_ids
            and last.node_ids.tobytes() != tree.node_ids.tobytes()) or (
            last.parent is not tree.parent and last.parent.tobytes() != tree.parent.tobytes()):
        return None
    tokens, before = tree.tokens, last.tokens
    if (tokens < before).any():
        return None
    page_size = pool.page_size
    wanted = _ceil_div(tokens, page_size) - _ceil_div(before, page_size)
    needed = int(wanted.sum())
    if needed > pool.num_free:
        return None
    if needed:  # else every node keeps its pages: the last tree's page table is this one's
        table = _grown_table(*table, wanted, pool.allocate(needed), tree.tin)
    return table, table_slots(*table, tokens, before, page_size)


def replace_step(last: Tree, table: tuple, taken_at: np.ndarray, tree: Tree,
                 pool: PagedKVCache):
    """`apply` of any ``tree`` after ``last`` (page table ``table``): last's nodes missing
    from ``tree`` dropped, the others grown, the new ones added.

    ``taken_at`` (int64 [last nodes]) orders last's nodes as the cache took them (its node
    dict's order): the general path releases the dropped nodes walking a set of their ids built
    in that order, and this frees their pages in the order that walk would. Raises CacheError
    (a kept node that changes parent or shrinks) or OutOfPagesError as the general path does,
    changing nothing. Returns ``(table, taken_at, slots)``: ``taken_at`` of tree's nodes, the
    kept ones in their order, then the new ones in preorder.
    """
    ids, last_ids = tree.node_ids, last.node_ids
    last_ptr, last_pages = table
    where = np.searchsorted(last_ids, ids)
    kept = np.flatnonzero(last_ids.take(where, mode="clip") == ids)  # node indices, ascending
    held = where[kept]  # the same nodes' indices in last
    held_tokens = last.tokens[held]
    _check_kept(tree, kept, held, held_tokens, last)
    page_size = pool.page_size
    page_counts = (tree.tokens + (page_size - 1)) // page_size
    held_pages = (held_tokens + (page_size - 1)) // page_size
    wanted = page_counts.copy()  # pages to take per node: less those held before
    wanted[kept] -= held_pages
    needed, freed = int(wanted.sum()), int(last_ptr[-1]) - int(held_pages.sum())
    if needed > pool.num_free + freed:
        raise OutOfPagesError(
            f"the step needs {needed} more pages but only {pool.num_free + freed} of "
            f"{pool.num_pages} are free (pages of {page_size} tokens)")
    # the general path's set of the dropped ids: the held ids' set less the kept ones
    in_order = last_ids[np.argsort(taken_at)].tolist()
    gone = set(dict.fromkeys(in_order)).difference(ids[kept].tolist())
    if gone:
        dropped = np.searchsorted(last_ids, np.fromiter(gone, dtype=np.int64, count=len(gone)))
        pool.free(_segments(last_ptr, last_pages, _release_order(last, dropped)[::-1]))
    taken = pool.allocate(needed)
    table = _replaced_table(page_counts, wanted, taken, tree.preorder, kept, held, held_pages,
                            table)
    before = np.zeros(tree.num_nodes, dtype=np.int64)
    before[kept] = held_tokens
    new_taken_at = tree.tin + (int(taken_at.max()) + 1)  # the new nodes after the kept ones
    new_taken_at[kept] = taken_at[held]
    return table, new_taken_at, table_slots(*table, tree.tokens, before, page_size)


def _check_kept(tree: Tree, kept, held, held_tokens, last: Tree) -> None:
    """Raise the general path's CacheError for the first node of both trees (node indices
    ``kept`` in ``tree``, ``held`` in ``last``) that changes parent or holds fewer tokens."""
    in_last = np.full(tree.num_nodes + 1, -2, dtype=np.int64)  # -2: new; -1: a root's parent
    in_last[-1] = -1
    in_last[kept] = held
    moved = in_last[tree.parent[kept]] != last.parent[held]
    bad = moved | (tree.tokens[kept] < held_tokens)
    if not bad.any():
        return
    k = int(np.argmax(bad))
    node = int(tree.node_ids[kept[k]])
    if moved[k]:
        now, was = ((None if p < 0 else int(t.node_ids[p]))
                    for t, p in ((tree, tree.parent[kept[k]]), (last, last.parent[held[k]])))
        raise CacheError(f"node {node}: parent is {now} in the tree but {was} in the cache")
    raise CacheError(
        f"node {node}: the tree holds {int(tree.tokens[kept[k]])} tokens, fewer than the "
        f"{int(held_tokens[k])} cached; a cache never drops a node's tokens")


def _release_order(tree: Tree, dropped: np.ndarray) -> np.ndarray:
    """Node indices of ``dropped`` in the order the general path releases them walking them
    in this order: a leaf when walked, then each ancestor whose last child it was (deepest
    first: last in preorder), so a node goes with the last walked leaf below it.
    ``dropped``: int64 [k], whole subtrees of ``tree`` (a union of them); returns int64 [k],
    the same nodes."""
    tin, leaf = tree.tin[dropped], tree.child_count[dropped] == 0
    walked = np.full(tree.num_nodes + 1, -1, dtype=np.int64)  # by preorder position, past one
    walked[tin[leaf]] = np.flatnonzero(leaf)  # a leaf's place in the walk
    bounds = np.empty(2 * len(dropped), dtype=np.int64)
    bounds[0::2] = tin
    bounds[1::2] = tree.tout[dropped] + 1
    released_by = np.maximum.reduceat(walked, bounds)[0::2]  # the walk that releases it
    return dropped[np.argsort(released_by * tree.num_nodes - tin)]  # deepest: last in preorder


def _segments(page_ptr, pages, nodes) -> np.ndarray:
    """The pages of ``nodes`` one node after the other. int64 [their pages]"""
    start = page_ptr[nodes]
    count = page_ptr[nodes + 1] - start
    total = int(count.sum())
    if total == len(nodes):  # a page each
        return pages[start]
    return pages[np.arange(total) + np.repeat(start - (np.cumsum(count) - count), count)]


def _replaced_table(page_counts, wanted, taken: list, preorder, kept, held, held_pages,
                    last_table) -> tuple:
    """The page table of a tree whose nodes ``kept`` hold their ``held_pages`` first pages of
    nodes ``held`` in the last page table, then ``wanted`` more each (every node of the tree:
    int64 [nodes]), from ``taken`` node after node in ``preorder``. Its ``page_ptr`` is the
    last one where equal (a planner keeps what it fixes). Read-only int64."""
    last_ptr, last_pages = last_table
    page_ptr = np.zeros(len(page_counts) + 1, dtype=np.int64)
    np.cumsum(page_counts, out=page_ptr[1:])
    if len(last_ptr) == len(page_ptr) and (last_ptr == page_ptr).all():
        page_ptr = last_ptr
    pages = np.empty(int(page_ptr[-1]), dtype=np.int64)
    if taken:
        first = (page_ptr[:-1] + (page_counts - wanted))[preorder]
        _hand_out(pages, first, wanted[preorder], taken)
    for v, u, count in zip(page_ptr[kept].tolist(), last_ptr[held].tolist(),
                           held_pages.tolist()):  # a speculative step keeps one node
        pages[v: v + count] = last_pages[u: u + count]
    page_ptr.flags.writeable = False
    pages.flags.writeable = False
    return page_ptr, pages


def _grown_table(page_ptr, pages, wanted, taken: list, tin) -> tuple:
    """The page table after node ``v`` takes ``wanted[v]`` more pages, from ``taken`` node
    after node in preorder (``tin``: each node's preorder position). Read-only int64."""
    held = page_ptr[1:] - page_ptr[:-1]
    grown_ptr = np.zeros_like(page_ptr)
    np.cumsum(held + wanted, out=grown_ptr[1:])
    grown = np.empty(int(grown_ptr[-1]), dtype=np.int64)
    grown[np.arange(len(pages)) + np.repeat(grown_ptr[:-1] - page_ptr[:-1], held)] = pages
    needing = np.flatnonzero(wanted)
    needing = needing[np.argsort(tin[needing])]
    _hand_out(grown, grown_ptr[needing] + held[needing], wanted[needing], taken)
    grown_ptr.flags.writeable = False
    grown.flags.writeable = False
    return grown_ptr, grown


def _hand_out(pages, first, handed, taken: list) -> None:
    """Write the ``taken`` pages into ``pages``, ``handed[k]`` of them from ``first[k]`` on
    for k after k (int64 [k])."""
    if len(taken) == np.count_nonzero(handed):  # one page each, or none
        pages[first[handed > 0]] = taken
    else:
        pages[np.arange(len(taken)) + np.repeat(first - (np.cumsum(handed) - handed),
                                                handed)] = taken


def _ceil_div(a, b):
    return -(-a // b)
