"""Which partials backend a `TreeAttention` runs: the Hopper Gluon kernel or the Triton kernel.

The Gluon kernel is `deft.kernels.deft_flatten_sm90` (DeFT-Flatten on sm_90); this module holds
only the choice, so it imports without Gluon and without a GPU.
"""

from __future__ import annotations

import os

import torch

from deft.kernels import gluon_compat as gc
from deft.kernels.gluon_compat import HAS_GLUON
from deft.strategies import REGISTRY

BACKENDS = ("gluon", "triton")


def gluon_supported(device=None) -> tuple[bool, str]:
    """(whether the Gluon kernel can run on this device, why not)."""
    if not HAS_GLUON:
        return False, gc.WHY_NOT
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, _ = torch.cuda.get_device_capability(device)
    if major != 9:
        return False, f"compute capability {major}.x is not Hopper (9.x)"
    return True, ""


def resolve_backend(strategy: str, backend: str | None, device) -> str:
    """The partials backend of a `TreeAttention`: "gluon" or "triton".

    ``backend`` (or else the environment variable ``DEFT_BACKEND``) forces one; by default
    deft_flatten runs the Gluon kernel where it can (Hopper, Gluon importable), everything else
    the Triton kernel. Forcing "gluon" where it cannot run raises.
    """
    choice = backend or os.environ.get("DEFT_BACKEND") or None
    if choice is not None and choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    device = torch.device(device)
    if choice == "triton" or device.type != "cuda":
        if choice == "gluon":
            raise ValueError(f"the Gluon backend needs a Hopper CUDA device, got {device}")
        return "triton"
    ok, why = gluon_supported(device)
    if choice == "gluon":
        if not ok:
            raise ValueError(f"the Gluon backend cannot run here: {why}")
        return "gluon"
    return "gluon" if ok and "gluon" in REGISTRY[strategy].backends else "triton"
