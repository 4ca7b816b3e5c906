"""The method interface of the bench: what the runner needs of a strategy or a peer.

A `Method` says whether it can run a workload (`unavailable` gives the reason it cannot:
a missing package, no GPU, a tree shape it does not support) and prepares it (`prepare`):
everything a real caller would do once per decode step — page tables, masks, plans, layout
changes of the KV — happens there, outside timing. What it returns are `Variant`\\ s, one per
setting to try (SGLang's split counts; one for most methods); the runner keeps the fastest
correct one.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Variant:
    """One ready-to-time setting of a method on one workload.

    Attributes
    ----------
    calls : list of callables
        One per KV copy of the inputs, in order; each computes the whole attention call on
        its copy and returns the output ``[queries, q_heads, head_dim]`` (a view is fine).
    label : str
        What distinguishes this variant ("" when the method has one), e.g. ``"splits=8"``.
    plan_us : float or None
        Median host time of the method's planning step (None: it has none).
    poison : list of tensors
        Output buffers that ``calls[0]`` writes; the runner fills them with NaN before the
        correctness check, so rows the method never writes show up.
    params : dict
        Settings to record in the JSON (chunk and group sizes, page size, ...).
    """

    calls: list[Callable[[], torch.Tensor]]
    label: str = ""
    plan_us: float | None = None
    poison: list[torch.Tensor] = field(default_factory=list)
    params: dict = field(default_factory=dict)


class Method:
    """A strategy or peer the bench can run. Subclasses set the attributes and both methods.

    Attributes
    ----------
    name : str
        The name used by ``--methods``, the table and the JSON.
    kind : str
        ``"deft"`` (this project's strategies) or ``"peer"``.
    description : str
        One line: what is called and how.
    first_call : str
        What the first call pays besides the work (JIT compilation), for the progress log.
    """

    name = ""
    kind = "peer"
    description = ""
    first_call = "Triton compiles on first use"

    def unavailable(self, inputs) -> str | None:
        """Why this method cannot run `inputs` (`deft.bench.inputs.Inputs`), or None."""
        raise NotImplementedError

    def prepare(self, inputs) -> list[Variant]:
        """Plan and lay out everything once; return the variants to check and time."""
        raise NotImplementedError

    def __repr__(self):
        return f"<{self.kind} method {self.name}>"


def need_cuda(device: torch.device) -> str | None:
    """The reason to skip a GPU-only method on `device`, or None on a CUDA device."""
    if device.type != "cuda":
        return f"needs a CUDA device (inputs are on {device.type})"
    return None


def need_module(module: str, hint: str = "") -> str | None:
    """The reason to skip a method whose package `module` is not installed, or None."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed" + (f" ({hint})" if hint else "")
    return None


def time_plan(plan: Callable[[], object], device: torch.device, repeats: int = 5):
    """Run `plan` `repeats` times; return (median µs, the last result).

    Host wall time, with the device synchronised before and after each call, so what the
    planner leaves running on the GPU counts too.
    """
    times = []
    result = None
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        result = plan()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e6)
    return float(np.median(times)), result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
