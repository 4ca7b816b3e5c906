"""tree.json, the user-facing tree format (`docs/tree-format.md`, schema beside it).

    {"format": "deft-tree/1",
     "attention": {"q_heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "float16"},
     "nodes": [{"id": 0, "parent": null, "tokens": 4000},
               {"id": 1, "parent": 0, "tokens": 200, "queries": 1}]}

Every error is a `TreeError` whose message names the node and the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from deft.tree import AttentionShape, Tree, TreeError

FORMAT = "deft-tree/1"
_NODE_FIELDS = {"id", "parent", "tokens", "queries"}
_ATTENTION_FIELDS = {"q_heads", "kv_heads", "head_dim", "dtype"}


def load_tree(source) -> Tree:
    """Read a tree from a tree.json path or from the already parsed dict."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as error:
            raise TreeError(f"{path}: cannot read: {error.strerror or error}") from None
        try:
            source = json.loads(text)
        except json.JSONDecodeError as error:
            raise TreeError(
                f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
            ) from None
    return tree_from_dict(source)


def tree_from_dict(data) -> Tree:
    """Build a Tree from the parsed tree.json dict, checking every field."""
    if not isinstance(data, dict):
        raise TreeError(f"a tree must be a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise TreeError(f"field 'format' must be {FORMAT!r}, got {data.get('format')!r}")
    unknown = set(data) - {"format", "attention", "nodes"}
    if unknown:
        raise TreeError(f"unknown top-level field(s): {', '.join(sorted(unknown))}")
    attention = _attention_from_dict(data.get("attention", {}))
    nodes = data.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise TreeError("field 'nodes' must be a non-empty list of node objects")
    ids, parents, tokens, queries = [], [], [], []
    for k, node in enumerate(nodes):
        where = f"node #{k}" if not isinstance(node, dict) or "id" not in node else f"node {node['id']!r}"
        if not isinstance(node, dict):
            raise TreeError(f"{where}: must be an object, got {type(node).__name__}")
        for field in ("id", "tokens"):
            if field not in node:
                raise TreeError(f"{where}: field '{field}' is missing")
        unknown = set(node) - _NODE_FIELDS
        if unknown:
            raise TreeError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        ids.append(node["id"])
        parents.append(node.get("parent"))
        tokens.append(node["tokens"])
        queries.append(node.get("queries"))
    explicit = [q is not None for q in queries]
    if any(explicit):
        # Nodes without the field take the default: 1 on a leaf, 0 on an inner node.
        has_child = {p for p in parents if p is not None}
        queries = [
            q if q is not None else (0 if i in has_child else 1) for i, q in zip(ids, queries)
        ]
    else:
        queries = None
    return Tree(ids, parents, tokens, queries, attention)


def tree_to_dict(tree: Tree) -> dict:
    """The tree.json dict of a tree; `tree_from_dict` of it gives back an equal tree."""
    ids = tree.node_ids
    nodes = []
    for v in range(tree.num_nodes):
        p = tree.parent[v]
        nodes.append(
            {
                "id": int(ids[v]),
                "parent": None if p < 0 else int(ids[p]),
                "tokens": int(tree.tokens[v]),
                "queries": int(tree.queries[v]),
            }
        )
    a = tree.attention
    return {
        "format": FORMAT,
        "attention": {
            "q_heads": a.q_heads,
            "kv_heads": a.kv_heads,
            "head_dim": a.head_dim,
            "dtype": a.dtype,
        },
        "nodes": nodes,
    }


def save_tree(tree: Tree, path) -> None:
    """Write a tree.json file."""
    Path(path).write_text(json.dumps(tree_to_dict(tree), indent=1) + "\n")


def _attention_from_dict(data) -> AttentionShape:
    if not isinstance(data, dict):
        raise TreeError(f"field 'attention' must be an object, got {type(data).__name__}")
    unknown = set(data) - _ATTENTION_FIELDS
    if unknown:
        raise TreeError(f"attention: unknown field(s) {', '.join(sorted(unknown))}")
    return AttentionShape(**data)
