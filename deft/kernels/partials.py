"""The split-KV attention kernel behind every GPU strategy: partial results of partitions.

A plan (`deft.plan_buffers`) cuts one attention call into *partitions*: a set of queries and a run of
KV tokens. For each (partition, query) *entry* this kernel writes a partial result, the fp32 pair

    o   = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m)     [entries, q_heads, head_dim]
    lse = m + log sum_j exp(s_j - m)                       [entries, q_heads]

over the partition's tokens j that the query sees (s = sm_scale q.k); `deft.kernels.reduction`
merges each query's entries. A partition's queries are in ascending order, so entry
``part_entry[p] + i`` is the i-th query of partition p; its partial row is ``entry_row[e]``
(rows grouped by query for the reduction).

Work items are (partition, kv_head) pairs; a persistent grid (sized by the plan's capacity, never
by the plan, so a CUDA graph outlives a re-plan) strides over them and stops at the item count
it reads from device memory. The query heads of one KV head are packed into the rows of the
query tile (row = query slot x GROUP + head in group, padded to BLOCK_M), so each K/V tile is
read once per KV head for all those heads; a partition with more queries than a tile holds loops
over query tiles (its K/V is then re-read from L2, not HBM). Inside, the usual online softmax in
fp32 over BLOCK_N-token tiles, with both matmuls on tensor cores (`tl.dot`, fp32 accumulate).

K and V are read through the cache slot of every token (``slot = page * page_size + offset``,
64-bit element offsets), so any page size and any page order work. The slot gather makes the
K/V loads indirect: Triton's software pipeliner then keeps the next tile's K/V copies in flight
during the current tile's math only from num_stages=5 up (with fewer stages it issues them after
the math and waits at once: one memory latency per tile), so the tile tables use 5 stages.
Measured on an H200 (scripts/gpu_check.py), 7 or 9 stages are no faster: one tile iteration
costs about 1 us per SM whatever the depth, so larger work per iteration is what pays.
With ``TileConfig.prefetch`` the slots come one iteration ahead (loop-carried), which lets 3
stages do what 5 did; with ``lean`` the tile body runs fewer instructions (docs/performance.md:
together 2-5% faster on five of the six anchors, H200; the head-dim-128 default of deft_flatten).

Token addressing, chosen by the constexpr FLAT:
- FLAT (KV-guided: deft_node, deft_node_chunk, deft_flatten; and tree_attention_s): a partition's
  tokens are one run ``[start, start + tokens)`` of the flattened tree (DFS preorder, nodes
  whole), which every partition of these strategies is. Visibility needs no stored mask: per
  flattened position f the plan holds ``subtree_end[f]``, the flattened position just past the
  subtree of f's node, and per query its own flattened position F. Token f is visible to the
  query iff ``f <= F < subtree_end[f]``. This is the Euler-tour test tin[u] <= tin[v] <= tout[u]
  (the query's node v lies in the subtree of the token's node u) with the causal offset inside v,
  stated on token positions: a subtree is one contiguous run of the flattened order, and a
  query on position j of v sees exactly the tokens of u's run before or at F when u == v. Cost:
  one int32 per token and one per query, instead of ceil(queries / 64) x 8 bytes per token.
- list (query-guided: flash_decoding, radix): a partition is one query and a chunk of its path;
  the plan lists the chunk's slots, all visible.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from deft.kernels.launch import Launcher

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters of `_partials_kernel`.

    block_m : query rows per tile (queries x packed heads), a power of two >= 16.
    block_n : KV tokens per tile, a power of two >= 16.
    num_warps, num_stages : Triton launch options (num_stages pipelines the KV-tile loop).
    programs_per_sm : persistent programs per streaming multiprocessor.
    prefetch : load the next tile's cache slots one iteration ahead (loop-carried), so the
        K/V gather of a tile does not wait on a slot load of the same iteration.
    lean : fewer instructions per tile: 32-bit K/V row offsets (where both caches hold
        < 2**31 elements) shared by K and V where their strides agree, and the softmax scale
        folded into the exponent's FMA.
    max_registers : registers per thread the compiler may use (0: its own choice, about 250
        at head dim 128). At 128, four programs of 4 warps fit an SM where the registers
        otherwise allow two: more warps per scheduler to hide the tile loop's latency.
    """

    block_m: int = 64
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 5
    programs_per_sm: int = 2
    prefetch: bool = False
    lean: bool = False
    max_registers: int = 0

    def for_group(self, group: int) -> "TileConfig":
        """This config with block_m raised to hold at least one query's packed heads."""
        return dataclasses.replace(self, block_m=max(self.block_m, 16,
                                                     triton.next_power_of_2(group)))


