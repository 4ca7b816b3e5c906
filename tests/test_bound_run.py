"""`TreeAttention.run`'s argument sets (`deft.bound_run`): checked once, the plan-dependent
checks on every call, a bounded cache, and on a GPU the CUDA graph replayed after re-plans; the
custom op ``torch.ops.deft.tree_attention`` on the same argument sets."""

import contextlib
import gc

import pytest
import torch

from deft.bound_run import BoundRun, RunCache, argument_key  # noqa: E402
from deft.plan_buffers import paged_cache  # noqa: E402
from deft.tree import AttentionShape, Tree  # noqa: E402
from deft.tree_attention import TreeAttention  # noqa: E402
from reference import oracle_attention, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = AttentionShape(4, 2, 32, "float16")
TOLERANCE = 2e-3


def case(tree: Tree, seed: int, page_size=4):
    """(q, k, v) on the host and the paged caches and page table on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tree.num_queries, 4, 32, generator=g).half()
    k = torch.randn(tree.num_tokens, 2, 32, generator=g).half()
    v = torch.randn(tree.num_tokens, 2, 32, generator=g).half()
    k_cache, v_cache, table = paged_cache(tree, k.to(DEVICE), v.to(DEVICE), page_size, seed=seed)
    return q, k, v, k_cache, v_cache, table


TREES = [
    Tree([0, 1, 2], [None, 0, 0], [20, 3, 5], None, SHAPE),
    Tree([0, 1, 2, 3], [None, 0, 0, 2], [21, 4, 5, 9], [0, 1, 0, 2], SHAPE),
    Tree([4], [None], [7], [1], SHAPE),
]


def test_argument_key():
    x = torch.zeros(4, 2, 32)
    base = argument_key(x, x, x, x, None, None, False)
    assert argument_key(x, x, x, x, None, None, False) == base
    for other in (x[1:], x.transpose(0, 1), x.double(), x.clone()):
        assert argument_key(other, x, x, x, None, None, False) != base
        assert argument_key(x, x, x, other, None, None, False) != base
    assert argument_key(x, x, x, x, x[:, 0], None, False) != base
    assert argument_key(x, x, x, x, None, 0.5, False) != base
    assert argument_key(x, x, x, x, None, None, True) != base
    assert argument_key(x, x, x, x, None, None, False, True) != base  # the small-grid kernel
    assert argument_key(x, x, x, x, None, None, False, False, 32) != base  # the merge's block
    assert argument_key("q", x, x, x, None, None, False) is None


class Entry:
    """A stand-in argument set for the cache's own tests (what `RunCache` reads of one)."""

    def __init__(self):
        self.calls, self.graph, self.replay = 0, None, None


def test_the_key_sees_in_place_changes_of_the_same_tensor():
    """Address, shape, strides and dtype each change in place on the same object; every one
    changes the key, so the set hit last (compared first) is not found again."""
    changes = {
        "resize_ (shape, same address and strides)": lambda x: x.resize_(2, 2, 32),
        "as_strided_ (strides)": lambda x: x.as_strided_((4, 2, 32), (64, 1, 2)),
        "t_-like transpose_ (shape and strides)": lambda x: x.transpose_(0, 1),
        "set_ (address)": lambda x: x.set_(torch.zeros(4, 2, 32)),
        "data = (dtype, same address)": lambda x: setattr(x, "data", x.view(torch.int32)),
    }
    for name, change in changes.items():
        x = torch.zeros(4, 2, 32)
        runs = RunCache(4)
        key = argument_key(x, x, x, x, None, None, False)
        runs.put(key, Entry())
        assert runs.get(key) is runs.get(key) is not None  # by the dict, then as the last hit
        before = key[:4]
        change(x)
        moved = argument_key(x, x, x, x, None, None, False)
        assert moved[:4] != before and moved != key, name
        assert runs.get(moved) is None, name


def test_the_cache_drops_the_least_recently_used():
    """Hits through the last-hit shortcut and through the dict both count as uses."""
    runs = RunCache(2)
    a, b, c = Entry(), Entry(), Entry()
    runs.put("a", a)
    runs.put("b", b)
    assert runs.get("b") is b and runs.get("b") is b  # the dict, then the shortcut
    assert runs.get("a") is a and runs.get("a") is a  # a is now the most recent
    runs.put("c", c)
    assert runs.get("b") is None  # the least recently used
    assert runs.get("a") is a  # after a put: through the dict again, so a use that counts
    runs.put("d", Entry())
    assert runs.get("c") is None and runs.get("a") is a
    runs.clear()
    assert runs.get("a") is None and len(runs) == 0


