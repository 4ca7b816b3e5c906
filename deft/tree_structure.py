"""The views of a tree that its parents alone fix (preorder, Euler-tour intervals, depth),
shared by every `deft.tree.Tree` with the same parents.

A decoding run's steps mostly keep their shape (a decode step grows the leaves by a token), so
`structure_of` keeps the structures of the parent arrays seen lately: a step's tree then gets
its preorder without walking it again. The arrays are read-only, since trees share them.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

KEPT_SHAPES = 64
"""Parent arrays whose structure `structure_of` keeps (least recently used dropped first)."""

_kept: dict = {}


def structure_of(parent: np.ndarray) -> "Structure":
    """The structure of a forest given by its parent node indices (int64 [nodes], -1: root)."""
    key = parent.tobytes()
    found = _kept.pop(key, None)
    if found is None:
        found = Structure(parent)
        if len(_kept) >= KEPT_SHAPES:
            del _kept[next(iter(_kept))]
    _kept[key] = found  # most recent last
    return found


def is_known(parent: np.ndarray) -> bool:
    """Whether `structure_of` keeps this parent array (already checked to be a forest)."""
    return parent.tobytes() in _kept


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class Structure:
    """Views of a forest computed once, iteratively (a chain 100k nodes deep works).

    Parameters
    ----------
    parent : int64 [nodes]
        Parent node index of each node, -1 for a root; the forest must be acyclic.

    The attributes are `deft.tree.Tree`'s views of the same name (see there).
    """

    def __init__(self, parent: np.ndarray):
        self.parent = _frozen(np.array(parent, dtype=np.int64))
        self.num_nodes = len(parent)

    @cached_property
    def roots(self) -> np.ndarray:
        return _frozen(np.flatnonzero(self.parent < 0))

    @cached_property
    def child_count(self) -> np.ndarray:
        has_parent = self.parent >= 0
        return _frozen(np.bincount(self.parent[has_parent], minlength=self.num_nodes))

    @cached_property
    def child_ptr(self) -> np.ndarray:
        return _frozen(np.concatenate([[0], np.cumsum(self.child_count)]))

    @cached_property
    def child_index(self) -> np.ndarray:
        children = np.flatnonzero(self.parent >= 0)
        return _frozen(children[np.argsort(self.parent[children], kind="stable")])

    @cached_property
    def preorder(self) -> np.ndarray:
        order = np.empty(self.num_nodes, dtype=np.int64)
        stack = list(self.roots[::-1])
        k = 0
        ptr, index = self.child_ptr, self.child_index
        while stack:
            v = stack.pop()
            order[k] = v
            k += 1
            stack.extend(index[ptr[v] : ptr[v + 1]][::-1].tolist())
        return _frozen(order)

    @cached_property
    def tin(self) -> np.ndarray:
        tin = np.empty(self.num_nodes, dtype=np.int64)
        tin[self.preorder] = np.arange(self.num_nodes)
        return _frozen(tin)

    @cached_property
    def subtree_size(self) -> np.ndarray:
        size = [1] * self.num_nodes
        parent = self.parent.tolist()
        for v in self.preorder[::-1].tolist():
            p = parent[v]
            if p >= 0:
                size[p] += size[v]
        return _frozen(np.array(size, dtype=np.int64))

    @cached_property
    def tout(self) -> np.ndarray:
        return _frozen(self.tin + self.subtree_size - 1)

    @cached_property
    def depth(self) -> np.ndarray:
        depth = [0] * self.num_nodes
        parent = self.parent.tolist()
        for v in self.preorder.tolist():
            p = parent[v]
            if p >= 0:
                depth[v] = depth[p] + 1
        return _frozen(np.array(depth, dtype=np.int64))

    @cached_property
    def tree_of(self) -> np.ndarray:
        tree = [0] * self.num_nodes
        root_rank = np.full(self.num_nodes, -1, dtype=np.int64)
        root_rank[self.roots] = np.arange(len(self.roots))
        parent, rank = self.parent.tolist(), root_rank.tolist()
        for v in self.preorder.tolist():
            p = parent[v]
            tree[v] = rank[v] if p < 0 else tree[p]
        return _frozen(np.array(tree, dtype=np.int64))