def pick_config(configs: dict, head_dim: int, group: int) -> TileConfig:
    """The config of the smallest head-dim key >= head_dim (else the largest), fit to the group."""
    fits = [d for d in sorted(configs) if d >= head_dim]
    return configs[fits[0] if fits else max(configs)].for_group(group)


@triton.jit
def _partials_kernel(
    q_ptr, k_ptr, v_ptr, o_part_ptr, lse_part_ptr,
    counts_ptr, part_start_ptr, part_tokens_ptr, part_entry_ptr, entry_query_ptr, entry_row_ptr,
    query_flat_ptr, token_slot_ptr, subtree_end_ptr,
    stride_qn, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    qk_scale,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FLAT: tl.constexpr, DOT_PRECISION: tl.constexpr, PREFETCH: tl.constexpr = False,
    LEAN: tl.constexpr = False, NARROW: tl.constexpr = False,
    SAME_KV_STRIDE: tl.constexpr = False,
):
    QUERIES_PER_TILE: tl.constexpr = BLOCK_M // GROUP
    Q_HEADS: tl.constexpr = KV_HEADS * GROUP
    rows = tl.arange(0, BLOCK_M)
    row_slot = rows // GROUP  # which query of the tile a row holds
    row_head = rows % GROUP  # which head of the KV head's group
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    num_items = tl.load(counts_ptr) * KV_HEADS
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        part = item // KV_HEADS
        kv_head = item % KV_HEADS
        heads = kv_head * GROUP + row_head
        token_start = tl.load(part_start_ptr + part)
        num_tokens = tl.load(part_tokens_ptr + part)
        entry_lo = tl.load(part_entry_ptr + part)
        entry_hi = tl.load(part_entry_ptr + part + 1)
        # Columns past the partition read its first token (a real one, so K and V loads need
        # no mask and stay finite) and are masked out of the scores.
        first_slot = tl.load(token_slot_ptr + token_start)
        k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
        v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
        for entry0 in range(entry_lo, entry_hi, QUERIES_PER_TILE):
            entry = entry0 + row_slot
            row_ok = (row_slot < QUERIES_PER_TILE) & (entry < entry_hi)
            query = tl.load(entry_query_ptr + entry, mask=row_ok, other=0)
            q_rows = query.to(tl.int64) * stride_qn + heads * stride_qh
            q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0)
            if FLAT:
                query_flat = tl.load(query_flat_ptr + query, mask=row_ok, other=-1)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            if PREFETCH:
                slot_next = tl.load(token_slot_ptr + token_start + cols, mask=cols < num_tokens,
                                    other=first_slot)
            for n0 in range(0, num_tokens, BLOCK_N):
                col = n0 + cols
                col_ok = col < num_tokens
                if PREFETCH:  # this tile's slots came one iteration ahead; fetch the next's
                    slot = slot_next
                    col_next = col + BLOCK_N
                    slot_next = tl.load(token_slot_ptr + token_start + col_next,
                                        mask=col_next < num_tokens, other=first_slot)
                else:
                    slot = tl.load(token_slot_ptr + token_start + col, mask=col_ok,
                                   other=first_slot)
                if NARROW:  # 32-bit offsets (the caches hold < 2**31 elements)
                    k_off = slot[:, None] * stride_kt + dims[None, :]
                else:
                    k_off = slot.to(tl.int64)[:, None] * stride_kt + dims[None, :]
                if SAME_KV_STRIDE:
                    v_off = k_off
                elif NARROW:
                    v_off = slot[:, None] * stride_vt + dims[None, :]
                else:
                    v_off = slot.to(tl.int64)[:, None] * stride_vt + dims[None, :]
                k = tl.load(k_head + k_off)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                if not LEAN:
                    s = s * qk_scale
                if FLAT:
                    flat = token_start + col
                    end = tl.load(subtree_end_ptr + flat, mask=col_ok, other=0)
                    visible = (flat[None, :] <= query_flat[:, None]) & (
                        query_flat[:, None] < end[None, :])
                else:
                    visible = row_ok[:, None] & col_ok[None, :]
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing
                if LEAN:  # s and m unscaled: the scale rides in the exponent's FMA
                    p = tl.exp2(s * qk_scale - (m_safe * qk_scale)[:, None])
                    alpha = tl.exp2((m_i - m_safe) * qk_scale)
                else:
                    p = tl.exp2(s - m_safe[:, None])
                    alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_head + v_off)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v,
                                                    input_precision=DOT_PRECISION)
                m_i = m_new
            seen = l_i > 0
            l_safe = tl.where(seen, l_i, 1.0)
            if LEAN:
                m_i = m_i * qk_scale
            lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
            part_row = tl.load(entry_row_ptr + entry, mask=row_ok, other=0)
            part_rows = part_row.to(tl.int64) * Q_HEADS + heads
            tl.store(o_part_ptr + part_rows[:, None] * HEAD_DIM + dims[None, :],
                     acc / l_safe[:, None], mask=row_ok[:, None])
            tl.store(lse_part_ptr + part_rows, lse, mask=row_ok)


