"""The node planner (`deft.fast_plan`) against the normative planner, and `TreeAttention`'s
default capacities against every plan it builds."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module loads

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from deft import workloads as wl  # noqa: E402
from deft.fast_plan import FAST_STRATEGIES, NodePlanner  # noqa: E402
from deft.plan import build_plan  # noqa: E402
from deft.plan_buffers import FIELDS, CapacityError, PageTable, plan_arrays, token_slots  # noqa: E402
from deft.strategies import KERNEL_STRATEGIES  # noqa: E402
from deft.tree import Tree  # noqa: E402
from deft.tree_attention import TreeAttention  # noqa: E402
from tests.buffer_checks import assert_buffers_hold  # noqa: E402
from tests.trees import trees  # noqa: E402

PLANNERS = {s: NodePlanner(s, shapes=4) for s in FAST_STRATEGIES}
"""Shared across examples, so that kept shapes are reused (and dropped) along the way."""


def page_table(tree: Tree, page_size: int, seed: int) -> PageTable:
    """Each node on fresh pages, the pages shuffled."""
    counts = -(-tree.tokens // page_size)
    page_ptr = np.concatenate([[0], np.cumsum(counts)])
    pages = np.random.default_rng(seed).permutation(int(page_ptr[-1])) + seed
    return PageTable(page_ptr, pages, page_size)


def sizes(strategy, chunk, group):
    return (None if strategy == "deft_node" else chunk), group


@settings(max_examples=300, deadline=None)
@given(
    tree=trees(max_nodes=30, max_tokens=40, max_roots=3, max_queries_per_node=3),
    strategy=st.sampled_from(FAST_STRATEGIES),
    page_size=st.sampled_from([1, 3, 16]),
    chunk=st.sampled_from([1, 5, 32, 128]),
    group=st.sampled_from([None, 1, 2, 5]),
    seed=st.integers(0, 5),
)
def test_node_planner_equals_the_reference_encoding(tree, strategy, page_size, chunk, group,
                                                      seed):
    """Every buffer field equals `plan_arrays` of `build_plan`'s plan, element for element."""
    chunk, group = sizes(strategy, chunk, group)
    table = page_table(tree, page_size, seed)
    page_ptr, pages = table.host_node_pages(tree)
    reference = plan_arrays(build_plan(strategy, tree, chunk, group, page_size), page_ptr,
                            pages, flat=True)
    fast = PLANNERS[strategy].arrays(tree, page_ptr, pages, page_size, chunk, group)
    for name in FIELDS:
        np.testing.assert_array_equal(fast[name], reference[name], err_msg=name)
    assert fast["max_slot"] == reference["max_slot"]
    np.testing.assert_array_equal(fast["slots"], reference["slots"][tree.flat_tokens])


def test_a_kept_shape_serves_trees_that_only_grew():
    """A decode step that grows the leaves reuses the shape and still plans exactly."""
    planner = NodePlanner("deft_flatten")
    for leaf_tokens in (1, 2, 130, 131):
        tree = wl.star(5, 300, leaf_tokens)
        table = page_table(tree, 4, 0)
        page_ptr, pages = table.host_node_pages(tree)
        fast = planner.arrays(tree, page_ptr, pages, 4, 64, 2)
        reference = plan_arrays(build_plan("deft_flatten", tree, 64, 2, 4), page_ptr, pages, True)
        for name in FIELDS:
            np.testing.assert_array_equal(fast[name], reference[name], err_msg=name)
    assert len(planner._shapes) == 1


def test_kept_entries_follow_each_chunk_s_queries():
    """Two steps of one shape whose chunks start on the same queries but end on different
    ones (the third chunk sees one query, then two): the second plans afresh."""
    planner = NodePlanner("deft_flatten")
    for tokens in ([4, 5, 1], [5, 3, 2]):
        tree = Tree([0, 1, 2], [None, 0, 0], tokens)
        page_ptr, pages = page_table(tree, 1, 0).host_node_pages(tree)
        fast = planner.arrays(tree, page_ptr, pages, 1, 3, None)
        reference = plan_arrays(build_plan("deft_flatten", tree, 3, None, 1), page_ptr, pages,
                                True)
        for name in FIELDS:
            np.testing.assert_array_equal(fast[name], reference[name], err_msg=name)


