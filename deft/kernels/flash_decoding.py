"""Flash-Decoding and Radix Attention: query-guided split-KV over each query's path.

Partition (`deft.plan.build_plan`): one query x one chunk of ``chunk_size`` tokens of its
path (root first). The plan lists every chunk's cache slots (for flash_decoding the slots of a
trivially paged cache, for radix those of the real page table: the same kernel, reading the
prefix once per query). Kernel: `deft.kernels.partials._partials_kernel` in list mode (every
listed token is visible), then `deft.kernels.reduction.merge`.
"""

from deft.kernels.tree_attention_s import CONFIGS  # noqa: F401  (the same tiles)
