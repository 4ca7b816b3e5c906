"""The GPU planner: a strategy's partitions as the int32 buffers the Triton kernels read.

`plan_arrays` encodes a `deft.plan.Plan` (the normative partitions, built on the host with
vectorised numpy) and a page table into flat int32 arrays, with no Python loop over tokens or
partitions. `PlanBuffers` owns fixed-capacity device tensors that `fill` refills in place (pinned
staging, non-blocking copies; what the buffers already hold from the last plan is neither
written nor copied again), so kernels captured in a CUDA graph keep reading the right
addresses after every re-plan. The fields (one int32 tensor each, views of one allocation, in
this order; every field starts on 16 bytes, and the fields before the slots' lie one pitch
apart, as do the two slot fields, so that a fill uploads the changes of each group as one
strided copy where few unchanged values come along):

====================  ==================  ====================================================
field                 size (capacity)     meaning
====================  ==================  ====================================================
counts                2                   partitions P, queries Q (read by the kernels)
query_rows            2 x queries         query n's partial rows are query_rows[2n]:[2n+1]
query_flat            queries             flattened position of each query's token
part_start            entries             first token of partition p in `token_slot`
part_tokens           entries             tokens of partition p
part_entry            entries + 1         entries of p are part_entry[p]:part_entry[p+1]
entry_query           entries             query (test layout) of each entry
entry_row             entries             partial-result row of each entry (see below)
token_slot            slots               cache slot (page * page_size + offset) of a token
subtree_end           slots (flat only)   flattened end of the subtree of a token's node, or
                                          REACHES_END where that is the tree's end
====================  ==================  ====================================================

An *entry* is one (partition, query) pair: one row of partial results per query head. Every
partition holds at least one query, so partitions never outnumber entries. A query's partial
rows are one contiguous run (its entries in partition order), so the reduction reads them in
the same order every time; query n's run starts at ``n * rows_per_query`` where every query's
rows fit in that many (`deft.plan_entries.row_starts`; a `deft.TreeAttention` passes its
``max_entries // max_queries``), else right after query n - 1's. Spaced so, a decode step's
rows are the last step's wherever its entries are (a long prompt's), and the planner rewrites
and uploads only the rest.

Token addressing (see `deft.kernels.partials`): KV-guided strategies and tree_attention_s index
`token_slot` and `subtree_end` by flattened position (``part_start`` = the partition's first
flattened position; their partitions are runs of the flattened tree); flash_decoding and radix
list each partition's slots one after the other.

A token whose subtree runs to the end of the flattened order (the root's, and every node's on
the last path of the preorder) is seen by every query after it, whatever the tree's size: its
``subtree_end`` is `deft.compiled_plan.REACHES_END`, not the tree's token count, so the
prompt's entries stay the same while a decode step grows the tree, and a plan rewrites and
uploads only what the step changed (the kernels' test ``F < subtree_end`` reads the same).
"""

from __future__ import annotations

import numpy as np
import torch

from deft.compiled_plan import REACHES_END
from deft.field_writes import write_fields
from deft.plan_entries import row_starts
from deft.tree import INDEX_LIMIT, Tree
from deft.plan import Plan
from deft.staged_upload import StagedUpload
from deft.strategies import DEFAULT_CHUNK_SIZE

FIELDS = (
    "counts",
    "query_rows",
    "query_flat",
    "part_start",
    "part_tokens",
    "part_entry",
    "entry_query",
    "entry_row",
    "token_slot",
    "subtree_end",
)
"""The plan buffers, in their order inside the one allocation: the slot fields (the largest
where a tree has many tokens) last."""

QUERY_FIELDS = {"query_rows", "query_flat"}
ENTRY_FIELDS = {"part_start", "part_tokens", "part_entry", "entry_query", "entry_row"}
SLOT_FIELDS = {"token_slot", "subtree_end"}
FIELD_INDEX = {name: i for i, name in enumerate(FIELDS)}
_QUERY_FLAT, _ENTRY_QUERY, _TOKEN_SLOT = (FIELD_INDEX[n] for n in ("query_flat", "entry_query",
                                                                 "token_slot"))


