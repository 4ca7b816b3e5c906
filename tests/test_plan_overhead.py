"""scripts/plan_overhead.py's measurement on the CPU: every step's fill split into its parts, on
the CPU's direct writes and on the staged path a CUDA device takes (a host mirror, as in
tests/test_plan_buffers.py), with the buffers checked against the reference plan each step."""

import importlib.util
from pathlib import Path

import pytest

from deft import workloads as wl
from deft.tree_attention import TreeAttention
from tests.buffer_checks import MirrorUpload

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plan_overhead.py"


@pytest.fixture
def plan_overhead():
    spec = importlib.util.spec_from_file_location("plan_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StagedAttention(TreeAttention):
    """A CPU TreeAttention whose buffers fill through a host mirror (the staged path)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.uploads = MirrorUpload(self.buffers.data)
        self.buffers.stage_through(self.uploads)


def test_the_cpu_fill_is_its_writes(plan_overhead):
    times = plan_overhead.measure(wl.fewshot(300, 4, 20), "deft_flatten", "cpu", steps=3,
                                  check=True)
    assert len(times["fill"]) == len(times["fill_write"]) == 3
    assert not {"fill_wait", "fill_upload", "fill_copies"} & set(times)


def test_the_staged_fill_counts_its_wait_upload_and_copies(plan_overhead, monkeypatch):
    monkeypatch.setattr(plan_overhead, "TreeAttention", StagedAttention)
    times = plan_overhead.measure(wl.fewshot(300, 4, 20), "deft_flatten", "cpu", steps=3,
                                  check=True)
    for part in ("fill", "fill_write", "fill_wait", "fill_upload", "fill_copies"):
        assert len(times[part]) == 3, part
    assert times["fill_copies"][0] >= 1  # the first plan uploads everything it wrote