@pytest.mark.parametrize("page_ptr,pages", [
    ([0, 3, 4, 5], [1, 2, 99, 3, 4]),  # the largest page is node 0's third: unused
    ([0, 2, 3, 4], [1, 9, 3, 9]),  # the largest page held twice
    ([0, 2, 3, 4], [1, 9, 3, 5]),  # the largest page used and held once
])
def test_the_largest_slot_of_unusual_page_tables(page_ptr, pages):
    tree = Tree([0, 1, 2], [None, 0, 0], [5, 3, 2])
    page_ptr, pages = np.array(page_ptr), np.array(pages)
    reference = plan_arrays(build_plan("deft_flatten", tree, 4, None, 4), page_ptr, pages, True)
    fast = NodePlanner("deft_flatten").arrays(tree, page_ptr, pages, 4, 4)
    assert fast["max_slot"] == reference["max_slot"]


def test_node_planner_refuses_short_page_tables_and_other_strategies():
    tree = wl.star(2, 10, 3)
    with pytest.raises(ValueError, match="holds 10 tokens but the page table gives it 2 pages"):
        NodePlanner("deft_node").arrays(tree, np.array([0, 2, 3, 4]), np.arange(4), 4)
    with pytest.raises(ValueError, match="NodePlanner plans"):
        NodePlanner("radix")


@settings(max_examples=40, deadline=None)
@given(
    tree=trees(max_nodes=12, max_tokens=30, max_roots=2, max_queries_per_node=2),
    strategy=st.sampled_from(FAST_STRATEGIES),
    page_size=st.sampled_from([1, 4]),
)
def test_tree_attention_fast_path_plans_the_reference(tree, strategy, page_size):
    """With fixed sizes `plan` takes the node planner; the device buffers decode to the
    reference's partitions, and the plan's reference and slots are the normative ones."""
    chunk, group = sizes(strategy, 7, 2)
    attn = TreeAttention(strategy, chunk, group, max_queries=tree.num_queries,
                         max_tokens=tree.num_tokens, device="cpu")
    table = page_table(tree, page_size, 1)
    plan = attn.plan(tree, table)
    reference = build_plan(strategy, tree, chunk, group, page_size)
    assert plan.partition_sets() == reference.partition_sets()
    assert plan.reference.partition_sets() == reference.partition_sets()
    assert plan.num_entries == len(reference.query_index)
    assert plan.num_partitions == reference.num_partitions
    np.testing.assert_array_equal(plan.slots, token_slots(tree, *table.host_node_pages(tree),
                                                          page_size))


def test_the_issue_tree_fits_the_default_capacities():
    """A 40-token root with three 5-token leaves: deft_node(_chunk) used to need max_entries=6
    and get 3."""
    tree = Tree([0, 1, 2, 3], [None, 0, 0, 0], [40, 5, 5, 5])
    for strategy in KERNEL_STRATEGIES:
        attn = TreeAttention(strategy, max_queries=3, max_tokens=55, device="cpu")
        plan = attn.plan(tree, page_table(tree, 1, 0))
        assert plan.num_entries <= attn.max_entries


