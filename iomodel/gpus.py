"""GPU specifications: built-in datasheet values, aliases, detection and user spec files.

A spec holds what the IO model needs of a card: HBM bandwidth, SM count, shared memory, L2,
and the dense fp16/bf16 tensor-core and fp32 rates. Built-in cards are keyed by the name
``torch.cuda.get_device_name()`` reports; any other card is described by a JSON file::

    {"format": "deft-gpu/1", "name": "NVIDIA L40S", "hbm_bandwidth_gb_s": 864, "sm_count": 142,
     "smem_per_sm_kb": 100, "smem_per_block_kb": 99, "l2_mb": 96, "tensor_tflops": 362,
     "fp32_tflops": 91.6, "compute_capability": 8.9, "calibration": {"launch_us": 2.5}}

``compute_capability`` (optional, major.minor as a number; 0 or absent: unknown) tells which
DeFT-Flatten kernel the card runs (`iomodel.kernel_model`: the Gluon kernel on 9.x, else the
portable one). ``calibration`` (optional) overrides constants of the latency model
(`iomodel.constants.Constants`) with values fitted on that card; a spec without it is
*uncalibrated*.
Units: GB/s and TFLOP/s are decimal (1e9, 1e12); KB and MB of on-chip memory are binary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from iomodel.constants import Constants

SPEC_FORMAT = "deft-gpu/1"


class GpuSpecError(ValueError):
    """A GPU name, alias or spec file that cannot be resolved; the message says why."""


@dataclass(frozen=True)
class GpuSpec:
    """One GPU as the IO model sees it.

    Attributes
    ----------
    name : str
        The device name as ``torch.cuda.get_device_name()`` reports it.
    hbm_bandwidth_gb_s : float
        Peak HBM bandwidth, GB/s.
    sm_count : int
        Streaming multiprocessors.
    smem_per_sm_kb, smem_per_block_kb : int
        Shared memory per SM and the most one block (program) may use, KiB.
    l2_mb : float
        L2 cache, MiB.
    tensor_tflops : float
        Dense fp16/bf16 tensor-core rate (fp32 accumulate), TFLOP/s.
    fp32_tflops : float
        Non-tensor fp32 rate, TFLOP/s.
    calibration : dict
        Latency-model constants fitted on this card (`iomodel.constants.Constants` field names).
    compute_capability : float
        CUDA compute capability as major.minor (9.0 for Hopper); 0.0 where unknown.
    """

    name: str
    hbm_bandwidth_gb_s: float
    sm_count: int
    smem_per_sm_kb: int
    smem_per_block_kb: int
    l2_mb: float
    tensor_tflops: float
    fp32_tflops: float
    calibration: dict = field(default_factory=dict)
    compute_capability: float = 0.0

    @property
    def calibrated(self) -> bool:
        """Whether the latency constants were fitted on this card."""
        return bool(self.calibration)

    @property
    def bandwidth(self) -> float:
        """Peak HBM bandwidth in bytes/s."""
        return self.hbm_bandwidth_gb_s * 1e9

    def matmul_rate(self, dtype: str) -> float:
        """Peak matmul rate in flop/s for Q, K, V of `dtype` (tensor cores for 16-bit types)."""
        tflops = self.fp32_tflops if dtype == "float32" else self.tensor_tflops
        return tflops * 1e12

    def to_dict(self) -> dict:
        """The spec-file dict of this spec."""
        return {"format": SPEC_FORMAT, **dataclasses.asdict(self)}


# Sources (datasheet values; dense tensor rates, i.e. without 2:4 sparsity):
# - A100: NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4),
#   80GB SXM column: 2,039 GB/s HBM2e, FP16/BF16 tensor 312 TFLOPS, FP32 19.5 TFLOPS; NVIDIA
#   Ampere architecture whitepaper: 108 SMs, 40 MB L2; CUDA C++ Programming Guide, "Technical
#   Specifications per Compute Capability", 8.0: 164 KB shared memory per SM, 163 KB per block.
# - H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet, SXM column: 3.35 TB/s HBM3, FP16/BF16
#   tensor 1,979 TFLOPS with sparsity (989.4 dense), FP32 67 TFLOPS; NVIDIA H100 (Hopper)
#   architecture whitepaper: 132 SMs, 50 MB L2; CUDA guide, compute capability 9.0: 228 KB
#   shared memory per SM, 227 KB per block.
# - H200 SXM: NVIDIA H200 Tensor Core GPU datasheet: 4.8 TB/s HBM3e, 141 GB, same tensor and
#   FP32 rates as the H100 SXM (the same GH100 die and SM configuration: 132 SMs, 50 MB L2).
BUILTIN = {
    "a100": GpuSpec(
        name="NVIDIA A100-SXM4-80GB",
        hbm_bandwidth_gb_s=2039.0,
        sm_count=108,
        smem_per_sm_kb=164,
        smem_per_block_kb=163,
        l2_mb=40.0,
        tensor_tflops=312.0,
        fp32_tflops=19.5,
        compute_capability=8.0,
    ),
    "h100": GpuSpec(
        name="NVIDIA H100 80GB HBM3",
        hbm_bandwidth_gb_s=3350.0,
        sm_count=132,
        smem_per_sm_kb=228,
        smem_per_block_kb=227,
        l2_mb=50.0,
        tensor_tflops=989.4,
        fp32_tflops=66.9,
        compute_capability=9.0,
    ),
    "h200": GpuSpec(
        name="NVIDIA H200",
        hbm_bandwidth_gb_s=4800.0,
        sm_count=132,
        smem_per_sm_kb=228,
        smem_per_block_kb=227,
        l2_mb=50.0,
        tensor_tflops=989.4,
        fp32_tflops=66.9,
        compute_capability=9.0,
        # Fitted by `deft-cli bench --calibrate` to the graph-mode bench of 2026-11-26 on an H200
        # (six anchors x six kernel strategies, 36 points; docs/benchmarks.md, "Calibrating the IO model").
        calibration={
            "launch_us": 11.32,
            "program_us": 1.98,
            "memory_efficiency": 1.0,
            "compute_efficiency": 0.1427,
            "sm_bandwidth_fraction": 0.01212,
        },
    ),
}
"""Built-in specs by alias."""

DEFAULT_GPU = "h100"

_BY_NAME = {spec.name.lower(): spec for spec in BUILTIN.values()}

_NUMBER_FIELDS = {
    "hbm_bandwidth_gb_s": float,
    "sm_count": int,
    "smem_per_sm_kb": int,
    "smem_per_block_kb": int,
    "l2_mb": float,
    "tensor_tflops": float,
    "fp32_tflops": float,
}


def builtin_gpu(name: str) -> GpuSpec | None:
    """The built-in spec for an alias (``a100``, ``h100``, ``h200``) or a full device name."""
    key = name.strip().lower()
    return BUILTIN.get(key) or _BY_NAME.get(key)


def detect_gpu() -> GpuSpec | None:
    """The spec of CUDA device 0, or None when torch sees no GPU.

    Raises GpuSpecError for a GPU without a built-in spec (pass a spec file for it).
    """
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    spec = builtin_gpu(name)
    if spec is None:
        raise GpuSpecError(
            f"detected {name!r}, which has no built-in spec; describe it in a spec file "
            f"(format {SPEC_FORMAT!r}, see docs/iomodel.md) and pass its path"
        )
    return spec


def load_gpu_spec(source) -> GpuSpec:
    """Read a GPU spec from a JSON file path or an already parsed dict, checking every field."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            source = json.loads(path.read_text())
        except OSError as error:
            raise GpuSpecError(f"{path}: cannot read: {error.strerror or error}") from None
        except json.JSONDecodeError as error:
            raise GpuSpecError(
                f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
            ) from None
    return gpu_from_dict(source)


