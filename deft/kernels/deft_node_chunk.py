"""DeFT-Node-Chunk: KV-guided partitions, each node cut into chunks.

Partition (`deft.plan.build_plan`): one chunk of ``chunk_size`` tokens of one node x one
group of the queries that see it. Kernel: `deft.kernels.partials._partials_kernel` in FLAT mode
(a chunk is one run of the flattened tree), then `deft.kernels.reduction.merge`.
"""

from deft.kernels.deft_flatten import CONFIGS  # noqa: F401  (the same tiles)