class FakeReplay:
    """Stands in for a captured graph's replay on the CPU: counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def test_run_replays_only_for_the_same_tensors(monkeypatch):
    """The graph path's lookup on the CPU, with a fake replay in the bound argument set: the
    same tensors replay it (``out``, poisoned, is left alone); a new address, a view of
    another shape or strides, another dtype, or a caller's capture launch instead, rightly."""
    monkeypatch.setattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: False)
    tree = TREES[0]
    q, k, v, k_cache, v_cache, table = case(tree, 0)
    ref = oracle_attention(tree, q, k, v)
    n = tree.num_queries
    q_rows = torch.zeros(8, 4, 32, dtype=q.dtype, device=DEVICE)
    q_rows[:n] = q.to(DEVICE)
    out_rows = torch.empty_like(q_rows)
    q, out = q_rows[:n], out_rows[:n]
    attn = TreeAttention("deft_flatten", chunk_size=8, max_queries=8, max_tokens=64,
                         device=DEVICE)
    plan = attn.plan(tree, table)
    attn.run(q, k_cache, v_cache, plan, out=out)
    bound = attn._runs.get(argument_key(q, k_cache, v_cache, out, None, None,
                                        plan.per_query_merge, plan.small_grid))
    replay = bound.replay = FakeReplay()
    for calls in (1, 2):
        out.fill_(float("nan"))
        attn.run(q, k_cache, v_cache, plan, out=out)
        assert replay.calls == calls and out.isnan().all()
    wide = torch.empty(n, 8, 32, dtype=q.dtype, device=DEVICE)
    misses = {
        "new address": (q.clone(), k_cache, v_cache, out),
        "another shape at the same addresses": (q_rows[: n + 1], k_cache, v_cache,
                                                out_rows[: n + 1]),
        "other strides": (q, k_cache, v_cache, wide[:, ::2]),
        "another dtype": (q.float(), k_cache.float(), v_cache.float(), out.float()),
    }
    for name, (q_, k_, v_, out_) in misses.items():
        out_.fill_(float("nan"))
        attn.run(q_, k_, v_, plan, out=out_)
        assert replay.calls == 2, name
        assert rel_err(out_[:n].float().cpu(), ref) <= TOLERANCE, name
    monkeypatch.setattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: True)
    out.fill_(float("nan"))
    attn.run(q, k_cache, v_cache, plan, out=out)  # the same tensors, inside a capture
    assert replay.calls == 2 and rel_err(out.cpu(), ref) <= TOLERANCE


def op_args(attn, q, k_cache, v_cache, out, lse=None, sm_scale=None):
    """The arguments of a direct call of ``torch.ops.deft.tree_attention`` (what a compiled
    `run` calls)."""
    return [q, k_cache, v_cache, out, lse, sm_scale, attn._handle]


def test_the_custom_op_replays_only_for_the_same_tensors(monkeypatch):
    """The op's lookup with a fake replay, as for `run`: a hit replays, a new ``out``
    launches."""
    monkeypatch.setattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: False)
    tree = TREES[1]
    q, k, v, k_cache, v_cache, table = case(tree, 0)
    ref = oracle_attention(tree, q, k, v)
    q = q.to(DEVICE)
    attn = TreeAttention("deft_flatten", chunk_size=8, max_queries=4, max_tokens=64,
                         device=DEVICE)
    plan = attn.plan(tree, table)
    attn.run(q, k_cache, v_cache, plan)
    out = torch.empty_like(q)
    args = op_args(attn, q, k_cache, v_cache, out)
    torch.ops.deft.tree_attention(*args)
    entry = attn._runs.get(argument_key(q, k_cache, v_cache, out, None, None,
                                        plan.per_query_merge, plan.small_grid))
    replay = entry.replay = FakeReplay()
    out.fill_(float("nan"))
    torch.ops.deft.tree_attention(*args)
    assert replay.calls == 1 and out.isnan().all()
    args[3] = other = torch.full_like(q, float("nan"))
    torch.ops.deft.tree_attention(*args)
    assert replay.calls == 1 and rel_err(other.cpu(), ref) <= TOLERANCE
    entry.replay = None


