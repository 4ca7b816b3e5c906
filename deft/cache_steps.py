"""`deft.cache.TreeCache.apply` on a cache that holds just the last applied tree's nodes, in
numpy and compiled loops (`grown_pages`, `freed_pages`, `hand_out`) over that tree's arrays and page
table: no per-node Python.

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

from deft.compiled_plan import compiled
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
    wanted, needed = grown_pages(tokens, before, pool.page_size)
    if needed < 0 or needed > pool.num_free:  # a node shrinks, or too few pages
        return None
    if needed:  # else every node keeps its pages: the last tree's page table is this one's
        table = _grown_table(*table, wanted, pool.take(needed), tree.preorder)
    return table, table_slots(*table, tokens, before, pool.page_size)


def replace_step(last: Tree, table: tuple, taken_at: np.ndarray, tree: Tree,
                 pool: PagedKVCache):
    """`apply` of any ``tree`` after ``last`` (page table ``table``): last's nodes missing
    from ``tree`` dropped, the others grown, the new ones added.

    ``taken_at`` (int64 [last nodes]) orders last's nodes as the cache took them (its node
    dict's order): the general path releases the dropped nodes walking them in that order,
    and this frees their pages in the order that walk does (`freed_pages`). Raises CacheError
    (a kept node that changes parent or shrinks) or OutOfPagesError as the general path does,
    changing nothing. Returns ``(table, taken_at, slots)``: ``taken_at`` of tree's nodes, the
    kept ones in their order, then the new ones in preorder.
    """
    ids, last_ids = tree.node_ids, last.node_ids
    last_ptr, last_pages = table
    where = np.searchsorted(last_ids, ids)
    kept = np.flatnonzero(last_ids.take(where, mode="clip") == ids)  # node indices, ascending
    held = where[kept]  # the same nodes' indices in last
    page_size = pool.page_size
    page_counts = (tree.tokens + (page_size - 1)) // page_size
    page_ptr = np.zeros(tree.num_nodes + 1, dtype=np.int64)
    np.cumsum(page_counts, out=page_ptr[1:])
    if len(last_ptr) == len(page_ptr) and (last_ptr == page_ptr).all():
        page_ptr = last_ptr  # the last one, read-only: a planner keeps what it fixes
    pages = np.empty(int(page_ptr[-1]), dtype=np.int64)
    wanted = page_counts.copy()  # pages to take per node: less those held before
    before = np.zeros(tree.num_nodes, dtype=np.int64)  # tokens held before
    new_taken_at = tree.tin + (int(taken_at.max()) + 1)  # the new nodes after the kept ones
    held_pages = _take_kept(tree, last, table, kept.tolist(), held.tolist(), page_ptr, pages,
                            wanted, before, new_taken_at, taken_at)
    needed, freed = int(wanted.sum()), int(last_ptr[-1]) - held_pages
    if needed > pool.num_free + freed:
        raise short_of_pages(needed, pool.num_free + freed, pool)
    released = freed_pages(last.tin, last.tout, last.child_count, taken_at, held, last_ptr,
                           last_pages)
    if len(released):
        pool.free(released)
    if needed:
        hand_out(pages, page_ptr, page_counts - wanted, wanted, tree.preorder,
                 pool.take(needed))
    page_ptr.flags.writeable = False
    pages.flags.writeable = False
    table = page_ptr, pages
    return table, new_taken_at, table_slots(*table, tree.tokens, before, page_size)


def moved(node, parent, held_parent) -> CacheError:
    """The error of a step whose tree gives a held node another parent."""
    return CacheError(f"node {node}: parent is {parent} in the tree but {held_parent} in the "
                      "cache")


def shrunk(node, tokens, held) -> CacheError:
    """The error of a step whose tree holds fewer of a node's tokens than the cache."""
    return CacheError(f"node {node}: the tree holds {tokens} tokens, fewer than the {held} "
                      "cached; a cache never drops a node's tokens")


def short_of_pages(needed: int, free: int, pool: PagedKVCache) -> OutOfPagesError:
    """The error of a step needing more pages than the pool has free (its frees counted)."""
    return OutOfPagesError(f"the step needs {needed} more pages but only {free} of "
                           f"{pool.num_pages} are free (pages of {pool.page_size} tokens)")