def gpu_from_dict(data) -> GpuSpec:
    """Build a GpuSpec from a spec-file dict."""
    if not isinstance(data, dict):
        raise GpuSpecError(f"a GPU spec must be a JSON object, got {type(data).__name__}")
    if data.get("format") != SPEC_FORMAT:
        raise GpuSpecError(f"field 'format' must be {SPEC_FORMAT!r}, got {data.get('format')!r}")
    unknown = set(data) - {"format", "name", "calibration", "compute_capability",
                           *_NUMBER_FIELDS}
    if unknown:
        raise GpuSpecError(f"unknown field(s): {', '.join(sorted(unknown))}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise GpuSpecError("field 'name' must be a non-empty string")
    values = {}
    for key, kind in _NUMBER_FIELDS.items():
        if key not in data:
            raise GpuSpecError(f"field {key!r} is missing")
        values[key] = _positive(data[key], key, kind)
    if values["smem_per_block_kb"] > values["smem_per_sm_kb"]:
        raise GpuSpecError("field 'smem_per_block_kb' must not exceed 'smem_per_sm_kb'")
    calibration = data.get("calibration", {})
    if not isinstance(calibration, dict):
        raise GpuSpecError("field 'calibration' must be an object of latency constants")
    known = {f.name for f in dataclasses.fields(Constants)}
    unknown = set(calibration) - known
    if unknown:
        raise GpuSpecError(
            f"calibration: unknown constant(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(known))}"
        )
    calibration = {
        key: _positive(value, f"calibration.{key}", float) for key, value in calibration.items()
    }
    capability = data.get("compute_capability", 0.0)
    if capability:
        capability = _positive(capability, "compute_capability", float)
    return GpuSpec(name=name, calibration=calibration, compute_capability=float(capability),
                   **values)


def resolve_gpu(value: str | None = None) -> GpuSpec:
    """A spec from an alias, a device name, a spec-file path, or ``auto`` (detect).

    None means the default (``h100``). Raises GpuSpecError when nothing matches, when ``auto``
    finds no GPU, or for a bad spec file.
    """
    if value is None:
        value = DEFAULT_GPU
    if value.strip().lower() == "auto":
        spec = detect_gpu()
        if spec is None:
            raise GpuSpecError(
                "no CUDA GPU detected on this machine: name one (a100, h100, h200) or pass a "
                "spec file"
            )
        return spec
    spec = builtin_gpu(value)
    if spec is not None:
        return spec
    if value.endswith(".json") or Path(value).is_file():
        return load_gpu_spec(value)
    raise GpuSpecError(
        f"unknown GPU {value!r}: use one of {', '.join(BUILTIN)}, auto, or a spec-file path (.json)"
    )


def _positive(value, key: str, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GpuSpecError(f"field {key!r} must be a number, got {value!r}")
    if kind is int and value != int(value):
        raise GpuSpecError(f"field {key!r} must be an integer, got {value!r}")
    if not (0 < value < math.inf):
        raise GpuSpecError(f"field {key!r} must be positive and finite, got {value!r}")
    return kind(value)