@settings(max_examples=60, deadline=None)
@given(
    tree=trees(max_nodes=20, max_tokens=30, max_roots=3, max_queries_per_node=3),
    strategy=st.sampled_from(KERNEL_STRATEGIES),
    fixed=st.booleans(),
    chunk=st.sampled_from([1, 4, 16]),
    spare=st.integers(0, 20),
    tight_paths=st.booleans(),
)
def test_default_capacities_fit_every_plan(tree, strategy, fixed, chunk, spare, tight_paths):
    """No CapacityError for a tree within max_queries / max_tokens (/ max_path_nodes), with
    the default sizes (tuned path) or fixed ones."""
    params = {}
    if fixed and strategy in ("flash_decoding", "radix", "tree_attention_s",
                              "deft_node_chunk", "deft_flatten"):
        params["chunk_size"] = chunk
    if fixed and strategy.startswith("deft"):
        params["group_size"] = 2
    if tight_paths and strategy in ("deft_node", "deft_node_chunk"):
        params["max_path_nodes"] = int(tree.depth[tree.query_node].max()) + 1
    attn = TreeAttention(strategy, max_queries=tree.num_queries + spare,
                         max_tokens=tree.num_tokens + spare, device="cpu", **params)
    plan = attn.plan(tree, page_table(tree, 2, 0))
    assert plan.num_entries <= attn.max_entries


def test_max_path_nodes():
    chain = wl.chain(6, 3)  # six nodes on the query's path
    attn = TreeAttention("deft_node", max_queries=1, max_tokens=18, max_path_nodes=6,
                         device="cpu")
    assert attn.max_entries == 6
    attn.plan(chain, page_table(chain, 1, 0))
    short = TreeAttention("deft_node_chunk", 4, max_queries=1, max_tokens=18,
                          max_path_nodes=5, device="cpu")
    assert short.max_entries == (18 - 5) // 4 + 5
    with pytest.raises(ValueError, match="max_path_nodes=5"):
        short.plan(chain, page_table(chain, 1, 0))
    with pytest.raises(ValueError, match="deft_flatten takes no max_path_nodes"):
        TreeAttention("deft_flatten", max_queries=1, max_tokens=18, max_path_nodes=5,
                      device="cpu")
    with pytest.raises(ValueError, match="max_path_nodes must be a positive integer"):
        TreeAttention("deft_node", max_queries=1, max_tokens=18, max_path_nodes=0, device="cpu")


def test_capacity_error_names_the_argument_and_the_value_to_pass():
    tree = Tree([0, 1, 2, 3], [None, 0, 0, 0], [40, 5, 5, 5])
    attn = TreeAttention("deft_node_chunk", max_queries=3, max_tokens=55, max_entries=3,
                         device="cpu")
    with pytest.raises(CapacityError, match=r"max_entries >= 6 .* pass max_entries=6"):
        attn.plan(tree, page_table(tree, 1, 0))


def test_for_trees_fits_every_step_of_a_run():
    run = wl.tot_run(3, depth=3, branching=3, prompt_tokens=50, min_tokens=2, max_tokens=9)
    trees = list(run)
    for strategy in KERNEL_STRATEGIES:
        attn = TreeAttention.for_trees(strategy, trees, device="cpu")
        assert attn.max_queries == max(t.num_queries for t in trees)
        assert attn.max_tokens == max(t.num_tokens for t in trees)
        for tree in trees:
            plan = attn.plan(tree, page_table(tree, 4, 0))
            assert plan.num_entries <= attn.max_entries
    node = TreeAttention.for_trees("deft_node", trees, device="cpu")
    assert node.max_path_nodes == max(int(t.depth.max()) + 1 for t in trees)
    assert node.max_entries == node.max_queries * node.max_path_nodes


def test_tree_cache_host_pages_equal_its_node_pages():
    from deft.cache import CacheError, PagedKVCache, TreeCache

    cache = TreeCache(PagedKVCache(64, 4, 1, 16))
    tree = Tree([5, 1, 9], [None, 5, 5], [9, 4, 6])
    cache.apply(tree)
    device_ptr, device_pages = cache.node_pages(tree)
    page_ptr, pages = cache.host_node_pages(tree)
    np.testing.assert_array_equal(page_ptr, device_ptr.cpu().numpy())
    np.testing.assert_array_equal(pages, device_pages.cpu().numpy())
    cache.grow(9, 7)  # the cache now holds more of node 9 than the tree uses: its first pages
    page_ptr, pages = cache.host_node_pages(tree)
    np.testing.assert_array_equal(pages, device_pages.cpu().numpy())
    with pytest.raises(CacheError, match="node 9: the tree holds 20 tokens"):
        cache.host_node_pages(Tree([5, 1, 9], [None, 5, 5], [9, 4, 20]))