def _take_kept(tree: Tree, last: Tree, last_table, kept, held, page_ptr, pages, wanted, before,
               taken_at, last_taken_at) -> int:
    """Check the nodes of both trees (node indices ``kept`` in ``tree``, ``held`` in ``last``)
    one by one as the general path does, raising its CacheError for the first that changes
    parent or holds fewer tokens, and carry each over: its pages from the last page table into
    ``pages`` (at ``page_ptr``), less its pages from ``wanted``, its tokens into ``before``,
    its ``taken_at``. Returns the pages they hold. (Plain Python: a speculative step keeps one
    node.)"""
    ids, parent, tokens = tree.node_ids, tree.parent, tree.tokens
    last_ids, last_parent, last_tokens = last.node_ids, last.parent, last.tokens
    last_ptr, last_pages = last_table
    held_pages = 0
    for v, u in zip(kept, held):
        now, was = parent[v], last_parent[u]
        now, was = (None if now < 0 else int(ids[now])), (None if was < 0 else int(last_ids[was]))
        if now != was:
            raise moved(int(ids[v]), now, was)
        if tokens[v] < last_tokens[u]:
            raise shrunk(int(ids[v]), int(tokens[v]), int(last_tokens[u]))
        start, end, first = int(last_ptr[u]), int(last_ptr[u + 1]), int(page_ptr[v])
        pages[first: first + end - start] = last_pages[start:end]
        wanted[v] -= end - start
        held_pages += end - start
        before[v] = last_tokens[u]
        taken_at[v] = last_taken_at[u]
    return held_pages


@compiled
def grown_pages(tokens, before, page_size):
    """Pages each node needs past those it held with ``before`` tokens, int64 [nodes], and
    their sum; the sum is -1 where a node holds fewer tokens than before.
    tokens, before : int64 [nodes]"""
    wanted = np.empty(len(tokens), np.int64)
    needed = 0
    for v in range(len(tokens)):
        if tokens[v] < before[v]:
            return wanted, -1
        wanted[v] = (tokens[v] + page_size - 1) // page_size \
            - (before[v] + page_size - 1) // page_size
        needed += wanted[v]
    return wanted, needed


@compiled
def freed_pages(tin, tout, child_count, taken_at, kept, page_ptr, pages):
    """The pages of the nodes dropped from a tree, as the general path frees them: walking
    the dropped nodes in the order the cache took them, it releases a leaf when walked, then
    each ancestor whose last child it was (deepest first: last in preorder), so a node goes
    with the last walked leaf below it; the pool is given the released nodes' pages last
    released first, each node's in page order.

    tin, tout, child_count : int64 [nodes] (preorder entry and last descendant's positions)
    taken_at : int64 [nodes], increasing in the order the cache took the nodes
    kept : int64 [k], indices of the nodes not dropped (the dropped are whole subtrees)
    page_ptr : int64 [nodes + 1]; pages : int64 [pages] (the tree's page table)
    Returns int64 [the dropped nodes' pages]."""
    is_kept = np.zeros(len(tin), np.bool_)
    for v in kept:
        is_kept[v] = True
    walk = np.argsort(taken_at)
    dropped = walk[~is_kept[walk]]
    walked = np.full(len(tin) + 1, -1, np.int64)  # by preorder position: a leaf's walk
    for j in range(len(dropped)):
        if child_count[dropped[j]] == 0:
            walked[tin[dropped[j]]] = j
    key = np.empty(len(dropped), np.int64)  # the walk releasing it, deepest last
    total = 0
    for j in range(len(dropped)):
        v = dropped[j]
        released_by = -1
        for position in range(tin[v], tout[v] + 1):
            released_by = max(released_by, walked[position])
        key[j] = released_by * len(tin) - tin[v]
        total += page_ptr[v + 1] - page_ptr[v]
    order = np.argsort(key)
    freed = np.empty(total, np.int64)
    k = 0
    for j in range(len(dropped) - 1, -1, -1):
        v = dropped[order[j]]
        for page in range(page_ptr[v], page_ptr[v + 1]):
            freed[k] = pages[page]
            k += 1
    return freed


@compiled
def hand_out(pages, page_ptr, held, wanted, preorder, taken):
    """Write the ``taken`` pages into a page table's ``pages`` node after node in
    ``preorder``, ``wanted[v]`` to node v past the ``held[v]`` it holds (its pages from
    ``page_ptr[v]``). int64 throughout; ``taken`` [sum of wanted]."""
    k = 0
    for v in preorder:
        first = page_ptr[v] + held[v]
        for j in range(wanted[v]):
            pages[first + j] = taken[k]
            k += 1


def _grown_table(page_ptr, pages, wanted, taken, preorder) -> tuple:
    """The page table after node ``v`` takes ``wanted[v]`` more pages, from ``taken`` (int64)
    node after node in ``preorder``. Read-only int64."""
    held = page_ptr[1:] - page_ptr[:-1]
    grown_ptr = np.zeros_like(page_ptr)
    np.cumsum(held + wanted, out=grown_ptr[1:])
    grown = np.empty(int(grown_ptr[-1]), dtype=np.int64)
    grown[np.arange(len(pages)) + np.repeat(grown_ptr[:-1] - page_ptr[:-1], held)] = pages
    hand_out(grown, grown_ptr, held, wanted, preorder, taken)
    grown_ptr.flags.writeable = False
    grown.flags.writeable = False
    return grown_ptr, grown
