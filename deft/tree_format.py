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
import re
from pathlib import Path

import numpy as np

from deft.tree import AttentionShape, Tree, TreeError

FORMAT = "deft-tree/1"
_NODE_FIELDS = {"id", "parent", "tokens", "queries"}
_ATTENTION_FIELDS = {"q_heads", "kv_heads", "head_dim", "dtype"}

MAX_NESTING = 64
"""Deepest JSON nesting a tree file may have (it needs 3; Python's parser recurses per level)."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_OPEN, _CLOSE = np.frombuffer(b"[{", dtype=np.uint8), np.frombuffer(b"]}", dtype=np.uint8)


def load_tree(source) -> Tree:
    """Read a tree from a tree.json path or from the already parsed dict."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise TreeError(f"{path}: cannot read: {error.strerror or error}") from None
        source = _parse(raw, path)
    return tree_from_dict(source)


def _parse(raw: bytes, path) -> object:
    """The JSON value of a tree file's bytes; TreeError for bad UTF-8, bad JSON or deep nesting."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TreeError(
            f"{path}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start})"
        ) from None
    depth = _nesting_depth(text)
    if depth > MAX_NESTING:
        raise TreeError(
            f"{path}: JSON nested {depth} levels deep; a tree file nests at most {MAX_NESTING}"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise TreeError(
            f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except ValueError as error:  # an integer past Python's digit limit
        raise TreeError(f"{path}: unreadable number: {error}") from None


def _nesting_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text, brackets inside strings excluded."""
    structure = np.frombuffer(_STRING.sub('""', text).encode("utf-8"), dtype=np.uint8)
    step = np.isin(structure, _OPEN).astype(np.int64) - np.isin(structure, _CLOSE)
    return int(np.cumsum(step).max(initial=0))


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
