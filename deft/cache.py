"""Paged KV cache and the tree cache that maps decoding-tree nodes onto its pages.

`PagedKVCache` (`deft.page_pool`, also importable from here) owns the K and V pools
``[num_pages, page_size, kv_heads, head_dim]`` and a free list. `TreeCache` keeps, for every node id, the list of pages holding its tokens:

- every node starts on a fresh page, so a page never holds two nodes' tokens (docs/design.md, "Bytes");
- a node is *live* from `add_node` until `prune`; a pruned node keeps its pages while a live
  descendant needs them (its tokens are their prefix) and frees them with the last one;
- an operation that needs more pages than are free raises `OutOfPagesError` and changes nothing.

A whole run replays with ``for tree in run: new_slots = cache.apply(tree)``; planners read the
pages through `TreeCache.node_pages` and `TreeCache.token_slots`. An apply leaves the cache
holding just its tree's nodes: the next one works on that tree's arrays and page table, with
no per-node Python (`deft.cache_steps`), and the nodes' dicts are listed from them only when
something reads them::

    pool = PagedKVCache(num_pages=1024, page_size=16, kv_heads=8, head_dim=128)
    cache = TreeCache(pool)
    slots = cache.apply(tree)         # new tokens' slots, [new tokens]
    pool.write(slots, k_new, v_new)   # k_new, v_new [new tokens, kv_heads, head_dim]
"""

from __future__ import annotations

from functools import partial
from itertools import chain, compress, repeat

import numpy as np
import torch

from deft.cache_steps import HeldNodes, grow_step, moved, replace_step, short_of_pages, shrunk
from deft.page_pool import (CacheError, OutOfPagesError, PagedKVCache, PageListing,
                            applied_table, on_device, table_slots)
from deft.staged_upload import FreshUpload
from deft.tree import Tree

__all__ = ["CacheError", "OutOfPagesError", "PagedKVCache", "TreeCache", "pages_for"]


