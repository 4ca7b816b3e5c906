"""DeFT-Node: KV-guided partitions, one whole node each.

Partition (`deft.plan.build_plan`): one node x one group of the queries that see it (the
queries of its subtree). Kernel: `deft.kernels.partials._partials_kernel` in FLAT mode (a node is
one run of the flattened tree; the Euler-tour test reduces to the causal offset for the node's
own queries), then `deft.kernels.reduction.merge`. Partitions are as uneven as the
nodes: the kernel of the unbalanced baseline.
"""

from deft.kernels.deft_flatten import CONFIGS  # noqa: F401  (the same tiles)