_LAUNCH_PARTIALS = Launcher(_partials_kernel)


def partials(q, k_cache, v_cache, o_part, lse_part, buffers, *, flat: bool, sm_scale: float,
             config: TileConfig, num_programs: int) -> None:
    """Launch `_partials_kernel`: the partial results of every (partition, query) entry.

    Parameters
    ----------
    q : [queries, q_heads, head_dim] (head_dim a power of two >= 16, contiguous)
    k_cache, v_cache : [num_pages, page_size, kv_heads, head_dim]
        Token rows addressed by slot (``stride(0) == page_size * stride(1)``).
    o_part : fp32 [max_entries, q_heads, head_dim], contiguous (written)
    lse_part : fp32 [max_entries, q_heads], contiguous (written)
    buffers : dict of str to int32 tensors
        The plan's device buffers (`deft.plan_buffers.PlanBuffers.views`).
    flat : bool
        Flattened-tree addressing with Euler-tour visibility (KV-guided), else listed slots.
    sm_scale : float
    config : TileConfig
    num_programs : int
        Persistent grid size (fixed for a given capacity and device).
    """
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // kv_heads
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32: ignored for 16-bit
    narrow = config.lean and max(k_cache.numel(), v_cache.numel()) < 2**31
    _LAUNCH_PARTIALS((num_programs,),
        q, k_cache, v_cache, o_part, lse_part,
        buffers["counts"], buffers["part_start"], buffers["part_tokens"], buffers["part_entry"],
        buffers["entry_query"], buffers["entry_row"], buffers["query_flat"], buffers["token_slot"],
        buffers["subtree_end"],
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(1), v_cache.stride(2),
        sm_scale * LOG2E,
        KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        FLAT=flat, DOT_PRECISION=precision, PREFETCH=config.prefetch,
        LEAN=config.lean, NARROW=narrow,
        SAME_KV_STRIDE=narrow and k_cache.stride(1) == v_cache.stride(1),
        num_warps=config.num_warps, num_stages=config.num_stages,
        maxnreg=config.max_registers or None,
    )