def mixed_steps(seed, steps=16) -> list:
    """Trees of random steps: mostly the same nodes, each grown by a few tokens (the leaf-growth
    paths of the tree cache and the planner), else some leaves pruned and some nodes branched."""
    rng = np.random.default_rng(seed)
    parents, tokens, next_id, trees = {0: None}, {0: int(rng.integers(1, 20))}, 1, []
    for _ in range(steps):
        if rng.random() < 0.3:
            for leaf in sorted(set(parents) - set(parents.values()))[1:]:
                if rng.random() < 0.4:
                    del parents[leaf], tokens[leaf]
            for parent in rng.choice(sorted(parents), size=int(rng.integers(0, 3))).tolist():
                parents[next_id], tokens[next_id] = parent, int(rng.integers(1, 6))
                next_id += 1
        else:
            for node in tokens:
                tokens[node] += int(rng.integers(0, 3))
        ids = sorted(parents)
        trees.append(Tree(ids, [parents[i] for i in ids], [tokens[i] for i in ids]))
    return trees


def run_of(kind, seed):
    if kind == "mixed":
        return mixed_steps(seed)
    if kind == "tot":
        return wl.tot_run(seed, depth=3, branching=3, prompt_tokens=12, min_tokens=1,
                          max_tokens=5, keep=2)
    if kind == "token_tree":
        return wl.token_tree_run(seed, size=12, depth=3, prompt_tokens=20, steps=8)
    return wl.fewshot(10 + seed, 3, 12)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 50),
    kind=st.sampled_from(["tot", "token_tree", "fewshot", "mixed"]),
    strategy=st.sampled_from(FAST_STRATEGIES),
    page_size=st.sampled_from([1, 4]),
    chunk=st.sampled_from([3, 16]),
    group=st.sampled_from([None, 2]),
    followed=st.booleans(),
)
def test_a_planner_followed_over_a_whole_run_plans_every_step_exactly(
        seed, kind, strategy, page_size, chunk, group, followed):
    """One planner over every step of a random run (kept shapes, the last step's entries
    reused when the chunks' queries did not change, its slots up to the first page run that
    changed) equals the reference at each step; the pages come from a tree cache following
    the run, or are shuffled afresh every step."""
    follow_a_run(seed, kind, strategy, page_size, chunk, group, followed)


def follow_a_run(seed, kind, strategy, page_size, chunk, group, followed):
    from deft.cache import PagedKVCache, TreeCache

    cache = TreeCache(PagedKVCache(4096, page_size, 1, 4))
    run = run_of(kind, seed)
    chunk, group = sizes(strategy, chunk, group)
    planner = NodePlanner(strategy, shapes=2)
    for tree in run:
        if followed:
            cache.apply(tree)
            page_ptr, pages = cache.host_node_pages(tree)
        else:
            page_ptr, pages = page_table(tree, page_size, seed).host_node_pages(tree)
        fast = planner.arrays(tree, page_ptr, pages, page_size, chunk, group)
        reference = plan_arrays(build_plan(strategy, tree, chunk, group, page_size), page_ptr,
                                pages, flat=True)
        for name in FIELDS:
            np.testing.assert_array_equal(fast[name], reference[name], err_msg=name)
        assert fast["max_slot"] == reference["max_slot"]


RUN_STEPS = dict(
    seed=st.integers(0, 50),
    kind=st.sampled_from(["tot", "token_tree", "fewshot", "mixed"]),
    strategy=st.sampled_from(FAST_STRATEGIES),
    page_size=st.sampled_from([1, 4]),
    sizes_by_step=st.lists(st.tuples(st.sampled_from([2, 3, 16]),
                                     st.sampled_from([None, 1, 2])), min_size=1, max_size=4),
    rows_per_query=st.lists(st.sampled_from([0, 2, 6, 64]), min_size=1, max_size=3),
)
"""A run of decode steps whose chunk and group sizes change from step to step (`planned_steps`),
its partial rows spaced by a number of rows a query (changing from step to step where several
are drawn) that fits every query, some, or none."""