COALESCE = 65536
"""Unwritten int32 elements that one of `PlanBuffers.fill`'s copies may take along rather than
the fill issuing one more copy (a gap between two fields' written parts, or a rectangle's
cells outside them): 256 KiB, about what the copy engine moves in the 7 us of host time a
torch copy cost on an H200 host (`scripts/fill_probe.py`: at 16384, 2.2x the fill time on
fewshot_b20, 1.5x on spec_t256)."""

ALIGN = 4
"""Every field starts on a multiple of this many int32 elements (16 bytes), whatever the
capacities: the kernels' specialisation on their pointers' alignment does not depend on them."""


PATH_STRATEGIES = ("deft_node", "deft_node_chunk")
"""The strategies whose entries grow with the nodes on a query's path (`max_path_nodes`)."""


def default_max_entries(strategy: str, max_queries: int, max_tokens: int, chunk_size,
                        max_path_nodes: int) -> int:
    """Entries enough for every plan of a tree within the capacities (Q queries, T tokens, at
    most D nodes on a root-to-query path), with the chunk size C `plan` plans with (the
    strategy's default where it tunes: a tuned plan needing more falls back to the defaults).

    An entry is a (partition, query) pair, and a query takes part only in partitions holding
    tokens it sees. flash_decoding and radix cut each query's path, tree_attention_s and
    deft_flatten a run of at most T flattened tokens, into chunks: at most ``ceil(T / C)`` per
    query. deft_node gives a query one partition per node of its path: at most D. deft_node_chunk
    cuts each of those d nodes of s tokens separately: ``sum ceil(t / C) <= floor((s - d) / C)
    + d``, largest at ``d = D, s = T``.
    """
    chunk = chunk_size or DEFAULT_CHUNK_SIZE
    if strategy == "deft_node":
        per_query = max_path_nodes
    elif strategy == "deft_node_chunk":
        per_query = (max_tokens - max_path_nodes) // chunk + max_path_nodes
    else:
        per_query = -(-max_tokens // chunk)
    return int(max_queries * per_query)


class CapacityError(ValueError):
    """A plan that does not fit the buffers a `TreeAttention` was built with."""


class PageTable:
    """A page table as plain tensors (the planner's view of any paged cache).

    Parameters
    ----------
    page_ptr : int [nodes + 1]
        Node index v's pages are ``pages[page_ptr[v]:page_ptr[v + 1]]``, in token order.
    pages : int [sum over nodes of ceil(tokens / page_size)]
    page_size : int

    Anything with ``node_pages(tree) -> (page_ptr, pages)`` and ``page_size`` (or
    ``pool.page_size``, like `deft.cache.TreeCache`) can be planned over.
    """

    def __init__(self, page_ptr, pages, page_size: int):
        self.page_ptr = torch.as_tensor(page_ptr, dtype=torch.int32)
        self.pages = torch.as_tensor(pages, dtype=torch.int32)
        self.page_size = int(page_size)
        self._host = (_host(self.page_ptr), _host(self.pages))

    def node_pages(self, tree: Tree):
        """(page_ptr [nodes + 1], pages) in the tree's node-index order."""
        if len(self.page_ptr) != tree.num_nodes + 1:
            raise ValueError(
                f"the page table has {len(self.page_ptr) - 1} nodes, the tree {tree.num_nodes}"
            )
        return self.page_ptr, self.pages

    def host_node_pages(self, tree: Tree):
        """`node_pages` as int64 numpy arrays (what the planner reads; no device round trip)."""
        if len(self._host[0]) != tree.num_nodes + 1:
            self.node_pages(tree)  # raises
        return self._host


def host_node_pages(cache, tree: Tree):
    """A page table's ``(page_ptr [nodes + 1], pages)`` as int64 numpy arrays on the host.

    Uses the cache's ``host_node_pages`` where it has one (`PageTable`, `deft.cache.TreeCache`),
    else its ``node_pages`` (copied to the host if they live on a device).
    """
    if hasattr(cache, "host_node_pages"):
        return cache.host_node_pages(tree)
    page_ptr, pages = cache.node_pages(tree)
    return _host(page_ptr), _host(pages)


def cache_page_size(cache) -> int:
    """The page size of a page table or of a `deft.cache.TreeCache`."""
    size = getattr(cache, "page_size", None)
    return int(size if size is not None else cache.pool.page_size)


def paged_cache(tree: Tree, k: torch.Tensor, v: torch.Tensor, page_size: int = 1, seed=None):
    """A paged KV cache holding test-layout K and V, each node starting on a fresh page.

    Parameters
    ----------
    tree : Tree
    k, v : [tokens, kv_heads, head_dim]
        Test layout (tokens by node index, then position).
    page_size : int
    seed : int, optional
        Shuffle the pages with this seed (default: nodes' pages in node order).

    Returns
    -------
    k_cache, v_cache : [num_pages, page_size, kv_heads, head_dim]
        Unused slots (page padding) are zero.
    table : PageTable
    """
    if k.shape != v.shape or k.dim() != 3 or k.shape[0] != tree.num_tokens:
        raise ValueError(
            f"k and v must be [tokens={tree.num_tokens}, kv_heads, head_dim], got "
            f"{list(k.shape)} and {list(v.shape)}"
        )
    counts = -(-tree.tokens // page_size)
    page_ptr = np.concatenate([[0], np.cumsum(counts)])
    num_pages = int(page_ptr[-1])
    if seed is None:
        pages = np.arange(num_pages)
    else:
        pages = np.random.default_rng(seed).permutation(num_pages)
    table = PageTable(page_ptr, pages, page_size)
    slots = torch.from_numpy(token_slots(tree, page_ptr, pages, page_size)).to(k.device)
    shape = (num_pages, page_size, *k.shape[1:])
    k_cache = torch.zeros(shape, dtype=k.dtype, device=k.device)
    v_cache = torch.zeros(shape, dtype=v.dtype, device=v.device)
    k_cache.view(-1, *k.shape[1:])[slots] = k
    v_cache.view(-1, *v.shape[1:])[slots] = v
    return k_cache, v_cache, table


def token_slots(tree: Tree, page_ptr, pages, page_size: int) -> np.ndarray:
    """Cache slot of every test-layout token. int64 [tokens]"""
    page_ptr = _host(page_ptr)
    pages = _host(pages)
    if len(page_ptr) != tree.num_nodes + 1:
        raise ValueError(f"page_ptr must have nodes + 1 = {tree.num_nodes + 1} entries, "
                         f"got {len(page_ptr)}")
    short = np.flatnonzero(np.diff(page_ptr) * page_size < tree.tokens)
    if len(short):
        v = short[0]
        raise ValueError(
            f"node {tree.node_ids[v]} holds {tree.tokens[v]} tokens but the page table gives it "
            f"{page_ptr[v + 1] - page_ptr[v]} pages of {page_size}"
        )
    position = tree.token_position
    page = pages[page_ptr[tree.token_node] + position // page_size]
    return page * page_size + position % page_size


def plan_arrays(plan: Plan, page_ptr, pages, flat: bool, rows_per_query: int = 0) -> dict:
    """The plan buffers' contents (see the module docstring), as int64 numpy arrays.

    Parameters
    ----------
    plan : deft.plan.Plan
    page_ptr, pages : int, the page table (`PageTable`), in the tree's node-index order
    flat : bool
        Flattened-tree addressing (KV-guided kernels) or listed slots (query-guided).
    rows_per_query : int
        Where the queries' partial rows start (`deft.plan_entries.row_starts`; 0: one query's
        after another's).

    Returns
    -------
    dict of field name to array; plus ``"max_slot"``, the largest slot read (an int), and
    ``"slots"``, the cache slot of every test-layout token (`token_slots`).
    """
    tree = plan.tree
    slots = token_slots(tree, page_ptr, pages, plan.page_size)
    query_flat = tree.flat_offset[tree.query_node] + tree.query_position
    if flat:
        segment_flat = tree.flat_offset[plan.segment_node] + plan.segment_pos
        follows = segment_flat[1:] == segment_flat[:-1] + plan.segment_len[:-1]
        inner = np.ones(len(plan.segment_node), dtype=bool)
        inner[plan.segment_ptr[:-1]] = False  # a partition's first segment starts anywhere
        if not follows[inner[1:]].all():
            raise ValueError(f"{plan.strategy}: a partition is not one run of the flattened tree")
        order = tree.preorder
        last = order[tree.tout]  # the last node, in preorder, of each node's subtree
        node_end = tree.flat_offset[last] + tree.tokens[last]
        part_start = segment_flat[plan.segment_ptr[:-1]]
        token_slot = slots[tree.flat_tokens]
        subtree_end = np.repeat(node_end[order], tree.tokens[order])
        subtree_end[subtree_end == tree.num_tokens] = REACHES_END
    else:
        token_slot = slots[plan.segment_tokens()]
        part_start = np.cumsum(plan.tokens) - plan.tokens
        subtree_end = np.zeros(0, dtype=np.int64)
    per_query = np.bincount(plan.query_index, minlength=tree.num_queries)
    starts, _ = row_starts(per_query, rows_per_query)
    by_query = np.argsort(plan.query_index, kind="stable")  # rows, query by query
    entry_row = np.empty(len(plan.query_index), dtype=np.int64)
    entry_row[by_query] = np.arange(len(by_query)) - np.repeat(np.cumsum(per_query) - per_query,
                                                               per_query)
    entry_row += starts[plan.query_index]
    arrays = dict(
        counts=np.array([plan.num_partitions, tree.num_queries]),
        part_start=part_start,
        part_tokens=plan.tokens,
        part_entry=plan.query_ptr,
        entry_query=plan.query_index,
        entry_row=entry_row,
        query_rows=np.stack([starts, starts + per_query], axis=1).ravel(),
        query_flat=query_flat,
        token_slot=token_slot,
        subtree_end=subtree_end,
    )
    arrays["slots"] = slots
    arrays["max_slot"] = int(slots.max())
    if arrays["max_slot"] > INDEX_LIMIT:
        raise ValueError(f"cache slot {arrays['max_slot']} is beyond the int32 limit")
    return arrays


class PlanBuffers:
    """Fixed-capacity int32 plan buffers on a device, refilled in place by `fill`.

    Parameters
    ----------
    max_queries, max_entries, max_slots : int
        Capacities (see the module docstring for which field takes which).
    flat : bool
        Whether `subtree_end` is needed (flattened addressing).
    device : torch.device
    slot_name : str
        The constructor argument that sets max_slots (named by capacity errors).
    """

    def __init__(self, max_queries, max_entries, max_slots, flat, device, slot_name="max_tokens"):
        self.capacity = {}
        for name in FIELDS:
            if name == "counts":
                size = 2
            elif name in QUERY_FIELDS:
                size = max_queries * (1 + (name == "query_rows"))
            elif name in ENTRY_FIELDS:
                size = max_entries + (name == "part_entry")
            else:
                size = max_slots if (flat or name == "token_slot") else 1
            self.capacity[name] = size
        rows = [self.capacity[n] for n in FIELDS if n not in SLOT_FIELDS]
        pitch = {n: _aligned(max(rows) if n not in SLOT_FIELDS else self.capacity[n])
                 for n in FIELDS}  # what the fields lie apart: the slots' own size, the
        # others' largest size (their changes then one strided copy, `write_fields`)
        self._limits = dict(max_queries=max_queries, max_entries=max_entries)
        self._limits[slot_name] = max_slots
        self._sizes = (max_queries, max_entries, max_slots)  # the limits, in that order
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"plan buffers live on a CPU or CUDA device, not {self.device}")
        offsets = np.concatenate([[0], np.cumsum([pitch[n] for n in FIELDS])])
        self.offsets = [int(o) for o in offsets[:-1]]
        self.data = torch.zeros(int(offsets[-1]), dtype=torch.int32, device=self.device)
        self.views = {n: self.data[o: o + self.capacity[n]] for n, o in zip(FIELDS, self.offsets)}
        if self.device.type == "cuda":  # pinned staging, uploaded in a few copies
            self.stage_through(StagedUpload(self.data))
        else:  # the CPU: the buffers are host memory, filled directly
            self._upload = None
            self._staging_host = self.data.numpy()
        self._written = [None] * len(FIELDS)  # per field: the read-only array held, or None
        self._offsets = np.array(self.offsets, dtype=np.int64)
        self._capacities = np.array([self.capacity[n] for n in FIELDS], dtype=np.int64)

    def stage_through(self, upload) -> None:
        """Fill through ``upload``: a `deft.staged_upload.StagedUpload` of ``data`` (what a
        CUDA device's buffers use), or anything with its ``host`` mirror (numpy int32, as long
        as ``data``), ``wait()`` and ``upload(copies)``: probes of the upload, and the staged
        path tested on the CPU. The next fill writes every field."""
        self._upload, self._staging_host = upload, upload.host
        self._written = [None] * len(FIELDS)

    def fill(self, arrays: dict) -> None:
        """Copy a plan's arrays (`plan_arrays`) into the buffers; raise CapacityError if too big.

        The fields are written into the pinned staging area in one compiled call
        (`deft.field_writes.write_fields`), then copied to the device in as few non-blocking
        copies as the unwritten elements between their written parts allow (`COALESCE`: spans,
        and rectangles over fields one pitch apart; `deft.staged_upload`); on the CPU straight
        into the buffers. A read-only field the buffers already hold (the
        very array of the last fill: `deft.fast_plan` keeps arrays between steps) is not
        written again, and ``arrays["kept"]``, ``{field: (array, n)}``, says that a field's
        first n values are those of a read-only array of an earlier fill: where the buffers
        still hold that array, only the values past n are written.
        """
        fields = [arrays[name] for name in FIELDS]
        queries, entries, slots = len(fields[_QUERY_FLAT]), len(fields[_ENTRY_QUERY]), \
            len(fields[_TOKEN_SLOT])
        max_queries, max_entries, max_slots = self._sizes
        if queries > max_queries or entries > max_entries or slots > max_slots:
            for (name, limit), need in zip(self._limits.items(), (queries, entries, slots)):
                if need > limit:
                    raise CapacityError(
                        f"the plan needs {name} >= {need} but this TreeAttention was built "
                        f"with {name}={limit}: pass {name}={need} (or more)"
                    )
        if self._upload is not None:
            self._upload.wait()  # the previous plan's copies have left the staging area
        try:
            copies = self._write(fields, arrays.get("kept"))
        except BaseException:
            self._written = [None] * len(FIELDS)  # a field may be half written: all next time
            raise
        if self._upload is not None:
            self._upload.upload(copies)

    def _write(self, fields: list, kept_prefix) -> list:
        """Write the fields that changed into the staging area (or the CPU buffers); return
        the copies that upload them, ``[lo, width, height, pitch]`` in elements of the
        allocation (`deft.field_writes.write_fields`)."""
        written = self._written
        starts = [-1 if values is last else 0 for values, last in zip(fields, written)]
        if kept_prefix:  # a prefix is kept where the buffers hold the array it is of
            for name, (array, n) in kept_prefix.items():
                i = FIELD_INDEX[name]
                if not starts[i] and written[i] is array:
                    starts[i] = n
        self._written = [None if values.flags.writeable else values for values in fields]
        copies, too_long = write_fields(self._staging_host, self._offsets, self._capacities,
                                        tuple(starts), COALESCE, *fields)  # (a tuple: numba
        # takes one at 0.3 us, where making an array of the list took 0.9)
        if too_long >= 0:
            name = FIELDS[too_long]
            raise ValueError(f"the plan's {name} holds {len(fields[too_long])} values, more "
                             f"than its buffer's {self.capacity[name]}")
        return copies.tolist()

    def read(self, name: str) -> np.ndarray:
        """A field's contents on the host (a synchronising copy; for tests and debugging)."""
        return self.views[name].cpu().numpy().astype(np.int64)


def _aligned(n: int) -> int:
    """``n`` rounded up to a multiple of `ALIGN`."""
    return -(-n // ALIGN) * ALIGN


def _host(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.cpu().numpy()
    return np.asarray(x, dtype=np.int64)
