"""Bad input at the CLI boundary: exit 2, one line on stderr, no traceback, nothing written."""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main

FEWSHOT = str(Path(__file__).parent.parent / "examples" / "fewshot.json")


def invoke(*args):
    result = CliRunner().invoke(main, list(args))
    lines = result.output.strip().splitlines()
    return result, lines


def assert_one_line_error(result, lines, *words):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("where", ["missing-dir", "directory"])
def test_export_to_a_bad_path_writes_nothing(tmp_path, where):
    target = tmp_path / "no" / "such" / "x.json" if where == "missing-dir" else tmp_path
    before = sorted(tmp_path.rglob("*"))
    result, lines = invoke("workloads", "export", "star", "leaves=2", "-o", str(target))
    assert_one_line_error(result, lines, str(target))
    assert sorted(tmp_path.rglob("*")) == before


def test_errors_name_the_options_that_exist():
    result, lines = invoke("estimate-io", "--workload", "fewshot", "--path", "x")
    assert_one_line_error(result, lines, "--path does not apply to --workload fewshot")
    assert "--workload-path" not in result.output
    result, lines = invoke("estimate-io", FEWSHOT, "--path", "x")
    assert_one_line_error(result, lines, "--path applies only with --workload")


def test_replay_without_a_gpu_exits_2(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result, lines = invoke("replay", "--workload", "fewshot")
    assert_one_line_error(result, lines, "needs a CUDA GPU", "ref:<strategy>")


def test_estimate_io_beyond_the_index_limit_exits_2():
    result, lines = invoke("estimate-io", "--workload", "fewshot", "--prompt-tokens",
                           "3000000000")
    assert_one_line_error(result, lines, "int32 index limit")
