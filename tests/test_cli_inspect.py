"""`deft-cli inspect`: the view, the statistics, and bad input exiting 2."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from tests.test_tree import BAD

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_inspect_examples(path):
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "unique_tokens" in result.output
    stats = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).output)
    assert stats["queries"] >= 1 and stats["unique_tokens"] >= stats["nodes"]


def test_large_tree_is_folded(tmp_path):
    nodes = [{"id": 0, "tokens": 10}] + [{"id": i, "parent": 0, "tokens": 2} for i in range(1, 500)]
    path = tmp_path / "star.json"
    path.write_text(json.dumps({"format": "deft-tree/1", "nodes": nodes}))
    result = CliRunner().invoke(main, ["inspect", str(path), "--max-nodes", "10"])
    assert result.exit_code == 0
    assert "490 more nodes" in result.output


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_trees_exit_2_with_message(tmp_path, case):
    data, message = BAD[case]
    path = tmp_path / "tree.json"
    path.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


def test_missing_file_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "none.json")])
    assert result.exit_code == 2
    assert "cannot read" in result.stderr
