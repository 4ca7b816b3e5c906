"""deft.cache: the page pool, the tree cache's rules, random branch/prune/grow sequences, whole
runs replayed, and running out of pages."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from deft import workloads as w
from deft.cache import CacheError, OutOfPagesError, PagedKVCache, TreeCache, pages_for
from deft.tree import Tree


def small_pool(num_pages=64, page_size=4):
    """A float32 pool with one KV head of dim 2: K holds (node id, position) exactly."""
    return PagedKVCache(num_pages, page_size, kv_heads=1, head_dim=2, dtype=torch.float32)


def signature(node_ids, positions):
    """K of a token: (node id, position); V: its negation. [n, 1, 2]"""
    k = torch.stack([torch.as_tensor(node_ids), torch.as_tensor(positions)], dim=1).float()
    return k[:, None, :], -k[:, None, :]


def write_new(cache, tree, slots, before):
    """Write signatures of the tokens `apply` added; `before` maps id -> tokens held before."""
    new = tree.token_position >= np.array([before.get(i, 0) for i in tree.node_ids])[tree.token_node]
    assert len(slots) == new.sum()
    k, v = signature(tree.node_ids[tree.token_node[new]], tree.token_position[new])
    cache.pool.write(slots, k, v)


def assert_contents(cache, tree):
    """Every token of `tree` reads back its own signature through token_slots."""
    k, v = cache.pool.gather(cache.token_slots(tree))
    assert np.array_equal(cache.host_token_slots(tree), cache.token_slots(tree).numpy())
    expected_k, expected_v = signature(tree.node_ids[tree.token_node], tree.token_position)
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v)


def state(cache):
    """Everything observable about a cache, to compare before and after a refused operation."""
    return (
        cache.pool.free_pages(),
        {i: (cache.tokens(i), cache.page_table(i).tolist(), cache.is_live(i)) for i in cache},
    )


def replay(run, page_size=4, check_every=1):
    """Replay a run on a pool just large enough; check invariants and contents as it goes,
    and the slots, free list and page table against a cache taking apply's general path
    (changed in between by a grow of 0 tokens)."""
    peak = max(pages_for(tree, page_size) for tree in run)
    cache = TreeCache(small_pool(peak, page_size))
    general = TreeCache(small_pool(peak, page_size))
    held, written = {}, 0
    for i, tree in enumerate(run):
        slots = cache.apply(tree)
        if len(general):
            general.grow(next(node for node in general if general.is_live(node)), 0)
        assert torch.equal(slots, general.apply(tree))
        assert cache.pool.free_pages() == general.pool.free_pages()
        for got, expected in zip(cache.host_node_pages(tree), general.host_node_pages(tree)):
            assert np.array_equal(got, expected)
        write_new(cache, tree, slots, held)
        written += len(slots)
        held = dict(zip(tree.node_ids.tolist(), tree.tokens.tolist()))
        assert cache.pool.num_free == peak - pages_for(tree, page_size)
        if i % 3 != 1:  # some steps unlisted: the next listing starts from an older one
            for got, expected in zip(cache.host_node_pages(tree), cache.node_pages(tree)):
                assert np.array_equal(got, expected.numpy())
        if i % check_every == 0 or i == len(run) - 1:
            cache.check()
            assert_contents(cache, tree)
            assert cache.tree() is tree
    return cache, written


# ---------------------------------------------------------------------------- the pool
def test_pool_allocate_and_free():
    pool = small_pool(4)
    assert pool.k.shape == (4, 4, 1, 2) and pool.num_free == 4
    pages = pool.allocate(3)
    assert pages == [0, 1, 2] and pool.num_free == 1
    with pytest.raises(OutOfPagesError, match="needs 2 pages but only 1 of 4 are free"):
        pool.allocate(2)
    assert pool.num_free == 1
    pool.free([1])
    with pytest.raises(CacheError, match="double free"):
        pool.free([1])
    with pytest.raises(CacheError, match="double free"):
        pool.free(np.array([2, 2]))  # a page twice in one call: none freed
    assert pool.num_free == 2 and not pool._is_free[2]
    assert pool.allocate(1) == [1]


def test_pool_refuses_a_negative_allocation_and_keeps_its_pages():
    pool = PagedKVCache(4, 2, 1, 2)
    with pytest.raises(ValueError, match="cannot take -1 pages"):
        pool.allocate(-1)
    assert pool.num_free == 4 and pool.free_pages() == [3, 2, 1, 0]


def test_pool_write_checks_shapes():
    pool = small_pool(2)
    with pytest.raises(ValueError, match=r"k must have shape \[1, 1, 2\]"):
        pool.write(torch.tensor([0]), torch.zeros(1, 2), torch.zeros(1, 1, 2))


# ---------------------------------------------------------------------------- the tree cache
def test_nodes_start_on_fresh_pages_and_prune_frees_when_unneeded():
    cache = TreeCache(small_pool(16, page_size=4))
    cache.add_node(0, None, tokens=5)
    cache.add_node(1, 0, tokens=1)
    cache.add_node(2, 0)
    cache.grow(2, 9)
    assert [len(cache.page_table(i)) for i in (0, 1, 2)] == [2, 1, 3]
    assert cache.page_table(0).dtype == torch.int32
    cache.check()
    cache.prune(0)  # still needed by its children
    assert 0 in cache and not cache.is_live(0) and cache.pool.num_free == 10
    cache.prune(1)
    assert 1 not in cache and 0 in cache and cache.pool.num_free == 11
    cache.prune(2)  # the last live descendant: frees node 0 too
    assert len(cache) == 0 and cache.pool.num_free == 16
    cache.check()


def test_write_slots_and_planner_views():
    cache = TreeCache(small_pool(16, page_size=4))
    cache.add_node(7, None, tokens=6)
    cache.add_node(3, 7, tokens=3)
    for node in (7, 3):
        positions = np.arange(cache.tokens(node))
        cache.write(node, positions, *signature([node] * len(positions), positions))
    tree = cache.tree()
    assert tree.node_ids.tolist() == [3, 7] and tree.num_queries == 1
    page_ptr, pages = cache.node_pages(tree)
    assert page_ptr.dtype == torch.int32 and pages.dtype == torch.int32
    assert page_ptr.tolist() == [0, 1, 3]
    assert pages.tolist() == cache.page_table(3).tolist() + cache.page_table(7).tolist()
    slots = cache.token_slots(tree)
    assert slots.dtype == torch.int64 and len(slots) == 9
    assert_contents(cache, tree)
    with pytest.raises(CacheError, match="positions"):
        cache.slots(3, [3])
    bigger = Tree([7, 3], [None, 7], [6, 4])
    with pytest.raises(CacheError, match="apply the tree first"):
        cache.token_slots(bigger)


def test_cache_refusals():
    cache = TreeCache(small_pool(4))
    cache.add_node(0, None, tokens=1)
    with pytest.raises(CacheError, match="already"):
        cache.add_node(0)
    with pytest.raises(CacheError, match="not in the cache"):
        cache.add_node(1, parent=5)
    with pytest.raises(OutOfPagesError, match="needs 4 more pages but only 3"):
        cache.add_node(1, 0, tokens=13)
    with pytest.raises(OutOfPagesError):
        cache.grow(0, 16)
    assert 1 not in cache and cache.tokens(0) == 1
    cache.prune(0)
    with pytest.raises(CacheError, match="not a live node"):
        cache.grow(0, 1)
    cache.check()


# ---------------------------------------------------------------------------- apply
def test_apply_out_of_pages_leaves_the_cache_as_it_was():
    cache = TreeCache(small_pool(10, page_size=4))
    cache.apply(w.star(2, 8, 4))  # 4 pages
    before = state(cache)
    with pytest.raises(OutOfPagesError, match=r"needs 10 more pages but only 6 of 10 are free"):
        cache.apply(w.star(3, 8, 13))  # 3 leaves of 4 pages: 10 more than the 4 held
    assert state(cache) == before
    cache.check()
    # Pages of pruned nodes count as free for the same step.
    cache.apply(Tree([0, 5, 6], [None, 0, 0], [8, 16, 16]))
    assert cache.pool.num_free == 0 and sorted(cache) == [0, 5, 6]
    cache.check()


def test_apply_refuses_reparenting_and_shrinking():
    cache = TreeCache(small_pool())
    cache.apply(w.chain(3, 2))
    before = state(cache)
    with pytest.raises(CacheError, match="parent"):
        cache.apply(Tree([0, 1, 2], [None, 0, 0], [2, 2, 2]))
    with pytest.raises(CacheError, match="fewer than"):
        cache.apply(w.chain(3, 1))
    assert state(cache) == before


def test_apply_revives_a_pruned_node_it_keeps():
    cache = TreeCache(small_pool())
    cache.apply(w.chain(2, 5))
    pages = cache.page_table(0).tolist()
    cache.prune(0)  # kept for node 1
    slots = cache.apply(Tree([0], [None], [5]))  # node 1 goes, node 0 stays
    assert len(slots) == 0 and cache.page_table(0).tolist() == pages and cache.is_live(0)
    cache.check()


def test_apply_of_grown_nodes_out_of_pages_leaves_the_cache_as_it_was():
    cache = TreeCache(small_pool(3, page_size=4))
    cache.apply(Tree([0, 1], [None, 0], [4, 4]))
    before = state(cache)
    with pytest.raises(OutOfPagesError, match=r"needs 2 more pages but only 1 of 3 are free"):
        cache.apply(Tree([0, 1], [None, 0], [4, 12]))
    assert state(cache) == before


@settings(max_examples=60, deadline=None)
@given(page_size=st.integers(1, 5), data=st.data())
def test_apply_of_grown_nodes_takes_the_pages_of_any_other_apply(page_size, data):
    """Steps that only grow nodes (apply's path for the nodes of the last applied tree), mixed
    with branch and prune steps, give the same pages and slots as a cache changed in between
    (a grow by 0 tokens: apply then takes its general path)."""
    fast, general = TreeCache(small_pool(2000, page_size)), TreeCache(small_pool(2000, page_size))
    parents, tokens, next_id = {0: None}, {0: data.draw(st.integers(1, 9))}, 1
    for _ in range(data.draw(st.integers(1, 12))):
        if data.draw(st.booleans()):  # prune some leaves, branch some nodes
            leaves = sorted(set(parents) - set(parents.values()))
            for node in data.draw(st.lists(st.sampled_from(leaves), max_size=len(leaves) - 1,
                                           unique=True)):
                del parents[node], tokens[node]
            for parent in data.draw(st.lists(st.sampled_from(sorted(parents)), max_size=3)):
                parents[next_id], tokens[next_id] = parent, data.draw(st.integers(1, 6))
                next_id += 1
        else:  # grow nodes, a few tokens each (some by none)
            for node in sorted(tokens):
                tokens[node] += data.draw(st.integers(0, page_size + 1))
        ids = sorted(parents)
        tree = Tree(ids, [parents[i] for i in ids], [tokens[i] for i in ids])
        if len(general):
            general.grow(next(i for i in general if general.is_live(i)), 0)
        assert torch.equal(fast.apply(tree), general.apply(tree))
        assert state(fast) == state(general)
        fast.check()
        for got, expected in zip(fast.host_node_pages(tree), general.node_pages(tree)):
            assert np.array_equal(got, expected.numpy())
        for got, expected in zip(general.host_node_pages(tree), general.node_pages(tree)):
            assert np.array_equal(got, expected.numpy())  # from what the general apply took


def apply_or_error(cache, tree):
    """apply's slots, or its error's type and message."""
    try:
        return cache.apply(tree).tolist()
    except (CacheError, OutOfPagesError) as error:
        return type(error), str(error)


@settings(max_examples=80, deadline=None)
@given(page_size=st.integers(1, 5), num_pages=st.integers(8, 80), data=st.data())
def test_apply_of_replaced_subtrees_takes_the_pages_of_the_general_apply(page_size, num_pages,
                                                                          data):
    """Speculative-like steps (whole subtrees dropped, new ones added under kept nodes, kept
    nodes grown; ids far apart, so that their set's order is not theirs) and refused ones (a
    kept node moved or shrunk, too few pages) through apply's path for a cache holding the last
    applied tree give the slots, errors, pages and free list of its general path (the cache
    changed in between, by a grow of 0 tokens)."""
    fast = TreeCache(small_pool(num_pages, page_size))
    general = TreeCache(small_pool(num_pages, page_size))
    parents, tokens, next_id = {0: None}, {0: data.draw(st.integers(1, 9))}, 1
    for _ in range(data.draw(st.integers(1, 10))):
        step_parents, step_tokens = dict(parents), dict(tokens)
        for node in data.draw(st.lists(st.sampled_from(sorted(parents)), max_size=3)):
            if node in step_parents and step_parents[node] is not None:  # drop its subtree
                below = {node}
                for other in sorted(step_parents):  # ids grow downwards: parents come first
                    if step_parents[other] in below:
                        below.add(other)
                for other in below:
                    del step_parents[other], step_tokens[other]
        for node in sorted(step_tokens):
            step_tokens[node] += data.draw(st.integers(0, page_size + 1))
        for parent in data.draw(st.lists(st.sampled_from(sorted(step_parents)), max_size=6)):
            next_id += data.draw(st.integers(1, 3000))
            step_parents[next_id], step_tokens[next_id] = parent, data.draw(st.integers(1, 6))
        fault = data.draw(st.sampled_from([None, None, "moved", "shrunk"]))
        kept = sorted(set(step_parents) & set(parents) - {0})
        if fault == "moved" and kept:
            step_parents[data.draw(st.sampled_from(kept))] = None
        elif fault == "shrunk" and tokens[0] > 1:
            step_tokens[0] = tokens[0] - 1
        ids = sorted(step_parents)
        tree = Tree(ids, [step_parents[i] for i in ids], [step_tokens[i] for i in ids])
        if len(general):
            general.grow(next(i for i in general if general.is_live(i)), 0)
        before = state(fast)
        result = apply_or_error(fast, tree)
        assert result == apply_or_error(general, tree)
        assert state(fast) == state(general)
        if isinstance(result, tuple):  # refused: nothing changed
            assert state(fast) == before
            continue
        fast.check()
        assert fast.tree() is tree
        for got, expected in zip(fast.host_node_pages(tree), general.node_pages(tree)):
            assert np.array_equal(got, expected.numpy())
        parents, tokens = step_parents, step_tokens


def test_replay_fewshot():
    replay(w.fewshot(prompt_tokens=37, width=5, iterations=30))


def test_replay_synthetic_runs():
    replay(w.tot_run(1, depth=3, branching=4, prompt_tokens=30, min_tokens=1, max_tokens=20, keep=2))
    replay(w.token_tree_run(2, size=20, depth=3, prompt_tokens=9, steps=15))


def test_replay_real_reasoning():
    path = w.found_workload_files()["reasoning/docmergeToT.json"]
    run = w.reasoning(path, 0)
    cache, written = replay(run, page_size=16, check_every=200)
    values = [n["value"] for n in json.loads(path.read_text())[0]["data"].values()]
    assert written == sum(values)  # the prompt once, then every generated token once
    assert sorted(cache) == run.tree(-1).node_ids.tolist()


def test_replay_real_speculative():
    path = w.found_workload_files()["speculative/APPS_tree_size64.json"]
    run = w.speculative(path, prompt_tokens=100, steps=12)
    _, written = replay(run, page_size=16)
    assert written == run.tree(-1).tokens[0] + 63 * 12


# ---------------------------------------------------------------------------- random sequences
class CacheMachine(RuleBasedStateMachine):
    """Random add / grow / prune / write / apply against a model of which nodes must be held."""

    @initialize(page_size=st.integers(1, 5), num_pages=st.integers(1, 30))
    def start(self, page_size, num_pages):
        self.cache = TreeCache(small_pool(num_pages, page_size))
        self.parent, self.tokens, self.live = {}, {}, set()
        self.next_id = 0

    def held(self):
        """Live nodes and their ancestors: what the cache must hold."""
        held = set()
        for node in self.live:
            while node is not None and node not in held:
                held.add(node)
                node = self.parent[node]
        return held

    def refused(self, action):
        """Run an action; if it runs out of pages, check that it changed nothing."""
        before = state(self.cache)
        try:
            action()
        except OutOfPagesError:
            assert state(self.cache) == before
            return True
        return False

    def write(self, node, first, last):
        positions = np.arange(first, last)
        self.cache.write(node, positions, *signature([node] * len(positions), positions))

    @rule(data=st.data(), tokens=st.integers(0, 9))
    def add(self, data, tokens):
        held = sorted(self.held())
        parent = data.draw(st.sampled_from([None, *held]))
        node = self.next_id
        if not self.refused(lambda: self.cache.add_node(node, parent, tokens)):
            self.next_id += 1
            self.parent[node], self.tokens[node] = parent, tokens
            self.live.add(node)
            self.write(node, 0, tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(0, 9))
    def grow(self, data, n):
        node = data.draw(st.sampled_from(sorted(self.live)))
        if not self.refused(lambda: self.cache.grow(node, n)):
            self.write(node, self.tokens[node], self.tokens[node] + n)
            self.tokens[node] += n

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def prune(self, data):
        node = data.draw(st.sampled_from(sorted(self.live)))
        self.cache.prune(node)
        self.live.discard(node)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def step(self, data):
        """A decode step through apply(): drop some leaves, grow the rest, branch some."""
        held = sorted(self.held())
        has_child = {self.parent[n] for n in held}
        leaves = [n for n in held if n not in has_child]
        dropped = set(data.draw(st.lists(st.sampled_from(leaves), max_size=len(leaves) - 1)))
        kept = [n for n in held if n not in dropped]
        tokens = {n: max(self.tokens[n], 1) + data.draw(st.integers(0, 3)) for n in kept}
        parents = {n: self.parent[n] for n in kept}
        for parent in data.draw(st.lists(st.sampled_from(kept), max_size=3)):
            parents[self.next_id + len(parents) - len(kept)] = parent
        for node in set(parents) - set(kept):
            tokens[node] = data.draw(st.integers(1, 6))
        ids = sorted(parents)
        tree = Tree(ids, [parents[i] for i in ids], [tokens[i] for i in ids])
        before = {n: self.tokens[n] for n in kept}
        slots = []
        if self.refused(lambda: slots.append(self.cache.apply(tree))):
            return
        write_new(self.cache, tree, slots[0], before)
        self.next_id += len(parents) - len(kept)
        self.parent.update(parents)
        self.tokens.update(tokens)
        self.live = set(ids)
        assert self.cache.tree() is tree

    @invariant()
    def consistent(self):
        self.cache.check()
        held = self.held()
        assert set(self.cache) == held
        page_size = self.cache.pool.page_size
        used = sum(-(-self.tokens[n] // page_size) for n in held)
        assert self.cache.pool.num_free == self.cache.pool.num_pages - used
        if held and all(self.tokens[n] for n in held):
            tree = self.cache.tree()
            assert_contents(self.cache, tree)
            # the planner's page table (the last call's pages reused) against a fresh listing
            page_ptr, pages = self.cache.host_node_pages(tree)
            assert np.array_equal(page_ptr, self.cache.node_pages(tree)[0].numpy())
            assert np.array_equal(pages, self.cache.node_pages(tree)[1].numpy())


TestCacheMachine = CacheMachine.TestCase


@pytest.mark.gpu  # pinned memory and non-blocking copies
def test_a_cuda_pool_hands_out_the_slots_a_host_pool_does():
    """`apply` on a pool on the GPU (its slots uploaded without waiting for the stream) gives
    each step the slots a CPU pool's cache gives, and the page tables agree."""
    run = w.fewshot(300, 4, 30)
    on_gpu = TreeCache(PagedKVCache(512, 4, 1, 2, device="cuda"))
    on_host = TreeCache(PagedKVCache(512, 4, 1, 2))
    for step in range(len(run)):
        tree = run.tree(step)
        got, want = on_gpu.apply(tree), on_host.apply(tree)
        assert got.device.type == "cuda"
        np.testing.assert_array_equal(got.cpu().numpy(), want.numpy(), err_msg=f"step {step}")
        for a, b in zip(on_gpu.node_pages(tree), on_host.node_pages(tree)):
            np.testing.assert_array_equal(a.cpu().numpy(), b.numpy())


@pytest.mark.gpu  # pinned buffers reused while the stream lags behind the host
def test_slots_uploaded_ahead_of_a_busy_stream_each_hold_their_own_step():
    """Steps applied while the stream is held back by a long kernel (the host runs many uploads
    ahead of the copies, so `deft.staged_upload.FreshUpload`'s two pinned buffers are reused
    only after their copies left them): every step's slots tensor, read once the stream is
    done, holds that step's slots from a CPU pool (a speculative run renames its candidates,
    a few-shot run grows its leaves; the buffers grow with the arrays)."""
    path = w.found_workload_files()["speculative/APPS_tree_size64.json"]
    for run in (w.speculative(path, prompt_tokens=100, steps=40), w.fewshot(300, 24, 40)):
        on_gpu = TreeCache(PagedKVCache(4096, 4, 1, 2, device="cuda"))
        on_host = TreeCache(PagedKVCache(4096, 4, 1, 2))
        torch.cuda._sleep(50_000_000)  # tens of ms of a spinning kernel ahead of the copies
        got = [on_gpu.apply(run.tree(step)) for step in range(len(run))]
        want = [on_host.apply(run.tree(step)).numpy() for step in range(len(run))]
        torch.cuda.synchronize()
        assert len({len(slots) for slots in want}) > 1  # arrays of several sizes
        for step, (a, b) in enumerate(zip(got, want)):
            assert a.device.type == "cuda" and a.dtype == torch.int64
            np.testing.assert_array_equal(a.cpu().numpy(), b, err_msg=f"step {step}")
