"""The tree model: derived views against brute force, and the tree.json round trip."""

import numpy as np
import pytest
from hypothesis import given

from deft import Tree, TreeError, load_tree, tree_from_dict, tree_to_dict
from tests.trees import trees


def ancestors_by_walking(tree, v):
    """Node indices of v's ancestors and v itself, by parent pointers."""
    seen = set()
    while v >= 0:
        seen.add(int(v))
        v = tree.parent[v]
    return seen


@given(trees())
def test_euler_intervals_match_ancestry(tree):
    for v in range(tree.num_nodes):
        above = ancestors_by_walking(tree, v)
        inside = {u for u in range(tree.num_nodes) if tree.tin[u] <= tree.tin[v] <= tree.tout[u]}
        assert inside == above


@given(trees())
def test_preorder_is_dfs_with_ascending_children(tree):
    order = tree.preorder.tolist()
    assert sorted(order) == list(range(tree.num_nodes))
    # roots come in ascending order, each followed by its whole subtree
    expected = []
    stack = sorted(tree.roots.tolist(), reverse=True)
    while stack:
        v = stack.pop()
        expected.append(v)
        children = [u for u in range(tree.num_nodes) if tree.parent[u] == v]
        stack.extend(sorted(children, reverse=True))
    assert order == expected


@given(trees())
def test_layouts_and_visibility(tree):
    assert sorted(tree.flat_tokens.tolist()) == list(range(tree.num_tokens))
    # flattened order walks nodes in preorder, positions ascending
    nodes = tree.token_node[tree.flat_tokens]
    assert (np.diff(tree.tin[nodes]) >= 0).all()
    for q in range(tree.num_queries):
        v, j = tree.query_node[q], tree.query_position[q]
        assert tree.tokens[v] - tree.queries[v] <= j < tree.tokens[v]
        above = ancestors_by_walking(tree, v)
        brute = [
            (u in above and u != v) or (u == v and p <= j)
            for u, p in zip(tree.token_node.tolist(), tree.token_position.tolist())
        ]
        assert tree.visible(np.array(q), np.arange(tree.num_tokens)).tolist() == brute
        assert tree.visible_tokens[q] == sum(brute)
        assert tree.path(v).tolist() == sorted(above, key=lambda u: tree.depth[u])


@given(trees())
def test_json_round_trip_is_lossless(tree):
    data = tree_to_dict(tree)
    again = tree_from_dict(data)
    assert tree_to_dict(again) == data
    assert again.stats() == tree.stats()


def test_default_queries_one_per_leaf_and_stats():
    tree = tree_from_dict(
        {
            "format": "deft-tree/1",
            "nodes": [
                {"id": 5, "parent": None, "tokens": 10},
                {"id": 2, "parent": 5, "tokens": 3},
                {"id": 9, "parent": 5, "tokens": 4},
            ],
        }
    )
    assert tree.queries.tolist() == [1, 0, 1]  # nodes ordered by id: 2, 5, 9
    assert tree.stats()["sum_visible_tokens"] == 13 + 14
    assert tree.stats()["max_fanout"] == 2


def test_deep_chain_is_iterative():
    n = 100_000
    tree = Tree(list(range(n)), [None] + list(range(n - 1)), [1] * n)
    assert tree.depth.max() == n - 1
    assert tree.visible_tokens.tolist() == [n]
    assert tree.tout[0] == n - 1


def test_forest_queries_do_not_see_other_trees():
    tree = Tree([0, 1], [None, None], [3, 4], [1, 1])
    assert tree.visible(np.array([[0], [1]]), np.arange(7)[None, :]).sum(axis=1).tolist() == [3, 4]