def planned_steps(kind, seed, strategy, page_size, sizes_by_step):
    """(step, tree, page_ptr, pages, chunk, group) over a run applied to a tree cache."""
    from deft.cache import PagedKVCache, TreeCache

    cache = TreeCache(PagedKVCache(4096, page_size, 1, 4))
    for step, tree in enumerate(run_of(kind, seed)):
        cache.apply(tree)
        page_ptr, pages = cache.host_node_pages(tree)
        chunk, group = sizes(strategy, *sizes_by_step[step % len(sizes_by_step)])
        yield step, tree, page_ptr, pages, chunk, group


@settings(max_examples=40, deadline=None)
@given(**RUN_STEPS, twice=st.lists(st.booleans(), min_size=16, max_size=16))
def test_kept_arrays_hold_what_they_claim_step_after_step(
        seed, kind, strategy, page_size, sizes_by_step, rows_per_query, twice):
    """One planner over a run whose chunk and group sizes change from step to step, some trees
    planned twice: every step equals the reference, and what it says it keeps from the last
    step's arrays (the very same read-only array, or ``kept``'s shared prefix of one) holds."""
    planner = NodePlanner(strategy, shapes=2)
    last = {}
    for step, tree, page_ptr, pages, chunk, group in planned_steps(
            kind, seed, strategy, page_size, sizes_by_step):
        spacing = rows_per_query[step % len(rows_per_query)]
        reference = plan_arrays(build_plan(strategy, tree, chunk, group, page_size),
                                page_ptr, pages, flat=True, rows_per_query=spacing)
        for _ in range(2 if twice[step % 16] else 1):
            fast = planner.arrays(tree, page_ptr, pages, page_size, chunk, group, spacing)
            for name in FIELDS:
                np.testing.assert_array_equal(fast[name], reference[name],
                                              err_msg=f"step {step}: {name}")
                if fast[name] is last.get(name):
                    assert not fast[name].flags.writeable
            for name, (array, n) in fast["kept"].items():
                assert array is last[name] and not array.flags.writeable
                np.testing.assert_array_equal(array[:n], fast[name][:n])
            last = {name: fast[name] for name in FIELDS}


@settings(max_examples=40, deadline=None)
@given(**RUN_STEPS)
def test_a_call_s_arrays_hold_their_values_through_the_next_call(
        seed, kind, strategy, page_size, sizes_by_step, rows_per_query):
    """The planner writes its slots and entry queries in turns (`deft.turn_buffers`): the
    arrays one call returns keep their values through the next call (a plan is read while the
    next one is built), over runs whose branches die and whose sizes change."""
    planner = NodePlanner(strategy, shapes=2)
    previous = None
    for step, tree, page_ptr, pages, chunk, group in planned_steps(
            kind, seed, strategy, page_size, sizes_by_step):
        fast = planner.arrays(tree, page_ptr, pages, page_size, chunk, group,
                              rows_per_query[step % len(rows_per_query)])
        if previous is not None:
            for name in (*FIELDS, "slots"):
                np.testing.assert_array_equal(previous[0][name], previous[1][name],
                                              err_msg=f"step {step - 1}: {name}")
        previous = (fast, {name: np.array(fast[name]) for name in (*FIELDS, "slots")})


def test_a_stale_plan_s_slots_are_refused():
    """The node planner's slots are written in turns: a plan's slots are read while it is
    the latest plan (as its partitions are)."""
    tree, grown = wl.star(3, 20, 2), wl.star(3, 20, 3)
    attn = TreeAttention("deft_flatten", 4, 2, max_queries=3, max_tokens=40, device="cpu")
    first = attn.plan(tree, page_table(tree, 2, 0))
    attn.plan(grown, page_table(grown, 2, 0))
    with pytest.raises(ValueError, match="plan is stale"):
        first.slots


