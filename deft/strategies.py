"""The strategy registry: one record per Table 1 strategy, the only place strategy facts live.

The plan builder, the reference, the IO model, the kernels, the bench and the tuner all read
these records; adding a strategy is one `Strategy` here plus its reference module (and kernel
module, if it has one). Names are used verbatim by the API, the CLI, JSON and docs.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CHUNK_SIZE = 128
"""Tokens per chunk where a strategy splits KV and no size is given."""


@dataclass(frozen=True)
class Strategy:
    """What one strategy is (docs/design.md, "Partitions").

    Attributes
    ----------
    name : str
    takes_chunk_size : bool
        Splits KV into chunks of ``chunk_size`` tokens (default `DEFAULT_CHUNK_SIZE`).
    takes_group_size : bool
        Groups queries KV-guided, at most ``group_size`` per partition (default: no cap).
    paged : bool
        Reads K/V through the page table (pays ``index_bytes``).
    mask : str
        How visibility is paid for: 'causal' (position arithmetic, no bytes), 'bit' or 'dense'.
    reduction : bool
        Writes partial results that a global log-sum-exp reduction merges.
    materialises_scores : bool
        Writes scores and probabilities to HBM and reads them back (pays ``score_bytes``).
    backends : tuple of str
        GPU kernels that exist: 'triton' (portable, `deft.kernels.partials`) and 'gluon' (Hopper,
        sm_90, `deft.kernels.<name>_sm90`: the default there); empty: the PyTorch reference is
        the only one.
    lists_slots : bool
        The kernel reads a list of cache slots per partition (query-guided paths) instead of
        runs of the flattened tree.
    """

    name: str
    takes_chunk_size: bool = False
    takes_group_size: bool = False
    paged: bool = False
    mask: str = "causal"
    reduction: bool = True
    materialises_scores: bool = False
    backends: tuple = ()
    lists_slots: bool = False


REGISTRY = {
    s.name: s
    for s in (
        Strategy("flash_attention", reduction=False),
        Strategy("flash_decoding", takes_chunk_size=True, backends=("triton",), lists_slots=True),
        Strategy("radix", takes_chunk_size=True, paged=True, backends=("triton",), lists_slots=True),
        Strategy("tree_attention_s", takes_chunk_size=True, mask="bit", backends=("triton",)),
        Strategy("tree_attention_m", mask="dense", reduction=False, materialises_scores=True),
        Strategy("vanilla_tree", mask="dense", reduction=False, materialises_scores=True),
        Strategy("deft_node", takes_group_size=True, paged=True, backends=("triton",)),
        Strategy("deft_node_chunk", takes_chunk_size=True, takes_group_size=True, paged=True,
                 backends=("triton",)),
        Strategy("deft_flatten", takes_chunk_size=True, takes_group_size=True, paged=True,
                 mask="bit", backends=("triton", "gluon")),
    )
}
"""Every strategy by name, in Table 1 order."""

STRATEGIES = tuple(REGISTRY)
"""The canonical strategy names, in Table 1 order."""

KERNEL_STRATEGIES = tuple(s.name for s in REGISTRY.values() if s.backends)
"""Strategies with a GPU kernel, in Table 1 order."""

REFERENCE_ONLY = tuple(s.name for s in REGISTRY.values() if not s.backends)
"""Strategies computed by their PyTorch reference only (on the GPU too)."""


def _names(test) -> frozenset:
    return frozenset(s.name for s in REGISTRY.values() if test(s))


USES_CHUNK_SIZE = _names(lambda s: s.takes_chunk_size)
USES_GROUP_SIZE = _names(lambda s: s.takes_group_size)
PAGED = _names(lambda s: s.paged)
BIT_MASK = _names(lambda s: s.mask == "bit")
DENSE_MASK = _names(lambda s: s.mask == "dense")
NO_REDUCTION = _names(lambda s: not s.reduction)
MATERIALISED_SCORES = _names(lambda s: s.materialises_scores)
LISTS_SLOTS = _names(lambda s: s.lists_slots)


def strategy(name: str) -> Strategy:
    """The record of `name`; ValueError naming the choices for an unknown name."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}"
        ) from None
