"""DeFT-Flatten: KV-guided partitions over the flattened tree, cut into even blocks.

Partition (`deft.plan.build_plan`): one block of ``chunk_size`` tokens of the flattened tree
(DFS preorder, so a block may span several nodes) x one group of the queries that see any of
its tokens. Kernel: `deft.kernels.partials._partials_kernel` in FLAT mode; visibility per
(query, token) from the Euler-tour test on flattened positions (one int32 per token and per
query, no bit mask), then the reduction `deft.kernels.reduction.merge`.
"""

from deft.kernels.partials import TileConfig

CONFIGS = {
    64: TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=5, programs_per_sm=2),
    128: TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=3, programs_per_sm=2,
                    prefetch=True, lean=True),
    256: TileConfig(block_m=64, block_n=32, num_warps=8, num_stages=5, programs_per_sm=1),
}
"""Tile per head dim (the smallest key >= head_dim); rows hold a block's queries x packed heads.
For sm_90 (H100/H200): 5 stages keep the next K/V tile in flight behind the slot gather (see
`deft.kernels.partials`), two programs per SM where registers and shared memory allow. Head dim
128: slots prefetched a tile ahead and the lean tile body, which need only 3 stages and beat the
5-stage tile by 2-5% on five of the six anchors (docs/performance.md, H200)."""