class TreeCache:
    """Decoding-tree nodes (by id) mapped onto the pages of a `PagedKVCache`.

    Parameters
    ----------
    pool : PagedKVCache
    """

    def __init__(self, pool: PagedKVCache):
        self.pool = pool
        self._dicts = HeldNodes()  # the nodes held, by id; None while the last apply's are
        self._tree = None  # the tree of the last apply(), while nothing else changed the cache
        self._table = None  # its page table (read-only arrays), with the tree
        self._taken_at = None  # with the tree: increasing in the order the cache took its nodes
        self._listing = PageListing()  # the planner's page table, from the last one's
        self._slots_to_device = FreshUpload(pool.device) if pool.device.type == "cuda" \
            else partial(on_device, device=pool.device)  # int64 host slots -> the pool's device

    @property
    def _nodes(self) -> HeldNodes:
        """The held nodes, listed from the last applied tree if an apply left them unlisted."""
        if self._dicts is None:
            self._dicts = HeldNodes.of(self._tree, *self._table, self._taken_at)
        return self._dicts

    # ------------------------------------------------------------------ queries
    def __contains__(self, node_id) -> bool:
        return node_id in self._nodes.parent

    def __len__(self) -> int:
        """Nodes held, live or kept for a live descendant."""
        return len(self._nodes.parent)

    def __iter__(self):
        """Ids of the nodes held."""
        return iter(list(self._nodes.parent))

    def is_live(self, node_id) -> bool:
        return node_id in self._nodes.live

    def tokens(self, node_id) -> int:
        return self._nodes.tokens[self._held(node_id)]

    def page_table(self, node_id) -> torch.Tensor:
        """Pages of a node, in token order. int32 [ceil(tokens / page_size)]"""
        pages = self._nodes.pages[self._held(node_id)]
        return torch.tensor(pages, dtype=torch.int32, device=self.pool.device)

    def slots(self, node_id, positions) -> torch.Tensor:
        """Slots of tokens of one node by position. positions [n] -> int64 [n]"""
        tokens = self._nodes.tokens[self._held(node_id)]
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= tokens):
            raise CacheError(f"node {node_id}: positions must lie in 0..{tokens - 1}")
        page_size = self.pool.page_size
        pages = np.asarray(self._nodes.pages[node_id], dtype=np.int64)
        slots = pages[positions // page_size] * page_size + positions % page_size
        return self._slots_to_device(slots)

    def tree(self) -> Tree:
        """The held nodes as a `Tree` (ids as given to the cache).

        Queries are those of the last `apply` tree while the cache has not changed since;
        otherwise the Tree default (one query per leaf).
        """
        if self._tree is not None:
            return self._tree
        nodes = self._nodes
        if not nodes.parent:
            raise CacheError("the cache holds no node")
        empty = [i for i, t in nodes.tokens.items() if t == 0]
        if empty:
            raise CacheError(f"node {empty[0]} holds no token yet: grow it before tree()")
        ids = list(nodes.parent)
        return Tree(ids, [nodes.parent[i] for i in ids], [nodes.tokens[i] for i in ids])

    # ------------------------------------------------------------------ planner views
    def node_pages(self, tree: Tree) -> tuple:
        """Pages of every node of ``tree``, CSR in the tree's node-index order.

        Returns
        -------
        page_ptr : int32 [nodes + 1]
            Node ``v``'s pages are ``pages[page_ptr[v]:page_ptr[v + 1]]``.
        pages : int32 [sum over nodes of ceil(tokens / page_size)]
        """
        page_ptr, pages = self._node_pages(tree)
        device = self.pool.device
        return (on_device(page_ptr.astype(np.int32), device),
                on_device(pages.astype(np.int32), device))

    def host_node_pages(self, tree: Tree) -> tuple:
        """`node_pages` as int64 numpy arrays on the host (what the planner reads: no round
        trip through the pool's device). Those of the last applied tree are the ones its apply
        built (read-only); another tree's take one pass of plain Python over its nodes."""
        if tree is self._tree:
            return self._table
        ids = tree.node_ids.tolist()
        nodes = self._nodes
        wanted = tree.tokens.tolist()
        held = [nodes.tokens.get(node, 0) for node in ids]
        if any(h < w for h, w in zip(held, wanted)):
            return self._node_pages(tree)  # raises CacheError naming the node
        counts = _ceil_div(tree.tokens, self.pool.page_size)
        page_ptr = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(counts, out=page_ptr[1:])
        lists = list(map(nodes.pages.__getitem__, ids))
        if held != wanted:  # nodes holding more tokens than the tree uses: their first pages
            lists = [pages[:c] for pages, c in zip(lists, counts.tolist())]
            return page_ptr, np.fromiter(chain.from_iterable(lists), dtype=np.int64,
                                         count=int(page_ptr[-1]))
        return page_ptr, self._listing(lists, counts.tolist(), int(page_ptr[-1]))

    def token_slots(self, tree: Tree) -> torch.Tensor:
        """Slot of every test-layout token of ``tree`` (by node index, then position).

        Returns int64 [tree.num_tokens]: ``page * page_size + offset``.
        """
        return self._slots_to_device(self.host_token_slots(tree))

    def host_token_slots(self, tree: Tree) -> np.ndarray:
        """`token_slots` as an int64 numpy array on the host (no round trip through the pool's
        device)."""
        page_ptr, pages = self._node_pages(tree)
        page_size = self.pool.page_size
        position = tree.token_position
        page = pages[page_ptr[tree.token_node] + position // page_size]
        return page * page_size + position % page_size

    # ------------------------------------------------------------------ changes
    def add_node(self, node_id, parent=None, tokens=0) -> None:
        """Add a live node under ``parent`` (a held node, or None for a root), holding ``tokens``."""
        nodes = self._nodes
        if node_id in nodes.parent:
            raise CacheError(f"node {node_id} is already in the cache")
        if parent is not None:
            self._held(parent)
        self._check_space(self._pages_for(tokens))
        nodes.parent[node_id] = parent
        nodes.children[node_id] = set()
        nodes.tokens[node_id] = 0
        nodes.pages[node_id] = []
        nodes.live.add(node_id)
        if parent is not None:
            nodes.children[parent].add(node_id)
        self._grow(node_id, tokens)
        self._tree = self._table = self._taken_at = None

    def grow(self, node_id, n) -> None:
        """Append ``n`` tokens to a live node, allocating pages as needed (all or none)."""
        nodes = self._nodes
        if node_id not in nodes.live:
            raise CacheError(f"node {node_id} is not a live node of the cache")
        if n < 0:
            raise CacheError(f"node {node_id}: cannot grow by {n} tokens")
        self._check_space(self._pages_for(nodes.tokens[node_id] + n) - len(nodes.pages[node_id]))
        self._grow(node_id, n)
        self._tree = self._table = self._taken_at = None

    def prune(self, node_id) -> None:
        """End a live node; its pages are freed once no live descendant needs them."""
        if node_id not in self._nodes.live:
            raise CacheError(f"node {node_id} is not a live node of the cache")
        self._nodes.live.discard(node_id)
        for pages in self._release([node_id]):
            self.pool.free(pages)
        self._tree = self._table = self._taken_at = None

    def write(self, node_id, positions, k, v) -> None:
        """Store K and V of tokens of one node. positions [n]; k, v [n, kv_heads, head_dim]"""
        self.pool.write(self.slots(node_id, positions), k, v)

    def apply(self, tree: Tree) -> torch.Tensor:
        """Sync the cache to a step's tree, matching nodes by id.

        Nodes of the cache missing from ``tree`` are pruned, new ones added, and every node grown
        to its token count in ``tree``. All or nothing: on an error (a node that changes parent
        or shrinks, too few pages) the cache is left as it was. The pages come and go as if
        the nodes were pruned one by one, then added and grown in preorder, in one free and one
        allocation of the pool.

        Returns
        -------
        slots : int64 [new tokens]
            Slots of the tokens the step added, by node index then position in ``tree``: write
            their K and V with ``pool.write(slots, k, v)``.
        """
        if self._tree is not None:  # the cache holds just its nodes: numpy over its arrays
            step = grow_step(self._tree, self._table, tree, self.pool)
            if step is None:
                self._table, self._taken_at, slots = replace_step(
                    self._tree, self._table, self._taken_at, tree, self.pool)
            else:
                self._table, slots = step
            self._tree, self._dicts = tree, None
            return self._slots_to_device(slots)
        # The general path (the cache changed since its last apply, or never applied): the
        # node dicts, node by node.
        ids, parent_index = tree.node_ids.tolist(), tree.parent.tolist()
        tokens, page_counts = tree.tokens.tolist(), _ceil_div(tree.tokens, self.pool.page_size)
        nodes = self._nodes
        held_parent, held_pages = nodes.parent, nodes.pages
        before = list(map(nodes.tokens.get, ids, repeat(0)))
        wanted = page_counts.tolist()  # pages to take per node: less those held below
        needed = int(page_counts.sum())
        for v in compress(range(len(ids)), map(held_parent.__contains__, ids)):
            node = ids[v]
            parent = None if parent_index[v] < 0 else ids[parent_index[v]]
            if held_parent[node] != parent:
                raise moved(node, parent, held_parent[node])
            if tokens[v] < before[v]:
                raise shrunk(node, tokens[v], before[v])
            held = len(held_pages[node])
            wanted[v] -= held
            needed -= held
        kept = set(ids)  # the dropped nodes in the order the cache took them (dict order),
        gone = [node for node in held_parent if node not in kept]  # whole subtrees
        freed = sum(map(len, map(held_pages.__getitem__, gone)))
        if needed > self.pool.num_free + freed:
            raise short_of_pages(needed, self.pool.num_free + freed, self.pool)
        # Revive held nodes of the tree first, so that no release below frees one of them.
        nodes.live.update(held_parent.keys() & ids)
        nodes.live.difference_update(gone)
        released = self._release(gone)
        if released:
            self.pool.free(chain.from_iterable(reversed(released)))
        taken = self._add_grown(tree.preorder.tolist(), ids, parent_index, tokens, wanted,
                                needed)
        self._tree = tree
        self._table = applied_table(page_counts, np.array(wanted, dtype=np.int64), taken,
                                    tree.preorder, tree.node_ids, held_pages)
        self._taken_at = np.empty(len(ids), dtype=np.int64)  # the held dict's order
        self._taken_at[np.searchsorted(tree.node_ids, np.fromiter(
            held_parent, dtype=np.int64, count=len(ids)))] = np.arange(len(ids))
        slots = table_slots(*self._table, tree.tokens, np.array(before, dtype=np.int64),
                            self.pool.page_size)
        return self._slots_to_device(slots)

    def _release(self, pruned) -> list:
        """Drop each pruned node without held children, then each ancestor it was keeping;
        return their page lists, in the order they are to be freed (the pool does not free
        them). ``pruned``: ids of pruned nodes (a node dropped on the way is skipped)."""
        nodes = self._nodes
        held_parent, children, held_pages = nodes.parent, nodes.children, nodes.pages
        tokens, live = nodes.tokens, nodes.live
        released = []
        for node in pruned:
            while node is not None and node in held_parent and node not in live \
                    and not children[node]:
                released.append(held_pages.pop(node))
                parent = held_parent.pop(node)
                del children[node], tokens[node]
                if parent is not None:
                    children[parent].discard(node)
                node = parent
        return released

    def _add_grown(self, order, ids, parent_index, tokens, wanted, needed) -> None:
        """Add the missing nodes (parents first: ``order`` is a preorder) and grow every node
        to its tokens, taking the ``needed`` pages in one allocation (space already checked),
        ``wanted[v]`` for node index v; return the pages taken, in the order they were handed
        out (node after node in ``order``)."""
        nodes = self._nodes
        held_parent, held_pages, children = nodes.parent, nodes.pages, nodes.children
        held_tokens, live = nodes.tokens, nodes.live
        pages = self.pool.allocate(needed)
        taken = 0
        for v in order:
            node, count = ids[v], wanted[v]
            if node not in held_parent:
                parent = None if parent_index[v] < 0 else ids[parent_index[v]]
                held_parent[node] = parent
                children[node] = set()
                held_pages[node] = pages[taken: taken + count]
                live.add(node)
                if parent is not None:
                    children[parent].add(node)
                taken += count
            elif count:
                held_pages[node] += pages[taken: taken + count]
                taken += count
            held_tokens[node] = tokens[v]
        return pages

    # ------------------------------------------------------------------ invariants
    def check(self) -> None:
        """Raise AssertionError unless the cache is consistent.

        No page is leaked (free + owned == all) or owned twice; every node holds exactly the
        pages its tokens need; every held node is live or has a held child; parent and children
        links agree.
        """
        nodes = self._nodes
        owned = [p for pages in nodes.pages.values() for p in pages]
        free = self.pool.free_pages()
        if len(set(owned)) != len(owned):
            raise AssertionError("a page is owned by two nodes")
        if set(owned) & set(free) or len(set(free)) != len(free):
            raise AssertionError("a page is both owned and free, or free twice")
        if len(owned) + len(free) != self.pool.num_pages:
            raise AssertionError(
                f"{self.pool.num_pages - len(owned) - len(free)} pages leaked "
                f"({len(owned)} owned, {len(free)} free of {self.pool.num_pages})"
            )
        if not (self.pool._is_free[free].all() and not self.pool._is_free[owned].any()):
            raise AssertionError("the pool's free marks disagree with its free list")
        for node, parent in nodes.parent.items():
            if len(nodes.pages[node]) != self._pages_for(nodes.tokens[node]):
                raise AssertionError(
                    f"node {node}: {nodes.tokens[node]} tokens on {len(nodes.pages[node])} "
                    "pages"
                )
            if node not in nodes.live and not nodes.children[node]:
                raise AssertionError(f"node {node} is pruned but still holds pages")
            if parent is not None and node not in nodes.children.get(parent, ()):
                raise AssertionError(f"node {node}: missing from its parent {parent}'s children")
            if any(nodes.parent.get(c, object()) != node for c in nodes.children[node]):
                raise AssertionError(f"node {node}: a child does not name it as parent")
        if not nodes.live <= set(nodes.parent):
            raise AssertionError("a live node is not held")

    # ------------------------------------------------------------------ internals
    def _held(self, node_id):
        if node_id not in self._nodes.parent:
            raise CacheError(f"node {node_id} is not in the cache")
        return node_id

    def _pages_for(self, tokens: int) -> int:
        return _ceil_div(tokens, self.pool.page_size)

    def _check_space(self, pages: int) -> None:
        if pages > self.pool.num_free:
            raise OutOfPagesError(
                f"needs {pages} more pages but only {self.pool.num_free} of "
                f"{self.pool.num_pages} are free (pages of {self.pool.page_size} tokens)"
            )

    def _grow(self, node_id, n) -> None:
        nodes = self._nodes
        tokens = nodes.tokens[node_id] + n
        pages = nodes.pages[node_id]
        pages += self.pool.allocate(self._pages_for(tokens) - len(pages))
        nodes.tokens[node_id] = tokens

    def _node_pages(self, tree: Tree) -> tuple:
        """int64 numpy ``(page_ptr [nodes + 1], pages)`` of the tree's nodes."""
        if tree is self._tree:
            return self._table
        nodes = self._nodes
        counts = _ceil_div(tree.tokens, self.pool.page_size)
        page_ptr = np.concatenate([[0], np.cumsum(counts)])
        pages = np.empty(page_ptr[-1], dtype=np.int64)
        for v, node in enumerate(tree.node_ids.tolist()):
            if node not in nodes.parent or nodes.tokens[node] < tree.tokens[v]:
                raise CacheError(
                    f"node {node}: the tree holds {tree.tokens[v]} tokens, the cache "
                    f"{nodes.tokens.get(node, 0)}; apply the tree first"
                )
            pages[page_ptr[v]:page_ptr[v + 1]] = nodes.pages[node][: counts[v]]
        return page_ptr, pages


def pages_for(tree: Tree, page_size: int) -> int:
    """Pages a tree needs: each node starts on a fresh page. sum over nodes of ceil(tokens / page_size)"""
    return int(_ceil_div(tree.tokens, page_size).sum())


def _ceil_div(a, b):
    return -(-a // b)
