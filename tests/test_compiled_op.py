"""`TreeAttention.run` under torch.compile: the traced graph is the custom op on the caller's
tensors alone (no plan buffers, workspace or launch settings), inductor calls it with no copy of
``out`` around it, and the compiled results equal eager `run`."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from deft.plan_buffers import paged_cache
from deft.tree import AttentionShape, Tree
from deft.tree_attention import TreeAttention
from reference import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TREE = Tree([0, 1, 2], [None, 0, 0], [40, 8, 8], None, AttentionShape(4, 2, 32, "float16"))


SMALLER = Tree([0, 1, 2], [None, 0, 0], [40, 7, 8], None, TREE.attention)  # one token less


def setup(with_table=False):
    """(attn, plan, q, k_cache, v_cache) of `TREE` on DEVICE (and the page table)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(TREE.num_queries, 4, 32, generator=g).half().to(DEVICE)
    k = torch.randn(TREE.num_tokens, 2, 32, generator=g).half().to(DEVICE)
    k_cache, v_cache, table = paged_cache(TREE, k, k.clone(), 16)
    attn = TreeAttention("deft_flatten", max_queries=TREE.num_queries,
                         max_tokens=TREE.num_tokens, device=DEVICE)
    return (attn, attn.plan(TREE, table), q, k_cache, v_cache) + ((table,) if with_table else ())


def traced_graph(fn, *args):
    """The one FX graph dynamo traces of ``fn(*args)`` (fullgraph), and the call's result."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    result = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0], result


def nodes(graph, op):
    return [node for node in graph.graph.nodes if node.op == op]


def test_the_traced_graph_is_the_op_on_the_callers_tensors():
    attn, plan, q, k_cache, v_cache = setup()
    eager, eager_lse = attn.run(q, k_cache, v_cache, plan, return_lse=True)
    out = torch.full_like(q, float("nan"))
    graph, result = traced_graph(lambda q, kc, vc, out: attn.run(q, kc, vc, plan, out=out),
                                 q, k_cache, v_cache, out)
    assert len(nodes(graph, "placeholder")) == 4  # q, k_cache, v_cache, out: nothing of attn
    calls = nodes(graph, "call_function")
    assert [str(node.target) for node in calls] == ["deft.tree_attention"]
    assert calls[0].args[-1] == attn._handle
    assert result is out and torch.equal(out, eager)
    graph, (result, lse) = traced_graph(
        lambda q, kc, vc: attn.run(q, kc, vc, plan, return_lse=True), q, k_cache, v_cache)
    assert len(nodes(graph, "placeholder")) == 3
    calls = nodes(graph, "call_function")
    assert [str(node.target) for node in calls][-1] == "deft.tree_attention"
    assert len(calls) == 3  # the allocations of out and lse, then the op
    assert torch.equal(result, eager) and torch.equal(lse, eager_lse)


def test_inductor_calls_the_op_with_nothing_around_it():
    """The op's mutation of ``out`` is re-inplaced: the generated code calls the op on the
    caller's ``out`` itself, with no clone or copy of it and no other kernel."""
    attn, plan, q, k_cache, v_cache = setup()
    eager = attn.run(q, k_cache, v_cache, plan).clone()
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, kc, vc, out: attn.run(q, kc, vc, plan, out=out),
                             fullgraph=True)
    out = torch.full_like(q, float("nan"))
    result, (code, *_) = run_and_get_code(compiled, q, k_cache, v_cache, out)
    assert result is out and torch.equal(out, eager)
    call = code[code.index("def call("):code.index("\n\n", code.index("def call("))]
    assert call.count("torch.ops.deft.tree_attention.default(") == 1
    for extra in ("copy_", "clone", "empty_strided", ".run(", "kernel"):
        assert extra not in call, extra
    out.fill_(float("nan"))  # a later call: the same graph, the same argument set
    runs = len(attn._runs)
    assert compiled(q, k_cache, v_cache, out) is out and torch.equal(out, eager)
    assert len(attn._runs) == runs


@pytest.mark.gpu  # inductor's CUDA graphs
def test_reduce_overhead_graphs_follow_new_plans(monkeypatch):
    """Under ``mode="reduce-overhead"`` the op (tagged cudagraph-unsafe) is never recorded into
    inductor's CUDA graph: its body runs on every call, so each call runs the latest plan with
    that plan's launch choices and checks."""
    attn, _, q, k_cache, v_cache, table = setup(with_table=True)
    eager = [attn.run(q, k_cache, v_cache, attn.plan(tree, table)).clone()
             for tree in (TREE, SMALLER)]
    assert rel_err(eager[0].float().cpu(), eager[1].float().cpu()) > 1e-3
    launches = []
    launch = attn._launch
    monkeypatch.setattr(attn, "_launch", lambda *args: (launches.append(1), launch(*args)))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, kc, vc, plan: attn.run(q, kc, vc, plan),
                             mode="reduce-overhead", fullgraph=True)
    for step in range(6):  # warm-up, record, then replays over alternating plans
        result = compiled(q, k_cache, v_cache, attn.plan((TREE, SMALLER)[step % 2], table))
        assert rel_err(result.float().cpu(), eager[step % 2].float().cpu()) <= 1e-3, step
    assert len(launches) == 6


def test_the_op_is_kept_out_of_inductors_cuda_graphs():
    """The op carries torch's cudagraph-unsafe tag where torch has it (>= 2.9)."""
    from deft.kernels.tree_attention_op import CUDAGRAPH_UNSAFE

    tags = torch.ops.deft.tree_attention.default.tags
    if hasattr(torch.Tag, "cudagraph_unsafe"):
        assert CUDAGRAPH_UNSAFE == (torch.Tag.cudagraph_unsafe,)
        assert torch.Tag.cudagraph_unsafe in tags
    else:
        assert CUDAGRAPH_UNSAFE == ()