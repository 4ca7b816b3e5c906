"""Malformed tree files through `deft-cli inspect` and `estimate-io`: exit 2 and one line.

Hypothesis builds tree files with at least one defect each (random bytes, JSON of the wrong
shape, numbers at and past the limits, missing and extra fields, cycles, duplicate ids) and
runs both commands in-process. Each must exit 2 with exactly one line on stderr, no traceback,
nothing on stdout and no file written.
"""

import json

from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from cli import main

LIMIT = 2**31 - 1

BAD_NUMBERS = st.sampled_from([-1, 2**31, 2**63, 10**30, 1.0, 1.5, -0.0, True, False, "1",
                               None, [], {}, float("inf")])
"""Values no integer field of a node takes (count fields: 0 too)."""


@st.composite
def valid_trees(draw):
    """A small valid tree.json dict: a root and a few children in a chain or a star."""
    n = draw(st.integers(1, 5))
    nodes = [{"id": 0, "parent": None, "tokens": draw(st.integers(1, 50))}]
    for i in range(1, n):
        parent = draw(st.integers(0, i - 1))
        nodes.append({"id": i, "parent": parent, "tokens": draw(st.integers(1, 50))})
    return {"format": "deft-tree/1", "nodes": nodes}


@st.composite
def broken_trees(draw):
    """A valid tree with one defect that the format or the model refuses."""
    tree = draw(valid_trees())
    nodes = tree["nodes"]
    node = draw(st.sampled_from(nodes))
    defect = draw(st.sampled_from([
        "tokens", "queries", "id", "parent", "missing", "extra", "cycle", "self_parent",
        "duplicate", "total_tokens", "no_query", "format", "nodes", "node_shape", "attention",
        "top_level",
    ]))
    if defect == "tokens":
        node["tokens"] = draw(BAD_NUMBERS | st.just(0) | st.integers(max_value=0)
                              | st.integers(min_value=LIMIT + 1))
    elif defect == "queries":
        node["queries"] = draw(BAD_NUMBERS.filter(lambda v: v is not None)
                               | st.just(node["tokens"] + 1) | st.integers(max_value=-1))
    elif defect == "id":
        node["id"] = draw(st.sampled_from([-1, 2**63, 10**30, 1.5, 0.0, True, "0", None, [], {}]))
    elif defect == "parent":
        node["parent"] = draw(st.sampled_from([10**9, -1, 1.5, True, "0", [], {}, 2**64]))
    elif defect == "missing":
        del node[draw(st.sampled_from(["id", "tokens"]))]
    elif defect == "extra":
        node[draw(st.sampled_from(["token", "children", "Tokens", ""]))] = 1
    elif defect == "cycle":
        nodes.append({"id": 100, "parent": 101, "tokens": 1})
        nodes.append({"id": 101, "parent": 100, "tokens": 1})
    elif defect == "self_parent":
        node["parent"] = node["id"]
    elif defect == "duplicate":
        nodes.append(dict(node))
    elif defect == "total_tokens":
        nodes[0]["tokens"] = LIMIT
        nodes.append({"id": 1000, "parent": 0, "tokens": draw(st.integers(1, LIMIT))})
    elif defect == "no_query":
        for each in nodes:
            each["queries"] = 0
    elif defect == "format":
        tree["format"] = draw(st.sampled_from(["deft-tree/2", None, 1, "", "DEFT-TREE/1"]))
    elif defect == "nodes":
        tree["nodes"] = draw(st.sampled_from([[], {}, None, "nodes", 3]))
    elif defect == "node_shape":
        nodes[draw(st.integers(0, len(nodes) - 1))] = draw(st.sampled_from([[], 1, "n", None]))
    elif defect == "attention":
        field, value = draw(st.sampled_from([
            ("q_heads", 0), ("q_heads", 3), ("kv_heads", -1), ("head_dim", 2048),
            ("head_dim", 1.0), ("dtype", "int8"), ("dtype", None), ("heads", 8), ("kv_heads", True),
        ]))
        tree["attention"] = {field: value}
    else:
        tree[draw(st.sampled_from(["version", "Nodes", "attn"]))] = {}
    return json.dumps(tree).encode()


JSON_SHAPES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=8,
).map(lambda value: json.dumps(value).encode())
"""Any JSON value: never a tree (no 'format' field with 'deft-tree/1' and nodes)."""

FILES = st.one_of(
    broken_trees(),
    JSON_SHAPES,
    st.binary(max_size=64),
    st.integers(2, 200).map(lambda depth: b"[" * depth * 10 + b"]" * depth * 10),
    st.binary(min_size=1, max_size=8).map(lambda junk: b'{"format": "deft-tree/1"' + junk),
)


@settings(max_examples=200)  # on top of the profile (ci: derandomized); a few ms an example
@given(FILES)
def test_malformed_trees_exit_2_with_one_line(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "tree.json"
    path.write_bytes(content)
    for command in ("inspect", "estimate-io"):
        result = CliRunner().invoke(main, [command, str(path)])
        assert result.exit_code == 2, (command, content, result.output)
        assert isinstance(result.exception, SystemExit)
        assert result.stdout == ""
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr
        assert [p.name for p in folder.iterdir()] == ["tree.json"]
