"""The floor: the physical limit of one attention call, from rates measured in the same run.

floor = max(bytes / copy bandwidth, flops / matmul rate) (docs/anchors.md), where bytes are every
unique KV token read once plus Q read once and O written once, and flops are 4 x the visible
(query, token) pairs x q_heads x head_dim: `iomodel.floor`, the project's one definition, fed
with rates measured here: a large device-to-device copy (bytes read + written) and a large
fp16/bf16 GEMM on random data, both timed like the methods (eager, L2 flushed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from deft.tree import Tree
from iomodel import floor

COPY_BYTES = 1 << 30
"""Bytes of the copied buffer (1 GiB, far beyond any L2)."""

GEMM_SIZE = 8192
"""M = N = K of the measured GEMM."""


@dataclass(frozen=True)
class FloorRates:
    """Rates measured on the device, and what was measured.

    Attributes
    ----------
    copy_bandwidth : float
        Bytes read + written per second by a ``copy_bytes`` device-to-device copy.
    matmul_rate : float
        Flop/s of a ``gemm_size``-cubed GEMM in ``dtype``.
    """

    copy_bandwidth: float
    matmul_rate: float
    copy_bytes: int
    copy_us: float
    gemm_size: int
    gemm_us: float
    dtype: str

    def to_dict(self) -> dict:
        return {**asdict(self), "copy_bandwidth_gb_s": self.copy_bandwidth / 1e9,
                "matmul_tflops": self.matmul_rate / 1e12}


def measure_rates(timer, device="cuda", dtype=torch.float16, copy_bytes: int = COPY_BYTES,
                  gemm_size: int = GEMM_SIZE) -> FloorRates:
    """Measure the copy bandwidth and the GEMM rate with `timer` (`harness.timing`)."""
    device = torch.device(device)
    element_bytes = torch.finfo(dtype).bits // 8
    elements = copy_bytes // element_bytes
    copy = _copy_us(timer, device, dtype, elements)
    gemm = _gemm_us(timer, device, dtype, gemm_size)
    moved = 2 * elements * element_bytes  # read + written
    return FloorRates(
        copy_bandwidth=moved / (copy * 1e-6),
        matmul_rate=2.0 * gemm_size**3 / (gemm * 1e-6),
        copy_bytes=moved // 2,
        copy_us=copy,
        gemm_size=gemm_size,
        gemm_us=gemm,
        dtype=str(dtype).removeprefix("torch."),
    )


def _copy_us(timer, device, dtype, elements: int) -> float:
    source = torch.randn(elements, device=device, dtype=dtype)
    target = torch.empty_like(source)
    return timer.eager(lambda: target.copy_(source)).median_us


def _gemm_us(timer, device, dtype, size: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    c = torch.empty_like(a)
    return timer.eager(lambda: torch.matmul(a, b, out=c)).median_us


def workload_floor(tree: Tree, copy_bandwidth: float, matmul_rate: float) -> dict:
    """The floor of one call of `tree` at the given rates (bytes/s, flop/s).

    Returns
    -------
    dict
        `iomodel.floor`'s: ``floor_us``, ``memory_us`` (bytes / bandwidth), ``compute_us``
        (flops / rate), ``floor_bytes``, ``floor_flops``, ``bound`` ("memory" or "compute"), ...
    """
    return floor(tree, None, copy_bandwidth=copy_bandwidth, matmul_rate=matmul_rate)