def test_launch_counts_calls_and_captures_only_on_a_gpu():
    """On the CPU every call launches; the second call is the one that would capture."""
    runs = RunCache(2)
    bound = Entry()
    runs.put("key", bound)
    launches = []
    for _ in range(3):
        runs.launch(bound, lambda: launches.append(1), torch.device("cpu"))
    assert (bound.calls, len(launches), bound.graph, runs.graphs()) == (3, 3, None, 0)
    assert runs.get("key") is bound and runs.get("other") is None
    runs.put(None, Entry())  # no key: not kept
    assert len(runs) == 1


def test_the_custom_op_keeps_one_argument_set_per_tensors():
    """Direct calls of torch.ops.deft.tree_attention equal run() (out NaN-poisoned), and a
    repeated call finds its argument set instead of adding one: `run`'s own, where `run` was
    called with the same tensors."""
    tree = TREES[1]
    q, k, v, k_cache, v_cache, table = case(tree, 0)
    q = q.to(DEVICE)
    attn = TreeAttention("deft_flatten", chunk_size=8, max_queries=4, max_tokens=64,
                         device=DEVICE)
    plan = attn.plan(tree, table)
    ref = attn.run(q, k_cache, v_cache, plan).clone()
    out = torch.empty_like(q)
    args = op_args(attn, q, k_cache, v_cache, out)
    key = argument_key(q, k_cache, v_cache, out, None, None, plan.per_query_merge,
                       plan.small_grid)
    for call in range(3):
        out.fill_(float("nan"))
        torch.ops.deft.tree_attention(*args)
        assert torch.equal(out, ref)
        if call == 0:
            kept = len(attn._runs)
        assert len(attn._runs) == kept
        assert isinstance(attn._runs.get(key), BoundRun)
    attn.run(q, k_cache, v_cache, plan, out=out)  # eager run on the same tensors: the same set
    assert len(attn._runs) == kept
    assert rel_err(out.cpu(), oracle_attention(tree, q.cpu(), k, v)) <= TOLERANCE


def test_the_custom_op_writes_lse_and_checks_its_arguments():
    """The op's lse and sm_scale are run's; an lse of the wrong shape, a bad q, an owner that
    has not planned or is gone are refused by name."""
    tree = TREES[1]
    q, _, _, k_cache, v_cache, table = case(tree, 0)
    q = q.to(DEVICE)
    attn = TreeAttention("deft_flatten", chunk_size=8, max_queries=4, max_tokens=64,
                         device=DEVICE)
    unplanned = TreeAttention("deft_flatten", chunk_size=8, max_queries=4, max_tokens=64,
                              device=DEVICE)
    plan = attn.plan(tree, table)
    ref, ref_lse = attn.run(q, k_cache, v_cache, plan, sm_scale=0.1, return_lse=True)
    out, lse = torch.full_like(ref, float("nan")), torch.full_like(ref_lse, float("nan"))
    torch.ops.deft.tree_attention(*op_args(attn, q, k_cache, v_cache, out, lse, 0.1))
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    with pytest.raises(ValueError, match="lse must be float32"):
        torch.ops.deft.tree_attention(*op_args(attn, q, k_cache, v_cache, out, lse[:, :1]))
    with pytest.raises(ValueError, match="q must be a 3-D tensor"):
        torch.ops.deft.tree_attention(*op_args(attn, q[0], k_cache, v_cache, out))
    with pytest.raises(ValueError, match="has not planned yet"):
        torch.ops.deft.tree_attention(*op_args(unplanned, q, k_cache, v_cache, out))
    args = op_args(unplanned, q, k_cache, v_cache, out)
    del unplanned
    gc.collect()
    with pytest.raises(ValueError, match="is gone"):
        torch.ops.deft.tree_attention(*args)


def test_repeated_calls_and_re_plans_stay_right():
    """The same q / caches / out over three plans: each result is its tree's attention."""
    attn = TreeAttention("deft_flatten", chunk_size=8, max_queries=4, max_tokens=64,
                         device=DEVICE)
    out = torch.empty(4, 4, 32, dtype=torch.float16, device=DEVICE)
    q_rows = torch.zeros(4, 4, 32, dtype=torch.float16, device=DEVICE)
    cases = [case(tree, seed) for seed, tree in enumerate(TREES)]
    for step in range(2):
        for tree, (q, k, v, k_cache, v_cache, table) in zip(TREES, cases):
            q_rows.zero_()
            q_rows[: tree.num_queries] = q.to(DEVICE)
            plan = attn.plan(tree, table)
            for _ in range(3):
                out.fill_(float("nan"))
                attn.run(q_rows, k_cache, v_cache, plan, out=out)
                n = tree.num_queries
                assert rel_err(out[:n].cpu(), oracle_attention(tree, q, k, v)) <= TOLERANCE
                assert (out[n:] == 0).all()
    assert len(attn._runs) == len(TREES)  # one argument set per tree's caches