BAD = {
    "unknown format": ({"format": "deft-tree/2", "nodes": [{"id": 0, "tokens": 1}]}, "format"),
    "no nodes": ({"format": "deft-tree/1", "nodes": []}, "nodes"),
    "not an object": ([1, 2], "JSON object"),
    "missing tokens": ({"format": "deft-tree/1", "nodes": [{"id": 0}]}, "node 0: field 'tokens' is missing"),
    "missing id": ({"format": "deft-tree/1", "nodes": [{"tokens": 3}]}, "node #0: field 'id' is missing"),
    "mistyped tokens": ({"format": "deft-tree/1", "nodes": [{"id": 0, "tokens": "7"}]}, "node 0: field 'tokens' must be an integer"),
    "float id": ({"format": "deft-tree/1", "nodes": [{"id": 1.5, "tokens": 2}]}, "field 'id' must be an integer"),
    "unknown field": ({"format": "deft-tree/1", "nodes": [{"id": 0, "tokens": 1, "colour": 1}]}, "node 0: unknown field(s) colour"),
    "duplicate id": ({"format": "deft-tree/1", "nodes": [{"id": 0, "tokens": 1}, {"id": 0, "tokens": 1}]}, "node 0: field 'id' is a duplicate"),
    "negative id": ({"format": "deft-tree/1", "nodes": [{"id": -1, "tokens": 1}]}, "node -1: field 'id' must be non-negative"),
    "unknown parent": ({"format": "deft-tree/1", "nodes": [{"id": 0, "tokens": 1, "parent": 7}]}, "node 0: field 'parent' names unknown node 7"),
    "self parent": ({"format": "deft-tree/1", "nodes": [{"id": 3, "tokens": 1, "parent": 3}]}, "node 3: field 'parent' closes a cycle"),
    "cycle": ({"format": "deft-tree/1", "nodes": [{"id": 0, "tokens": 1}, {"id": 1, "tokens": 1, "parent": 2}, {"id": 2, "tokens": 1, "parent": 1}]}, "closes a cycle"),
    "zero tokens": ({"format": "deft-tree/1", "nodes": [{"id": 0, "tokens": 0}]}, "node 0: field 'tokens' must be at least 1"),
    "negative queries": ({"format": "deft-tree/1", "nodes": [{"id": 0, "tokens": 4, "queries": -1}]}, "node 0: field 'queries' must be between 0 and its tokens (4)"),
    "too many queries": ({"format": "deft-tree/1", "nodes": [{"id": 0, "tokens": 4, "queries": 5}]}, "node 0: field 'queries' must be between 0 and its tokens (4)"),
    "no query": ({"format": "deft-tree/1", "nodes": [{"id": 0, "tokens": 4, "queries": 0}]}, "no query"),
    "heads do not divide": ({"format": "deft-tree/1", "attention": {"q_heads": 6, "kv_heads": 4}, "nodes": [{"id": 0, "tokens": 1}]}, "attention.q_heads (6) must be a multiple of attention.kv_heads (4)"),
    "zero heads": ({"format": "deft-tree/1", "attention": {"kv_heads": 0}, "nodes": [{"id": 0, "tokens": 1}]}, "attention.kv_heads must be a positive integer"),
    "huge head dim": ({"format": "deft-tree/1", "attention": {"head_dim": 4096}, "nodes": [{"id": 0, "tokens": 1}]}, "attention.head_dim must be at most 1024"),
    "unknown dtype": ({"format": "deft-tree/1", "attention": {"dtype": "int8"}, "nodes": [{"id": 0, "tokens": 1}]}, "attention.dtype must be one of"),
    "node beyond int32": ({"format": "deft-tree/1", "nodes": [{"id": 0, "tokens": 2**31}]}, "node 0: field 'tokens' is 2147483648, beyond the int32 index limit"),
    "tree beyond int32": ({"format": "deft-tree/1", "nodes": [{"id": 0, "tokens": 2**30}, {"id": 1, "parent": 0, "tokens": 2**30}]}, "beyond the int32 index limit"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_with_node_and_field(case):
    data, message = BAD[case]
    with pytest.raises(TreeError) as error:
        tree_from_dict(data)
    assert message in str(error.value)


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"format": "deft-tree/1",\n "nodes": [}')
    with pytest.raises(TreeError, match="malformed JSON at line 2"):
        load_tree(path)
