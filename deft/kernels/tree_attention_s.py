"""Tree Attention-S (SpecInfer): query-guided over the whole tree in flattened order.

Partition (`deft.plan.build_plan`): one query x one chunk of its tree's flattened order,
whatever part of it the query sees. Kernel: `deft.kernels.partials._partials_kernel` in FLAT
mode with one query per partition (the reference counts a bit mask; the kernel tests visibility
by the Euler-tour rule instead), then `deft.kernels.reduction.merge`.
"""

from deft.kernels.partials import TileConfig

CONFIGS = {
    64: TileConfig(block_m=16, block_n=128, num_warps=4, num_stages=5, programs_per_sm=3),
    128: TileConfig(block_m=16, block_n=64, num_warps=4, num_stages=5, programs_per_sm=3),
    256: TileConfig(block_m=16, block_n=32, num_warps=4, num_stages=5, programs_per_sm=2),
}
"""Tile per head dim: one query per partition, so rows = its packed heads (at least 16)."""