def test_plan_dependent_checks_run_on_every_call():
    """A bound argument set still refuses a plan it does not fit."""
    small, big = TREES[2], TREES[1]
    attn = TreeAttention("deft_flatten", max_queries=4, max_tokens=64, device=DEVICE)
    q, _, _, small_k, small_v, table = case(small, 0)
    q = q.to(DEVICE)
    _, _, _, k_cache, v_cache, big_table = case(big, 1)
    for caches in ((k_cache, v_cache), (small_k, small_v)):
        attn.run(q, *caches, attn.plan(small, table))
    with pytest.raises(ValueError, match="q has 1 rows"):
        attn.run(q, k_cache, v_cache, attn.plan(big, big_table))
    with pytest.raises(ValueError, match="the plan reads slot"):
        attn.run(q, small_k, small_v, attn.plan(big, big_table))
    _, _, _, _, _, paged_8 = case(small, 0, page_size=8)
    with pytest.raises(ValueError, match="pages of 4 tokens, the plan 8"):
        attn.run(q, k_cache, v_cache, attn.plan(small, paged_8))
    with pytest.raises(ValueError, match="stale"):
        stale = attn.plan(small, table)
        attn.plan(small, table)
        attn.run(q, k_cache, v_cache, stale)


def test_the_cache_is_bounded():
    tree = TREES[0]
    q, _, _, k_cache, v_cache, table = case(tree, 0)
    for size in (0, 2):
        attn = TreeAttention("deft_flatten", max_queries=4, max_tokens=64, device=DEVICE,
                             max_graphs=size)
        plan = attn.plan(tree, table)
        queries = [q.to(DEVICE) * scale for scale in (1, 2, 3, 4)]  # alive: distinct keys
        results = [attn.run(x, k_cache, v_cache, plan).cpu() for x in queries]
        assert len(attn._runs) == size
        assert rel_err(results[0] * 2, results[1]) > 0  # really different queries


@pytest.mark.gpu  # CUDA graphs
def test_graphs_are_captured_on_the_second_call_and_follow_new_plans():
    attn = TreeAttention("deft_flatten", chunk_size=8, max_queries=4, max_tokens=64,
                         device=DEVICE)
    trees = TREES[:2]
    q_rows = torch.zeros(4, 4, 32, dtype=torch.float16, device=DEVICE)
    out = torch.empty_like(q_rows)
    # one cache big enough for both trees, so both plans run over the same tensors
    k_cache = torch.zeros(64, 4, 2, 32, dtype=torch.float16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    for step in range(4):
        tree = trees[step % 2]
        q, k, v, small_k, small_v, table = case(tree, step)
        k_cache.zero_(), v_cache.zero_()
        k_cache[: len(small_k)] = small_k
        v_cache[: len(small_v)] = small_v
        q_rows.zero_()
        q_rows[: tree.num_queries] = q.to(DEVICE)
        plan = attn.plan(tree, table)
        for _ in range(2):
            out.fill_(float("nan"))
            attn.run(q_rows, k_cache, v_cache, plan, out=out)
            n = tree.num_queries
            assert rel_err(out[:n].cpu(), oracle_attention(tree, q, k, v)) <= TOLERANCE
    assert attn._runs.graphs() >= 1


def test_capture_holds_off_the_garbage_collector(monkeypatch):
    """`capture` runs the launches with Python's cyclic collector off (a collection there could
    free other graphs' memory mid-capture), turns it back on after, also when the capture
    fails (then with a warning and no graph), and leaves it off if it was off."""
    from deft import bound_run

    class Fake:  # stands in for torch's streams and graphs: records, captures nothing
        def __init__(self, *args, fail=False, **kwargs):
            self.fail = fail

        def wait_stream(self, other):
            pass

        def capture_begin(self, **kwargs):
            pass

        def capture_end(self):
            if self.fail:
                raise RuntimeError("operation not permitted when stream is capturing")

    seen = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Fake())
    monkeypatch.setattr(torch.cuda, "Stream", Fake)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    for fail in (False, True):
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda fail=fail: Fake(fail=fail))
        assert gc.isenabled()
        if fail:
            with pytest.warns(RuntimeWarning, match="could not be captured"):
                graph = bound_run.capture(lambda: seen.append(gc.isenabled()), "cuda", None)
            assert graph is None
        else:
            assert bound_run.capture(lambda: seen.append(gc.isenabled()), "cuda", None)
        assert gc.isenabled()
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Fake)
    gc.disable()
    try:
        assert bound_run.capture(lambda: seen.append(gc.isenabled()), "cuda", None)
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert seen == [False, False, False]


