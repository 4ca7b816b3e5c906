"""Test set-up: the interpreter without a GPU, the `gpu` marker, and hypothesis profiles.

Kernels run in Triton's interpreter where torch sees no CUDA device (`tests.interpreter`, set
before any test module loads a kernel). Tests marked ``gpu`` need a CUDA device: they are
deselected without one and run in the GPU lane (scripts/gpu_tests.sh). Hypothesis profiles:
`ci` (derandomized, bounded) in CI, `dev` (deeper) for local runs; select with
HYPOTHESIS_PROFILE=ci|dev (CI sets `ci`, the default is `dev` locally).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests.interpreter import use_interpreter_without_gpu

use_interpreter_without_gpu()


@pytest.fixture
def isolated_tables(tmp_path, monkeypatch):
    """Lookups see only the configs a test writes (tmp_path/configs), logs of the shipped
    configs go to tmp_path/logs, and nothing is cached. Yields the configs folder."""
    from autotune import store  # here: kernel modules load after use_interpreter_without_gpu
    from deft.kernels import tuned
    from tests.tables import forget_tables

    configs = tmp_path / "configs"
    configs.mkdir()
    monkeypatch.setattr(tuned, "CONFIG_DIR", configs)
    monkeypatch.setattr(store, "LOG_DIR", tmp_path / "logs")
    monkeypatch.delenv(tuned.CONFIG_ENV, raising=False)
    forget_tables()
    yield configs
    forget_tables()


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
