"""Per-tile math the Hopper Gluon DeFT-Flatten consumers share (`deft.kernels.deft_flatten_sm90`,
`deft.kernels.deft_flatten_sm90_pipelined`, `deft.kernels.deft_flatten_sm90_split`): the
work item's plan data and a query tile's real rows, the Euler-tour mask of one S tile, one step
of the online softmax, and a query tile's partial rows (its lse and normalised o) stored.

Tensors are in the consumer's wgmma layouts: S [BLOCK_M, BLOCK_N] (query-tile rows x KV-tile
columns), per-row vectors [BLOCK_M], per-column vectors [BLOCK_N].
"""

from __future__ import annotations

from deft.kernels import gluon_compat as gc
from deft.kernels.gluon_compat import HAS_GLUON

if HAS_GLUON:
    gluon, gl = gc.gluon, gc.gl

    @gluon.jit
    def work_item(item, part_start_ptr, part_tokens_ptr, part_entry_ptr,
                  KV_HEADS: gl.constexpr):
        """(KV head, first flattened position, tokens, first entry, entry past the last) of work
        item ``item``: partition item // KV_HEADS at KV head item % KV_HEADS."""
        part = item // KV_HEADS
        return (item % KV_HEADS, gl.load(part_start_ptr + part), gl.load(part_tokens_ptr + part),
                gl.load(part_entry_ptr + part), gl.load(part_entry_ptr + part + 1))

    @gluon.jit
    def first_work_item(counts_ptr, part_start_ptr, part_tokens_ptr, part_entry_ptr,
                        KV_HEADS: gl.constexpr, PREFETCH: gl.constexpr):
        """(work items of the plan, this program's first item or -1, that item's `work_item`).

        With PREFETCH the first item's plan data are loaded beside the item count, not after
        it: ``program_id < grid <= max_entries x KV_HEADS`` (`TreeAttention._num_programs`),
        so the partition index is within the buffers whatever the plan; without, the five
        values are placeholders and the first item is -1 (every item is loaded in the loop,
        `work_item_at`)."""
        pid = gl.program_id(0)
        if PREFETCH:
            kv_head, start, tokens, lo, hi = work_item(pid, part_start_ptr, part_tokens_ptr,
                                                       part_entry_ptr, KV_HEADS)
            first = pid
        else:
            kv_head = pid * 0
            start = kv_head
            tokens = kv_head
            lo = kv_head
            hi = kv_head
            first = kv_head - 1
        return gl.load(counts_ptr) * KV_HEADS, first, kv_head, start, tokens, lo, hi

    @gluon.jit
    def work_item_at(item, first, kv_head, start, tokens, lo, hi, part_start_ptr,
                     part_tokens_ptr, part_entry_ptr, KV_HEADS: gl.constexpr):
        """`work_item` of ``item``: the values given where it is ``first`` (loaded ahead by
        `first_work_item`), else loaded."""
        if item != first:
            kv_head, start, tokens, lo, hi = work_item(item, part_start_ptr, part_tokens_ptr,
                                                       part_entry_ptr, KV_HEADS)
        return kv_head, start, tokens, lo, hi

    @gluon.jit
    def real_rows(rows, entry0, entry_hi, QUERIES_PER_TILE: gl.constexpr, GROUP: gl.constexpr,
                  GROUP_PAD: gl.constexpr):
        """Whether each row of a query tile (rows = query slot x GROUP_PAD + head, the tile's
        first entry ``entry0``) is a real (entry, head): its slot in the tile, its entry before
        ``entry_hi``, its head one of GROUP."""
        slot = rows // GROUP_PAD
        return (slot < QUERIES_PER_TILE) & (entry0 + slot < entry_hi) & (rows % GROUP_PAD < GROUP)

    @gluon.jit
    def query_span(query_flat, row_ok):
        """(min, max) query_flat over a query tile's real rows ([BLOCK_M] -> two scalars)."""
        lo = gl.min(gl.where(row_ok, query_flat, 2147483647), 0)
        return lo, gl.max(query_flat, 0)

    @gluon.jit
    def mask_unless_whole(s, end, flat0, s_cols, query_flat, qf_lo, qf_hi,
                           BLOCK_N: gl.constexpr):
        """S [BLOCK_M, BLOCK_N] with the columns a row does not see set to -inf, skipped (one
        branch, uniform over the warpgroup) when every real row sees every column: the tile's
        last position <= the rows' lowest query_flat and the rows' highest query_flat < every
        column's subtree_end (a column past the partition has subtree_end 0, so a tile with one
        is always masked). Padding rows then keep finite scores; they are never stored."""
        if (flat0 + BLOCK_N - 1 > qf_lo) | (qf_hi >= gl.min(end, 0)):
            flat = flat0 + s_cols
            visible = (flat[None, :] <= query_flat[:, None]) & (
                query_flat[:, None] < end[None, :])
            s = gl.where(visible, s, float("-inf"))
        return s

    @gluon.jit
    def mask_tile(s, end, flat0, s_cols, query_flat, qf_lo, qf_hi, BLOCK_N: gl.constexpr,
                  MASK_FREE: gl.constexpr):
        """S with the Euler-tour mask applied: `mask_unless_whole` (MASK_FREE) or on every
        tile."""
        if MASK_FREE:
            s = mask_unless_whole(s, end, flat0, s_cols, query_flat, qf_lo, qf_hi, BLOCK_N)
        else:
            flat = flat0 + s_cols
            visible = (flat[None, :] <= query_flat[:, None]) & (query_flat[:, None] < end[None, :])
            s = gl.where(visible, s, float("-inf"))
        return s

    @gluon.jit
    def online_softmax(s, m_i, l_i, qk_scale, THRESHOLD: gl.constexpr):
        """One tile of the online softmax, exact with a lazy max: (p, alpha, m, l).

        s [BLOCK_M, BLOCK_N] raw scores (masked columns -inf); m_i, l_i [BLOCK_M] the running
        raw max and sum. A row's max moves only when the tile's passes it by more than
        THRESHOLD (log2 units: then p <= 2**THRESHOLD); a -inf max is always replaced. p is
        exp2 of the scaled scores minus the scaled max, alpha what the running O and l are
        multiplied by (1 where the max stays).
        """
        m_tile = gl.max(s, 1)
        grow = (m_tile - m_i) * qk_scale > THRESHOLD
        m_new = gl.where(grow, gl.maximum(m_i, m_tile), m_i)
        m_scaled = gl.where(m_new == float("-inf"), 0.0, m_new) * qk_scale
        p = gl.exp2(s * qk_scale - m_scaled[:, None])
        alpha = gl.where(m_i == m_new, 1.0, gl.exp2(m_i * qk_scale - m_scaled))
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def row_results(m_i, l_i, qk_scale):
        """(l, lse) of a query tile's rows from the running raw max and sum [BLOCK_M]: l with 1
        where a row saw nothing, the natural-log lse with -inf there."""
        seen = l_i > 0
        l_safe = gl.where(seen, l_i, 1.0)
        lse = gl.where(seen, (m_i * qk_scale + gl.log2(l_safe)) * 0.6931471805599453,
                       float("-inf"))
        return l_safe, lse

    @gluon.jit
    def store_rows(o_part_ptr, lse_part_ptr, acc, l_safe, lse, row, o_row, s_rows, o_rows, o_dims,
                   s_ok, kv_head, entry0, entry_hi, o_rows_layout: gl.constexpr,
                   QUERIES_PER_TILE: gl.constexpr, GROUP: gl.constexpr, GROUP_PAD: gl.constexpr,
                   Q_HEADS: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Store a query tile's partial rows: lse [BLOCK_M] and o = acc / l [BLOCK_M, HEAD_DIM]
        at the rows' entry rows (``row``, ``o_row``: the same in the S and O row layouts) x
        Q_HEADS + the KV head's query heads; padding rows are not stored."""
        lse_rows = row.to(gl.int64) * Q_HEADS + kv_head * GROUP + s_rows % GROUP_PAD
        gl.store(lse_part_ptr + lse_rows, lse, mask=s_ok)
        o_ok = real_rows(o_rows, entry0, entry_hi, QUERIES_PER_TILE, GROUP, GROUP_PAD)
        o_off = (o_row.to(gl.int64) * Q_HEADS + kv_head * GROUP
                 + o_rows % GROUP_PAD) * HEAD_DIM
        o = acc / gl.convert_layout(l_safe, o_rows_layout)[:, None]
        gl.store(o_part_ptr + o_off[:, None] + o_dims[None, :], o, mask=o_ok[:, None])
else:  # pragma: no cover - no Gluon in this triton
    work_item = first_work_item = work_item_at = real_rows = query_span = None
    mask_unless_whole = mask_tile = online_softmax = row_results = store_rows = None
