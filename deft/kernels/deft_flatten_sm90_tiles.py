"""Per-tile math the Hopper Gluon DeFT-Flatten consumers share (`deft.kernels.deft_flatten_sm90`,
`deft.kernels.deft_flatten_sm90_pipelined`, `deft.kernels.deft_flatten_sm90_split`): the
Euler-tour mask of one S tile and one step of the online softmax.

Tensors are in the consumer's wgmma layouts: S [BLOCK_M, BLOCK_N] (query-tile rows x KV-tile
columns), per-row vectors [BLOCK_M], per-column vectors [BLOCK_N].
"""

from __future__ import annotations

from deft.kernels import gluon_compat as gc
from deft.kernels.gluon_compat import HAS_GLUON

if HAS_GLUON:
    gluon, gl = gc.gluon, gc.gl

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

else:  # pragma: no cover - no Gluon in this triton
    query_span = mask_unless_whole = mask_tile = online_softmax = None