@pytest.mark.gpu  # CUDA graphs
def test_a_capture_outlives_garbage_collection_of_other_graphs():
    """Dropped TreeAttentions (each a cycle with its plan, holding a captured graph) collected
    at any allocation: the next argument set still captures its graph, and the default CUDA
    generator still works after it (a capture that fails leaves it marked as capturing)."""
    tree = TREES[1]
    q, k, v, k_cache, v_cache, table = case(tree, 0)
    q = q.to(DEVICE)
    ref = oracle_attention(tree, q.cpu(), k, v)
    threshold = gc.get_threshold()
    try:
        for _ in range(3):  # garbage: graphs no one can reach, freed only by the collector
            dropped = TreeAttention("deft_flatten", max_queries=4, max_tokens=64, device=DEVICE)
            plan = dropped.plan(tree, table)
            for _ in range(2):
                dropped.run(q, k_cache, v_cache, plan, out=torch.empty_like(q))
            assert dropped._runs.graphs() == 1
        del dropped, plan
        gc.set_threshold(1)  # collect at (nearly) every allocation of a Python object
        attn = TreeAttention("deft_flatten", max_queries=4, max_tokens=64, device=DEVICE)
        plan = attn.plan(tree, table)
        out = torch.empty_like(q)
        for _ in range(3):
            attn.run(q, k_cache, v_cache, plan, out=out)
    finally:
        gc.set_threshold(*threshold)
    assert attn._runs.graphs() == 1
    assert rel_err(out.cpu(), ref) <= TOLERANCE
    assert torch.isfinite(torch.randn(8, device=DEVICE)).all()


@pytest.mark.gpu  # CUDA graphs
def test_allocated_outputs_and_someone_elses_capture():
    """Outputs run allocates (graphs where their addresses repeat), and a caller's capture:
    run launches plainly inside it, and the caller's graph replays right."""
    tree = TREES[1]
    q, k, v, k_cache, v_cache, table = case(tree, 0)
    q = q.to(DEVICE)
    ref = oracle_attention(tree, q.cpu(), k, v)
    attn = TreeAttention("deft_flatten", max_queries=4, max_tokens=64, device=DEVICE)
    plan = attn.plan(tree, table)
    for _ in range(4):
        out, lse = attn.run(q, k_cache, v_cache, plan, return_lse=True)
        assert rel_err(out.cpu(), ref) <= TOLERANCE and torch.isfinite(lse).all()
    other = TreeAttention("deft_flatten", max_queries=4, max_tokens=64, device=DEVICE)
    plan = other.plan(tree, table)
    out = torch.empty_like(q)
    other.run(q, k_cache, v_cache, plan, out=out)  # warm-up: compiles and binds
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin()
        other.run(q, k_cache, v_cache, plan, out=out)  # the second call: must not capture
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out.cpu(), ref) <= TOLERANCE
    assert other._runs.graphs() == 0


@pytest.mark.gpu  # CUDA graphs
def test_the_custom_op_replays_its_graph_and_launches_inside_a_capture():
    tree = TREES[1]
    q, k, v, k_cache, v_cache, table = case(tree, 0)
    q = q.to(DEVICE)
    ref = oracle_attention(tree, q.cpu(), k, v)
    attn = TreeAttention("deft_flatten", max_queries=4, max_tokens=64, device=DEVICE)
    plan = attn.plan(tree, table)
    attn.run(q, k_cache, v_cache, plan)
    out = torch.empty_like(q)
    args = op_args(attn, q, k_cache, v_cache, out)

    def entry(out):
        return attn._runs.get(argument_key(q, k_cache, v_cache, out, None, None,
                                           plan.per_query_merge, plan.small_grid))

    for _ in range(3):  # launch, capture and replay, replay
        out.fill_(float("nan"))
        torch.ops.deft.tree_attention(*args)
        assert rel_err(out.cpu(), ref) <= TOLERANCE
    assert entry(out).graph is not None
    other = torch.empty_like(q)  # a new argument set, first seen inside a caller's capture
    args[3] = other
    torch.ops.deft.tree_attention(*args)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin()
        torch.ops.deft.tree_attention(*args)  # its second call: must not capture
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    other.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(other.cpu(), ref) <= TOLERANCE
    assert entry(other).graph is None
