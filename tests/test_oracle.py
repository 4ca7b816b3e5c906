"""The oracle against a brute-force per-query loop, and the error measure."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deft.tree import AttentionShape, Tree
from reference import oracle, oracle_attention, rel_err
from tests.test_reference import inputs
from tests.trees import trees


def brute_force(tree: Tree, q, k, v, sm_scale=None) -> np.ndarray:
    """Per query and head, in Python: collect the path's tokens, softmax, weighted sum."""
    q, k, v = (x.to(torch.float64).numpy() for x in (q, k, v))
    q_heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    first_token = np.concatenate([[0], np.cumsum(tree.tokens)])
    out = np.zeros(q.shape)
    query = 0
    for node in range(tree.num_nodes):
        for position in range(tree.tokens[node] - tree.queries[node], tree.tokens[node]):
            tokens = list(range(first_token[node], first_token[node] + position + 1))
            ancestor = tree.parent[node]
            while ancestor >= 0:
                tokens += range(first_token[ancestor], first_token[ancestor + 1])
                ancestor = tree.parent[ancestor]
            for head in range(q_heads):
                kv_head = head // (q_heads // kv_heads)
                scores = k[tokens, kv_head] @ q[query, head] * scale
                weights = np.exp(scores - scores.max())
                out[query, head] = weights @ v[tokens, kv_head] / weights.sum()
            query += 1
    return out


@given(
    tree=st.sampled_from([(1, 1), (4, 1), (8, 2)]).flatmap(
        lambda h: trees(max_nodes=20, max_tokens=30, attention=AttentionShape(h[0], h[1], 16))
    ),
    scale=st.sampled_from([None, 0.05]),
)
def test_oracle_matches_brute_force(tree, scale):
    q, k, v = inputs(tree)
    out = oracle_attention(tree, q, k, v, sm_scale=scale)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), brute_force(tree, q, k, v, scale), rtol=1e-10, atol=1e-12)


def test_oracle_in_query_chunks():
    """Chunking over queries (here one query a chunk) changes nothing."""
    tree = Tree([0, 1, 2, 3], [None, 0, 0, 2], [30, 4, 9, 5], [2, 1, 0, 3], AttentionShape(4, 2, 64))
    q, k, v = inputs(tree)
    expected = oracle_attention(tree, q, k, v)
    with mock.patch.object(oracle, "ORACLE_ELEMENTS", 1):
        assert rel_err(oracle_attention(tree, q, k, v), expected) <= 1e-14


def test_oracle_fits_a_big_tree():
    """20k tokens x 256 queries, in query chunks; checked on a few queries alone."""
    leaves = 256
    tree = Tree(
        list(range(leaves + 1)), [None] + [0] * leaves, [20000 - 2 * leaves] + [2] * leaves,
        attention=AttentionShape(8, 2, 16),
    )
    q, k, v = inputs(tree, torch.float16)
    out = oracle_attention(tree, q, k, v)
    few = Tree([0, 1], [None, 0], [20000 - 2 * leaves, 2], attention=AttentionShape(8, 2, 16))
    for leaf in (0, 137, 255):
        tokens = torch.cat([torch.arange(few.tokens[0]), few.tokens[0] + 2 * leaf + torch.arange(2)])
        single = oracle_attention(few, q[leaf : leaf + 1], k[tokens], v[tokens])
        assert rel_err(out[leaf : leaf + 1], single) <= 1e-12


def test_oracle_gqa_is_repeated_kv_heads():
    tree = Tree([0, 1, 2], [None, 0, 0], [12, 3, 4], attention=AttentionShape(8, 2, 64))
    q, k, v = inputs(tree)
    repeated = Tree([0, 1, 2], [None, 0, 0], [12, 3, 4], attention=AttentionShape(8, 8, 64))
    expected = oracle_attention(repeated, q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1))
    assert rel_err(oracle_attention(tree, q, k, v), expected) <= 1e-14


def test_rel_err_is_the_worst_query():
    ref = torch.ones(3, 2, 4, dtype=torch.float64)
    out = ref.clone()
    assert rel_err(out, ref) == 0.0
    out[1, 0] *= 1.5  # query 1: ||diff|| = 0.5 * 2, ||ref|| = sqrt(8)
    out[2] *= 1.1  # query 2: 0.1
    assert rel_err(out, ref) == pytest.approx(1.0 / 8**0.5)
    assert rel_err(out.half(), ref) == pytest.approx(1.0 / 8**0.5, rel=1e-3)
