"""Test set-up: the interpreter without a GPU, the `gpu` marker, and hypothesis profiles.

Kernels run in Triton's interpreter where torch sees no CUDA device (`tests.interpreter`, set
before any test module loads a kernel). Tests marked ``gpu`` need a CUDA device: they are
deselected without one and run in the GPU lane (scripts/gpu_tests.sh). Hypothesis profiles:
`ci` (derandomized, bounded) in CI, `dev` (deeper) for local runs; select with
HYPOTHESIS_PROFILE=ci|dev (CI sets `ci`, the default is `dev` locally).
"""

import os

import torch
from hypothesis import HealthCheck, settings

from tests.interpreter import use_interpreter_without_gpu

use_interpreter_without_gpu()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run by scripts/gpu_tests.sh)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