def test_a_step_whose_chunks_keep_their_queries_reuses_the_entries():
    planner = NodePlanner("deft_flatten")
    first, second = (planner.arrays(tree, *page_table(tree, 1, 0).host_node_pages(tree), 1,
                                    4096, 2) for tree in (wl.star(3, 100, 5), wl.star(3, 100, 6)))
    assert second["entry_row"] is first["entry_row"]
    assert not second["entry_row"].flags.writeable
    np.testing.assert_array_equal(second["part_tokens"], [118, 118])  # 3 queries, groups of 2


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 50),
    kind=st.sampled_from(["tot", "token_tree", "fewshot", "mixed"]),
    strategy=st.sampled_from(FAST_STRATEGIES),
    page_size=st.sampled_from([1, 4]),
    chunk=st.sampled_from([2, 16]),
    group=st.sampled_from([None, 2]),
    given_reference=st.lists(st.booleans(), min_size=16, max_size=16),
)
def test_buffers_followed_over_a_whole_run_hold_every_step_from_scratch(
        seed, kind, strategy, page_size, chunk, group, given_reference):
    """`TreeAttention.plan` over every step of a random run, its cache following the run: the
    buffers it refills step after step (fields kept from the last plan skipped, the slots
    written from the first page run that changed) hold what a from-scratch encoding of the
    step's reference plan gives, also when some steps pass their reference (the other path)."""
    from deft.cache import PagedKVCache, TreeCache

    run = run_of(kind, seed)
    chunk, group = sizes(strategy, chunk, group)
    attn = TreeAttention.for_trees(strategy, list(run), chunk, group, device="cpu")
    cache = TreeCache(PagedKVCache(4096, page_size, 1, 4))
    for step, tree in enumerate(run):
        cache.apply(tree)
        page_ptr, pages = cache.host_node_pages(tree)
        reference = build_plan(strategy, tree, chunk, group, page_size)
        expected = plan_arrays(reference, page_ptr, pages, True, attn.rows_per_query)
        attn.plan(tree, cache, reference if given_reference[step % 16] else None)
        assert_buffers_hold(attn.buffers, expected, f"step {step}: ")


POSITIONS = st.lists(st.integers(0, 60), min_size=1, max_size=12, unique=True)
"""Queries' flattened positions, for the entry tests."""
CHUNKS = st.lists(st.one_of(st.just((0, 61)), st.tuples(st.integers(0, 60), st.integers(0, 61))),
                  min_size=1, max_size=40)
"""Chunks as (start, reach), some seen by every query."""


def dense_entries(seen, rows_per_query):
    """The oracle of the entry arrays of a [chunks, queries] visibility: (entry queries,
    chunk-major; each entry's row, a query's in chunk order from query n's first row, n x
    ``rows_per_query`` where every query's rows fit, else right after query n - 1's; each
    query's first and end row, interleaved)."""
    chunk_of, query_of = seen.nonzero()  # chunk-major, a chunk's queries ascending
    per_query = seen.sum(axis=0)
    spaced = rows_per_query > 0 and (per_query <= rows_per_query).all()
    first = np.arange(len(per_query)) * rows_per_query if spaced else \
        np.cumsum(per_query) - per_query
    rank = np.array([seen[:c, q].sum() for c, q in zip(chunk_of, query_of)], dtype=np.int64)
    row = first[query_of] + rank
    return query_of, row, np.stack([first, first + per_query], axis=1).ravel()


@settings(max_examples=300, deadline=None)
@given(positions=POSITIONS, chunks=CHUNKS, shuffled=st.booleans(),
       group=st.sampled_from([0, 1, 3]), rows_per_query=st.sampled_from([0, 1, 5, 40]))
