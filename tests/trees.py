"""Hypothesis strategies for random trees and forests, shared by the test modules."""

from hypothesis import strategies as st

from deft.tree import AttentionShape, Tree


@st.composite
def trees(draw, max_nodes=30, max_tokens=40, max_roots=3, attention=None, max_queries_per_node=3):
    """A random forest: shuffled distinct ids, queries on leaves and inner nodes.

    Shapes range from chains (each node the child of the previous) to stars (all children of
    the first node); at least one query is guaranteed.
    """
    n = draw(st.integers(1, max_nodes))
    roots = draw(st.integers(1, min(max_roots, n)))
    shape = draw(st.sampled_from(["random", "chain", "star"]))
    parents = [None] * roots
    for k in range(roots, n):
        if shape == "chain":
            parents.append(k - 1)
        elif shape == "star":
            parents.append(0)
        else:
            parents.append(draw(st.integers(0, k - 1)))
    tokens = [draw(st.integers(1, max_tokens)) for _ in range(n)]
    queries = [draw(st.integers(0, min(t, max_queries_per_node))) for t in tokens]
    if sum(queries) == 0:
        queries[draw(st.integers(0, n - 1))] = 1
    ids = draw(st.permutations(range(0, 3 * n)))[:n]
    return Tree(
        ids,
        [None if p is None else ids[p] for p in parents],
        tokens,
        queries,
        attention or AttentionShape(),
    )
