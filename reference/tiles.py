"""How a partition's program loads its KV block by block, and how the reference batches them.

A partition's program (one per partition and KV head) loads its queries once, then loops over
its tokens in KV blocks, keeping a running softmax on chip (`reference.partials`). Each
partition's token sequence is cut into blocks of `BLOCK_TOKENS` from its start; one *load* is
one partition reading one block. Q-guided strategies load the same block from many partitions
(a shared prefix, once per query): the reference gathers each distinct block once, with the
query rows of every partition that loads it stacked, computes each row's partial over it, and
counts every load's bytes as the kernel moves them (docs/design.md, "Bytes"). Strategies that
compute a partition in one piece get whole partitions as tiles (`partition_batches`).

Tiles of similar shape are batched (`shape_batches`): gathered, padded and computed together.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch

from deft.tree import Tree
from deft.plan import Plan, _cut, _segment_sum, _Sequences, ranges

BLOCK_TOKENS = 256
"""Tokens per KV block (rounded up to a multiple of the page size)."""

TILE_ELEMENTS = 2**21
"""Budget of one batch: elements of its K tile, of its score tile and of its output rows.

Small enough that the allocator reuses its temporaries (fresh pages cost more than the math)."""

INDEX_BYTES = 4
"""One page-table entry (int32)."""

MASK_WORD_BITS = 64
"""Queries per word of a bit mask; a word is 8 bytes."""


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for every narrower float (docs/design.md, "Numerics")."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@dataclass
class Loads:
    """Partitions reading KV blocks: one entry per (partition, block), all int64 [L] / bool [L].

    Attributes
    ----------
    partition : the partition reading the block
    tokens : tokens read (the block's length)
    pages : page-table entries read (distinct pages of the block, less a page the partition's
        previous block already read)
    rows : query rows of the partition, q(p)
    first : whether this is the partition's first block (where its program loads Q)
    """

    partition: np.ndarray
    tokens: np.ndarray
    pages: np.ndarray
    rows: np.ndarray
    first: np.ndarray

    def take(self, index: np.ndarray) -> Loads:
        """The loads at `index`."""
        return Loads(**{field.name: getattr(self, field.name)[index] for field in fields(self)})


@dataclass
class Tiles:
    """A batch of B distinct KV blocks, each with the query rows of every partition reading it.

    Attributes
    ----------
    slot, query, row_valid : int64 [B, Rm], int64 [B, Rm], bool [B, Rm]
        Each row's partition row (position in ``plan.query_index``), its query, and which
        rows are real (index 0 fills the padding).
    token, token_valid : int64 [B, Tm], bool [B, Tm]
        Test-layout token indices of each block, and which are real.
    loads : Loads
        The (partition, block) loads of this batch, for the traffic count.
    """

    slot: np.ndarray
    query: np.ndarray
    row_valid: np.ndarray
    token: np.ndarray
    token_valid: np.ndarray
    loads: Loads


class KVBlocks:
    """A plan's partitions as loads of distinct KV blocks.

    Each partition's token sequence (its segments in order) is cut into blocks of
    `BLOCK_TOKENS` at multiples of `BLOCK_TOKENS` from its start (the plan's own cutter), so
    partitions that begin alike (a shared prefix) cut it into the same blocks.

    Parameters
    ----------
    plan : Plan

    Attributes
    ----------
    piece_ptr, piece_start, piece_length : int64 [blocks + 1], [pieces], [pieces]
        Block b is the token runs ``piece_start[i] : piece_start[i] + piece_length[i]`` (test
        layout) for i in ``piece_ptr[b]:piece_ptr[b+1]``.
    length : int64 [blocks]
        Tokens of each block.
    loads : Loads
        Every (partition, block) load, ordered by block; ``load_ptr`` [blocks + 1] delimits them.
    row_ptr, row_slot : int64 [blocks + 1], int64 [rows]
        Rows reading block b are ``row_slot[row_ptr[b]:row_ptr[b+1]]`` (partition rows).
    """

    def __init__(self, plan: Plan):
        tree = plan.tree
        self.plan = plan
        sequences = _Sequences(plan.segment_ptr, plan.segment_node, plan.segment_pos, plan.segment_len)
        cut = _cut(sequences, BLOCK_TOKENS)  # sequence k: the k-th load, of partition cut.source[k]
        partition = cut.source
        count = np.diff(cut.ptr)
        start = tree.token_offset[cut.node] + cut.pos
        first = np.ones(len(partition), dtype=bool)
        first[1:] = partition[1:] != partition[:-1]
        pages = self._new_pages(cut, first, plan.page_size)
        # a block is named by its pieces: loads with the same pieces read the same tokens
        names = np.full((len(count), count.max()), -1, dtype=np.int64)
        names[np.arange(count.max()) < count[:, None]] = start * (BLOCK_TOKENS + 1) + cut.length
        _, representative, block = np.unique(names, axis=0, return_index=True, return_inverse=True)
        block = block.ravel()
        tokens = _segment_sum(cut.length, cut.ptr)
        by_block = np.argsort(block, kind="stable")
        self.loads = Loads(partition, tokens, pages, plan.queries[partition], first).take(by_block)
        self.load_ptr = np.searchsorted(block[by_block], np.arange(len(representative) + 1))
        self.length = tokens[representative]
        pieces = ranges(cut.ptr[representative], count[representative])
        self.piece_ptr = np.concatenate([[0], np.cumsum(count[representative])])
        self.piece_start = start[pieces]
        self.piece_length = cut.length[pieces]
        rows = self.loads.rows
        self.row_slot = ranges(plan.query_ptr[self.loads.partition], rows)
        self.row_ptr = np.concatenate([[0], np.cumsum(_segment_sum(rows, self.load_ptr))])

    @staticmethod
    def _new_pages(cut, first: np.ndarray, page_size: int) -> np.ndarray:
        """Page-table entries each load reads: its distinct pages, but the one it shares with
        the partition's previous load (a page cut by the block boundary) only once. [loads]"""
        first_page = cut.pos // page_size
        last_page = (cut.pos + cut.length - 1) // page_size
        pages = _segment_sum(last_page - first_page + 1, cut.ptr)
        head, tail = cut.ptr[1:-1], cut.ptr[1:-1] - 1  # first piece of load k, last of load k-1
        shared = (cut.node[head] == cut.node[tail]) & (first_page[head] == last_page[tail])
        pages[1:] -= shared & ~first[1:]
        return pages

    def batches(self) -> Iterator[Tiles]:
        """Every block once, with its rows, in batches of similar shape (`shape_batches`)."""
        rows = np.diff(self.row_ptr)
        for blocks in shape_batches(rows, self.length, self.plan.tree.attention):
            rows_of = rows[blocks]
            slot = self.row_slot[ranges(self.row_ptr[blocks], rows_of)]
            slot, row_valid = _padded(slot, rows_of)
            pieces = ranges(self.piece_ptr[blocks], np.diff(self.piece_ptr)[blocks])
            tokens = ranges(self.piece_start[pieces], self.piece_length[pieces])
            token, token_valid = _padded(tokens, self.length[blocks])
            per_block = np.diff(self.load_ptr)[blocks]
            loads = self.loads.take(ranges(self.load_ptr[blocks], per_block))
            yield Tiles(slot, self.plan.query_index[slot], row_valid, token, token_valid, loads)


def shape_batches(rows: np.ndarray, tokens: np.ndarray, attention):
    """Cut items of `rows` query rows and `tokens` tokens (both [n]) into batches of similar shape.

    Items whose counts round up to the same powers of two go together (padding at most doubles
    a tile), as many as keep the batch's K tile, score tile and output rows within
    `TILE_ELEMENTS` elements each (at least one). Yields item indices [B], each item once.
    """
    row_bucket = np.ceil(np.log2(rows)).astype(np.int64)
    token_bucket = np.ceil(np.log2(tokens)).astype(np.int64)
    order = np.lexsort((np.arange(len(rows)), token_bucket, row_bucket))
    key = row_bucket[order] * 64 + token_bucket[order]
    for members in np.split(order, np.flatnonzero(np.diff(key)) + 1):
        row_cap = 2 ** int(row_bucket[members[0]])
        token_cap = 2 ** int(token_bucket[members[0]])
        per_item = max(
            token_cap * attention.kv_heads * attention.head_dim,  # K tile
            row_cap * attention.q_heads * token_cap,  # score tile
            row_cap * attention.q_heads * attention.head_dim,  # output rows
        )
        step = max(1, TILE_ELEMENTS // per_item)
        for lo in range(0, len(members), step):
            yield members[lo : lo + step]


def partition_batches(plan: Plan) -> Iterator[Tiles]:
    """Whole partitions as tiles (one load each, all its tokens), batched by `shape_batches`.

    For the strategies that compute a partition in one piece (the materialised score matrix).
    """
    segments = np.diff(plan.segment_ptr)
    for partition in shape_batches(plan.queries, plan.tokens, plan.tree.attention):
        rows = plan.queries[partition]
        slot, row_valid = _padded(ranges(plan.query_ptr[partition], rows), rows)
        tokens = plan.segment_tokens(ranges(plan.segment_ptr[partition], segments[partition]))
        token, token_valid = _padded(tokens, plan.tokens[partition])
        first = np.ones(len(partition), dtype=bool)
        loads = Loads(partition, plan.tokens[partition], plan.pages[partition], rows, first)
        yield Tiles(slot, plan.query_index[slot], row_valid, token, token_valid, loads)


def _padded(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lay `values`, runs of `counts`, into the rows of a zero-padded matrix: (matrix, valid)."""
    valid = np.arange(counts.max()) < counts[:, None]
    matrix = np.zeros(valid.shape, dtype=np.int64)
    matrix[valid] = values
    return matrix, valid


def load_queries(tiles: Tiles, q: torch.Tensor, kv_heads: int, traffic) -> torch.Tensor:
    """Gather the rows' queries, GQA heads of one KV head packed into its rows.

    q [queries, q_heads, head_dim] -> [B, kv_heads, Rm * group, head_dim], tile row
    = row * group + g for query head kv_head * group + g. A partition's program loads its
    queries once, with its first block: that is when they are counted.
    """
    batch, slots = tiles.query.shape
    _, q_heads, head_dim = q.shape
    group = q_heads // kv_heads
    first = tiles.loads.rows[tiles.loads.first].sum()
    traffic.add("q_bytes", first * q_heads * head_dim * traffic.element_bytes)
    q_tile = q[torch.from_numpy(tiles.query)].to(compute_dtype(q))
    q_tile = q_tile.view(batch, slots, kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
    return q_tile.reshape(batch, kv_heads, slots * group, head_dim)


def tile_rows(tiles: Tiles, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Tile rows back to partition rows: [B, kv_heads, Rm * group, X] -> [R, q_heads, X].

    Returns the real rows (block by block) and their partition rows (slots) [R].
    """
    batch, kv_heads, packed, width = x.shape
    slots = tiles.slot.shape[1]
    group = packed // slots
    x = x.view(batch, kv_heads, slots, group, width).permute(0, 2, 1, 3, 4)
    x = x.reshape(batch, slots, kv_heads * group, width)
    return x[torch.from_numpy(tiles.row_valid)], tiles.slot[tiles.row_valid]


def _count_kv(loads: Loads, kv_heads: int, head_dim: int, traffic) -> None:
    """K and V bytes of every load of the batch (each partition reads its block)."""
    traffic.add("kv_bytes", loads.tokens.sum() * 2 * kv_heads * head_dim * traffic.element_bytes)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, T, kv_heads, head_dim] -> [B, kv_heads, T, head_dim]."""
    return x.permute(0, 2, 1, 3)


class ContiguousKV:
    """K and V read token by token from the test layout (no page table, no index bytes).

    Parameters
    ----------
    k, v : [tokens, kv_heads, head_dim]
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k = k.to(compute_dtype(k))
        self.v = v.to(compute_dtype(v))

    def load(self, tiles: Tiles, traffic) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V tiles of the batch: each [B, kv_heads, Tm, head_dim]."""
        _count_kv(tiles.loads, *self.k.shape[1:], traffic)
        token = torch.from_numpy(tiles.token)
        return _heads_first(self.k[token]), _heads_first(self.v[token])


class PagedKV:
    """K and V in a paged cache, read through each partition's page table.

    Every node starts on a fresh page, so node u's token at position a lives in page
    ``first_page[u] + a // page_size``, slot ``a % page_size``. A program reads one int32
    page-table entry per distinct page of its tokens (per KV-head program), then the tokens.

    Parameters
    ----------
    tree : Tree
    k, v : [tokens, kv_heads, head_dim]
        Test layout; copied into caches [num_pages, page_size, kv_heads, head_dim].
    page_size : int
    """

    def __init__(self, tree: Tree, k: torch.Tensor, v: torch.Tensor, page_size: int):
        self.tree = tree
        self.page_size = page_size
        node_pages = -(-tree.tokens // page_size)
        self.first_page = np.cumsum(node_pages) - node_pages
        page, slot = self._address(np.arange(tree.num_tokens))
        shape = (int(node_pages.sum()), page_size, *k.shape[1:])
        self.k_cache = torch.zeros(shape, dtype=compute_dtype(k))
        self.v_cache = torch.zeros(shape, dtype=compute_dtype(v))
        self.k_cache[page, slot] = k.to(self.k_cache.dtype)
        self.v_cache[page, slot] = v.to(self.v_cache.dtype)

    def _address(self, token: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Page and slot of test-layout tokens (any shape)."""
        position = self.tree.token_position[token]
        page = self.first_page[self.tree.token_node[token]] + position // self.page_size
        return torch.from_numpy(page), torch.from_numpy(position % self.page_size)

    def load(self, tiles: Tiles, traffic) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V tiles of the batch: each [B, kv_heads, Tm, head_dim]."""
        kv_heads, head_dim = self.k_cache.shape[2:]
        traffic.add("index_bytes", tiles.loads.pages.sum() * kv_heads * INDEX_BYTES)
        _count_kv(tiles.loads, kv_heads, head_dim, traffic)
        page, slot = self._address(tiles.token)
        return _heads_first(self.k_cache[page, slot]), _heads_first(self.v_cache[page, slot])


def causal_mask(tree: Tree, tiles: Tiles, traffic) -> np.ndarray:
    """Visibility by position arithmetic only, no bytes: bool [B, Rm, Tm].

    Valid where a partition holds only tokens on its queries' paths (Q-guided chunks of a
    path, DeFT node chunks): the one thing to mask is the tail of the query's own node.
    """
    same_node = tree.token_node[tiles.token][:, None, :] == tree.query_node[tiles.query][:, :, None]
    ahead = tree.token_position[tiles.token][:, None, :] > tree.query_position[tiles.query][:, :, None]
    return ~(same_node & ahead)


def bit_mask(tree: Tree, tiles: Tiles, traffic) -> np.ndarray:
    """Tree visibility read from a bit mask: one 64-bit word per token and 64 queries.

    Each load reads ``tokens x ceil(q(p) / 64) x 8`` bytes, so a partition reads
    ``t(p) x ceil(q(p) / 64) x 8``. Returns bool [B, Rm, Tm].
    """
    words = -(-tiles.loads.rows // MASK_WORD_BITS)
    traffic.add("mask_bytes", (tiles.loads.tokens * words * 8).sum())
    return tree.visible(tiles.query[:, :, None], tiles.token[:, None, :])


def dense_mask(tree: Tree, tiles: Tiles, traffic) -> np.ndarray:
    """Tree visibility read from a dense byte mask: ``q(p) x t(p)`` bytes. bool [B, Rm, Tm]."""
    traffic.add("mask_bytes", (tiles.loads.tokens * tiles.loads.rows).sum())
    return tree.visible(tiles.query[:, :, None], tiles.token[:, None, :])


def load_tiles(plan: Plan, batches: Iterator[Tiles], q: torch.Tensor, kv, mask, traffic):
    """Load every batch of tiles, counting what each load touches.

    Parameters
    ----------
    plan : Plan
    batches : iterator of Tiles
        `KVBlocks.batches` or `partition_batches`.
    q : [queries, q_heads, head_dim]
    kv : ContiguousKV or PagedKV
    mask : callable
        ``mask(tree, tiles, traffic) -> bool [B, Rm, Tm]``: `causal_mask`, `bit_mask` or
        `dense_mask`.
    traffic : reference.partials.Traffic

    Yields
    ------
    tiles : Tiles
    q_tile : [B, kv_heads, Rm * group, head_dim]
    k_tile, v_tile : [B, kv_heads, Tm, head_dim]
    visible : bool [B, 1, Rm * group, Tm]
        Visibility of each tile row, padding masked out. Partitions started and their work
        (visible pairs) are recorded in `traffic`.
    """
    tree = plan.tree
    kv_heads = tree.attention.kv_heads
    slot_partition = np.repeat(np.arange(plan.num_partitions), plan.queries)
    for tiles in batches:
        q_tile = load_queries(tiles, q, kv_heads, traffic)
        k_tile, v_tile = kv.load(tiles, traffic)
        visible = mask(tree, tiles, traffic)
        visible &= tiles.row_valid[:, :, None] & tiles.token_valid[:, None, :]
        traffic.add_work(tiles.loads.first.sum(), slot_partition[tiles.slot], visible.sum(axis=2))
        rows = torch.from_numpy(visible).repeat_interleave(tree.attention.group_ratio, dim=1)
        yield tiles, q_tile, k_tile, v_tile, rows[:, None]