def test_compiled_entries_equal_the_dense_comparison(positions, chunks, shuffled, group,
                                                     rows_per_query):
    """The chunks' runs of queries in flattened order (`deft.plan_entries.chunk_ranks`) and the
    entries written from them (`write_entries`) give the dense comparison's entries and rows
    (chunk-major entries, a query's rows in chunk order from its first row), whether or not
    the queries' ids follow their flattened positions, and partitions of at most ``group``
    queries."""
    from deft.plan_entries import chunk_ranks, write_entries

    query_flat = np.array(positions if shuffled else sorted(positions), dtype=np.int64)
    start, reach = (np.array(x, dtype=np.int64) for x in zip(*chunks))
    seen = (start[:, None] <= query_flat) & (query_flat < reach[:, None])
    flat_query = np.argsort(query_flat)  # the query at each flattened rank
    none = np.zeros(0, dtype=np.int64)
    lo, hi, count, partitions, _, _ = chunk_ranks(start, reach, query_flat, flat_query, group,
                                                  none, none)
    entry_query, entry_row = (np.full(count, -1, dtype=np.int32) for _ in range(2))
    part_chunk, part_entry, query_rows, spaced = write_entries(
        lo, hi, flat_query, bool((flat_query == np.arange(len(flat_query))).all()), group,
        partitions, 0, entry_query, entry_row, rows_per_query, 0)
    for values, want in zip((entry_query, entry_row, query_rows),
                            dense_entries(seen, rows_per_query)):
        np.testing.assert_array_equal(values, want)
    assert spaced == (rows_per_query > 0 and (seen.sum(axis=0) <= rows_per_query).all())
    per_chunk = seen.sum(axis=1)
    sizes_ = np.diff(part_entry)
    assert (sizes_ > 0).all() and (group == 0 or (sizes_ <= group).all())
    np.testing.assert_array_equal(np.bincount(part_chunk, sizes_, len(chunks)), per_chunk)
    assert (np.diff(part_chunk) >= 0).all()


@pytest.mark.gpu  # pinned staging and non-blocking copies
@pytest.mark.parametrize("kind", ["tot", "token_tree", "fewshot"])
def test_device_buffers_followed_over_a_run_hold_every_step(kind):
    """On a CUDA device the buffers refilled step after step (only what changed copied) read
    back each step's from-scratch encoding."""
    from deft.cache import PagedKVCache, TreeCache

    run = run_of(kind, 3)
    attn = TreeAttention.for_trees("deft_flatten", list(run), 4, 2, device="cuda")
    cache = TreeCache(PagedKVCache(4096, 4, 1, 4))
    for step, tree in enumerate(run):
        cache.apply(tree)
        expected = plan_arrays(build_plan("deft_flatten", tree, 4, 2, 4),
                               *cache.host_node_pages(tree), True, attn.rows_per_query)
        attn.plan(tree, cache)
        assert_buffers_hold(attn.buffers, expected, f"step {step}: ")


@pytest.mark.gpu  # the driver's copies (deft.driver_copies)
def test_device_buffers_planned_on_a_fresh_thread_take_strided_copies():
    """Planned from a thread that has no CUDA context current (an overlap scheduler's), with
    capacities far above the run's (the entry fields' changes one strided copy), the device
    buffers read back each step's from-scratch encoding."""
    import threading

    from deft.cache import PagedKVCache, TreeCache

    run = run_of("fewshot", 3)
    attn = TreeAttention("deft_flatten", 4, 2, max_queries=256, max_tokens=8192, device="cuda")
    upload, heights = attn.buffers._upload, []
    plain = upload.upload
    upload.upload = lambda copies: (heights.extend(c[2] for c in copies), plain(copies))
    cache = TreeCache(PagedKVCache(4096, 4, 1, 4))
    for step, tree in enumerate(run):
        cache.apply(tree)
        expected = plan_arrays(build_plan("deft_flatten", tree, 4, 2, 4),
                               *cache.host_node_pages(tree), True, attn.rows_per_query)
        failed = []
        thread = threading.Thread(target=lambda: _plan_or_keep(attn, tree, cache, failed))
        thread.start()
        thread.join()
        assert not failed, failed
        assert_buffers_hold(attn.buffers, expected, f"step {step}: ")
    assert max(heights) > 1


def _plan_or_keep(attn, tree, cache, failed):
    try:
        attn.plan(tree, cache)
    except Exception as error:  # raised on the thread: the test reads it back
        failed.append(error)
