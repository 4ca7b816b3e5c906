"""Every method of the harness by name, its groups, and the one parser of ``--methods`` lists.

This project's Triton strategies (`harness.deft_methods.KernelMethod`, through
`deft.TreeAttention` over a paged cache) and the peers (`harness.peers`, `harness.sglang`) are
benchmarked by default; the strategies without a kernel (flash_attention, tree_attention_m,
vanilla_tree) run as their PyTorch reference only when named, and ``ref:<strategy>`` is the
PyTorch reference of any strategy. The replay takes only the methods that step
(``Method.steps``): its ``all`` is the Triton strategies and SGLang.
"""

from __future__ import annotations

from deft.strategies import KERNEL_STRATEGIES, STRATEGIES
from harness.deft_methods import KernelMethod, ReferenceMethod
from harness.methods import Method
from harness.peers import PEERS

GPU_STRATEGIES = tuple(reversed(KERNEL_STRATEGIES))
"""This project's Triton strategies, in the table's order (DeFT-Flatten first)."""

PYTORCH_STRATEGIES = tuple(s for s in STRATEGIES if s not in KERNEL_STRATEGIES)
"""Strategies without a kernel: benchmarked as their PyTorch reference, only when named."""

REFERENCE_PREFIX = "ref:"

METHODS = {
    **{name: KernelMethod(name) for name in GPU_STRATEGIES},
    **{name: ReferenceMethod(name, name) for name in PYTORCH_STRATEGIES},
    **{peer.name: peer() for peer in PEERS},
}
"""Every named method (``ref:<strategy>`` aside), by name."""

GROUPS = {
    "all": GPU_STRATEGIES + tuple(peer.name for peer in PEERS),
    "strategies": GPU_STRATEGIES,
    "peers": tuple(peer.name for peer in PEERS),
}
"""Names ``--methods`` accepts for several methods at once."""

DEFAULT_METHODS = GROUPS["all"]
"""What the bench runs by default."""

REPLAY_METHODS = tuple(name for name in GROUPS["all"] if METHODS[name].steps)
"""What the replay runs by default: every method of ``all`` that steps."""


def parse_methods(text: str, steps: bool = False) -> list[Method]:
    """The methods of a ``--methods`` value: names and groups, comma-separated, in order.

    Parameters
    ----------
    text : str
        Names of `METHODS`, ``ref:<strategy>`` (any of `deft.strategies.STRATEGIES`) and
        groups of `GROUPS`.
    steps : bool
        Only methods that step (the replay): groups keep those, a named one-shot peer is
        refused.

    Returns
    -------
    list of Method
        A fresh object per method (methods hold their buffers).

    Raises ValueError naming the unknown entry and listing the valid ones.
    """
    names = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item in GROUPS:
            names.extend(n for n in GROUPS[item] if not steps or METHODS[n].steps)
        elif item in METHODS or _reference(item):
            if steps and item in METHODS and not METHODS[item].steps:
                raise ValueError(f"{item} runs one-shot only (bench), it cannot be replayed; "
                                 f"replayable: {', '.join(REPLAY_METHODS)}, "
                                 f"{REFERENCE_PREFIX}<strategy>")
            names.append(item)
        else:
            listed = REPLAY_METHODS if steps else tuple(METHODS)
            raise ValueError(
                f"unknown method {item!r}; methods: {', '.join(listed)}, "
                f"{REFERENCE_PREFIX}<{'|'.join(STRATEGIES)}>; groups: {', '.join(GROUPS)}")
    if not names:
        raise ValueError("no method selected")
    return [make_method(name) for name in dict.fromkeys(names)]


def make_method(name: str) -> Method:
    """A fresh method of a name of `METHODS` or ``ref:<strategy>``."""
    if _reference(name):
        return ReferenceMethod(name[len(REFERENCE_PREFIX):])
    if name in GPU_STRATEGIES:
        return KernelMethod(name)
    if name in PYTORCH_STRATEGIES:
        return ReferenceMethod(name, name)
    return type(METHODS[name])()


def _reference(name: str) -> bool:
    return name.startswith(REFERENCE_PREFIX) and name[len(REFERENCE_PREFIX):] in STRATEGIES
