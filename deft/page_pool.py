"""The paged KV pool: K and V pages and their free list (`PagedKVCache`), the errors of the
paged caches, `PageListing`, nodes' page lists laid end to end step after step, and
`applied_table`, a page table from what an apply took, and `table_slots`, the slots of the
tokens a step adds, read from a page table.
`deft.cache.TreeCache` maps decoding-tree nodes onto the pool's pages."""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch

from deft.compiled_plan import compiled


class OutOfPagesError(RuntimeError):
    """The pool has fewer free pages than an operation needs; nothing was allocated."""


class CacheError(ValueError):
    """A request the tree cache cannot satisfy: unknown or duplicate node, shrinking node, ..."""


class PagedKVCache:
    """K and V page pools and their free list.

    Parameters
    ----------
    num_pages, page_size, kv_heads, head_dim : int
        Pool shape: ``k`` and ``v`` are ``[num_pages, page_size, kv_heads, head_dim]``.
    dtype : torch.dtype
    device : str or torch.device

    A token's *slot* is ``page * page_size + offset``: its row in ``k.view(-1, kv_heads,
    head_dim)``.
    """

    def __init__(self, num_pages, page_size, kv_heads, head_dim, dtype=torch.float16,
                 device="cpu"):
        for name, value in dict(num_pages=num_pages, page_size=page_size, kv_heads=kv_heads,
                                head_dim=head_dim).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        shape = (num_pages, page_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_pages, self.page_size = num_pages, page_size
        self.kv_heads, self.head_dim = kv_heads, head_dim
        # the free list, a stack: _stack[:_top], its last the next page handed out (page 0
        # first); numpy, so that a step's pages come and go in a few calls, not per page
        self._stack = np.arange(num_pages - 1, -1, -1, dtype=np.int64)
        self._top = num_pages
        self._is_free = np.ones(num_pages, dtype=bool)

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def num_free(self) -> int:
        return self._top

    def free_pages(self) -> list:
        """Ids of the free pages (a copy of the free list, the next handed out last)."""
        return self._stack[:self._top].tolist()

    def allocate(self, n: int) -> list:
        """Take ``n`` free pages; raise OutOfPagesError (taking none) when fewer are free."""
        return self.take(n).tolist()

    def take(self, n: int) -> np.ndarray:
        """`allocate` as an int64 array [n] (the page ids in the order handed out)."""
        if n < 0:
            raise ValueError(f"cannot take {n} pages")
        if n > self._top:
            raise OutOfPagesError(
                f"needs {n} pages but only {self._top} of {self.num_pages} are free "
                f"(pages of {self.page_size} tokens)"
            )
        pages = self._stack[self._top - n: self._top][::-1].copy()  # as popped one by one
        self._top -= n
        self._is_free[pages] = False
        return pages

    def free(self, pages) -> None:
        """Give pages back to the free list (ids, or an int64 array), the first handed out
        first again; freeing a free page is an error."""
        index = pages if isinstance(pages, np.ndarray) else np.fromiter(pages, dtype=np.int64)
        if self._is_free[index].any():
            raise CacheError(f"double free among pages {index.tolist()}")
        self._is_free[index] = True
        if np.count_nonzero(self._is_free) != self._top + len(index):  # one twice
            self._is_free[index] = False
            raise CacheError(f"double free among pages {index.tolist()}")
        self._stack[self._top: self._top + len(index)] = index[::-1]
        self._top += len(index)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store tokens' K and V at their slots.

        slots : int64 [n]; k, v : [n, kv_heads, head_dim] (cast to the pool's dtype).
        """
        shape = (len(slots), self.kv_heads, self.head_dim)
        for name, x in (("k", k), ("v", v)):
            if tuple(x.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
            if x.device != self.device:
                raise ValueError(f"{name} is on {x.device}, the pool on {self.device}")
        slots = torch.as_tensor(slots, dtype=torch.int64, device=self.device)
        self.k.view(-1, self.kv_heads, self.head_dim)[slots] = k.to(self.k.dtype)
        self.v.view(-1, self.kv_heads, self.head_dim)[slots] = v.to(self.v.dtype)

    def gather(self, slots: torch.Tensor) -> tuple:
        """K and V of tokens by slot: two ``[n, kv_heads, head_dim]`` tensors (copies)."""
        slots = torch.as_tensor(slots, dtype=torch.int64, device=self.device)
        return (self.k.view(-1, self.kv_heads, self.head_dim)[slots],
                self.v.view(-1, self.kv_heads, self.head_dim)[slots])


class PageListing:
    """Nodes' page lists laid end to end (a page table's ``pages``), from the last listing.

    A node's page list only ever grows, so the nodes leading this listing and the last one
    with the same list of the same length, and the next node's old pages, give the last
    array as a prefix: a decode step lists again only the pages from the first node it grew.
    """

    def __init__(self):
        self._last = None  # (page lists, their lengths, pages) of the last listing

    def __call__(self, lists: list, lengths: list, total: int) -> np.ndarray:
        """The pages of ``lists`` (lists of page ids, of ``lengths``) one after the other.
        int64 [total], read-only"""
        kept, rest = 0, lists
        if self._last is not None:
            last_lists, last_lengths, last_pages = self._last
            for k, (pages, last) in enumerate(zip(lists, last_lists)):
                if pages is not last:
                    rest = lists[k:]
                    break
                kept += last_lengths[k]
                if len(pages) != last_lengths[k]:
                    rest = [pages[last_lengths[k]:], *lists[k + 1:]]
                    break
            else:
                rest = lists[len(last_lists):]
        pages = np.empty(total, dtype=np.int64)
        if kept:
            pages[:kept] = last_pages[:kept]
        pages[kept:] = np.fromiter(chain.from_iterable(rest), dtype=np.int64, count=total - kept)
        pages.flags.writeable = False
        self._last = (lists, lengths, pages)
        return pages


def applied_table(page_counts, wanted, taken: list, preorder, node_ids, page_lists: dict,
                  last=None) -> tuple:
    """The read-only page table ``(page_ptr [nodes + 1], pages)`` of a tree whose nodes each
    hold their pages from before (the first ``page_counts - wanted`` of their page lists) and
    then their share of one allocation, ``taken``, handed out node after node in preorder
    (``wanted`` [nodes] to each): a few numpy calls over the pages taken and a loop over the
    nodes held before only (a speculative step renames every candidate: one node held).

    page_counts, wanted, preorder, node_ids : int64 [nodes]; page_lists : node id -> pages.
    last : (node_ids, page_ptr, pages), optional
        The page table of the tree the nodes held before come from, every one of them in it
        with the pages it holds: their pages are copied from it (a 63k-token prompt's 4k pages
        would otherwise be converted from its list every step).
    """
    page_ptr = np.zeros(len(page_counts) + 1, dtype=np.int64)
    np.add.accumulate(page_counts, out=page_ptr[1:])
    if last is not None and len(last[1]) == len(page_ptr) and (last[1] == page_ptr).all():
        page_ptr = last[1]  # the last one, read-only: a planner keeps what it fixes
    pages = np.empty(int(page_ptr[-1]), dtype=np.int64)
    held = page_counts - wanted  # pages each node held before
    if taken:
        handed = wanted[preorder]
        # allocation element j of preorder node v goes to page_ptr[v] + held[v] + its rank
        shift = (page_ptr[:-1] + held)[preorder] - (handed.cumsum() - handed)
        pages[np.arange(len(taken)) + shift.repeat(handed)] = taken
    nodes = held.nonzero()[0]
    if last is None:
        for v, node, count in zip(nodes.tolist(), node_ids[nodes].tolist(),
                                  held[nodes].tolist()):
            pages[page_ptr[v]: page_ptr[v] + count] = page_lists[node][:count]
    else:
        last_ids, last_ptr, last_pages = last
        where = last_ptr[np.searchsorted(last_ids, node_ids[nodes])].tolist()
        for v, u, count in zip(nodes.tolist(), where, held[nodes].tolist()):
            pages[page_ptr[v]: page_ptr[v] + count] = last_pages[u: u + count]
    page_ptr.flags.writeable = False
    pages.flags.writeable = False
    return page_ptr, pages


@compiled
def table_slots(page_ptr, pages, tokens, start, page_size):
    """Slots of the tokens past ``start`` of every node, by node index then position, read
    from a page table (``page_ptr`` [nodes + 1], ``pages``) in one compiled pass.
    tokens, start : int64 [nodes]; returns int64 [new tokens]"""
    total = 0
    for v in range(len(tokens)):
        total += max(tokens[v] - start[v], 0)
    slots = np.empty(total, np.int64)
    k = 0
    for v in range(len(tokens)):
        for position in range(start[v], tokens[v]):
            slots[k] = pages[page_ptr[v] + position // page_size] * page_size \
                + position % page_size
            k += 1
    return slots


def on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on ``device``. On a GPU through pinned memory and a
    non-blocking copy: a copy from pageable memory first waits for all the work queued on the
    stream, so a step's cache update would stall the host behind the GPU."""
    tensor = torch.from_numpy(array)
    if device.type == "cpu":  # already there (``to`` would return it, after a few us)
        return tensor
    if device.type == "cuda" and tensor.numel():
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
