"""Bad and extreme inputs: one TreeError (exit 2 in the CLI), never a traceback or a crash.

Tree files that are not UTF-8 or nest too deep, kernels asked to run where they cannot, trees
at the int32 limits, and the floor of trees with branches no query sees.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given

import iomodel
from cli import main
from deft import Tree, TreeError, load_tree
from iomodel.gpus import BUILTIN
from tests.trees import trees

ROOT = Path(__file__).parent.parent


def write(tmp_path, content) -> str:
    path = tmp_path / "tree.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def test_non_utf8_file_is_refused(tmp_path):
    path = write(tmp_path, b'{"format": "deft-tree/1", "nodes": [\xff]}')
    with pytest.raises(TreeError, match="not UTF-8 text .byte 0xff at offset 36"):
        load_tree(path)


def test_deep_json_is_refused(tmp_path):
    path = write(tmp_path, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(TreeError, match="nested 100000 levels deep"):
        load_tree(path)


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    text = json.dumps({"format": "deft-tree/1", "nodes": [{"id": "[[[" * 100 + '\\"{'}]})
    with pytest.raises(TreeError, match="field .tokens. is missing"):
        load_tree(write(tmp_path, text))


def test_integer_past_the_digit_limit_is_refused(tmp_path):
    text = '{"format": "deft-tree/1", "nodes": [{"id": ' + "9" * 5000 + ', "tokens": 1}]}'
    with pytest.raises(TreeError, match="unreadable number"):
        load_tree(write(tmp_path, text))


@pytest.mark.parametrize("content", [b"\xff\xfe", "[" * 100_000], ids=["bytes", "deep"])
def test_cli_exits_2_with_one_line(tmp_path, content):
    for command in ("inspect", "estimate-io"):
        result = CliRunner().invoke(main, [command, write(tmp_path, content)])
        assert result.exit_code == 2 and result.exception.__class__ is SystemExit
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("node_id", [2**63, 10**30])
def test_id_past_int64_is_refused(node_id):
    with pytest.raises(TreeError, match=f"node {node_id}: field 'id' is beyond the int64 limit"):
        Tree([node_id], [None], [1])


def single_node(tokens, queries) -> Tree:
    return Tree([0], [None], [tokens], [queries])


def test_inspect_at_the_index_limit():
    """2^31 - 1 tokens and queries: the statistics come from node sums, not per-query arrays."""
    n = 2**31 - 1
    stats = single_node(n, n).stats()
    assert stats["sum_visible_tokens"] == n * (n + 1) // 2
    assert stats["max_visible_tokens"] == n and stats["queries"] == n


@given(trees())
def test_aggregate_statistics_equal_the_per_query_ones(tree):
    assert tree.visible_token_sum == int(tree.visible_tokens.sum())
    assert np.array_equal(tree.node_visible_sum,
                          np.bincount(tree.query_node, tree.visible_tokens, tree.num_nodes))
    assert tree.visible_token_max == int(tree.visible_tokens.max())
    seen = np.zeros(tree.num_tokens, dtype=bool)
    for query in range(tree.num_queries):
        seen |= tree.visible(query, np.arange(tree.num_tokens))
    assert tree.seen_tokens == int(seen.sum())


def test_floor_counts_only_the_tokens_some_query_sees():
    # a 100-token prefix with a 20-token branch queried and a 1000-token branch nobody sees
    tree = Tree([0, 1, 2], [None, 0, 0], [100, 20, 1000], [0, 1, 0])
    a = tree.attention
    limit = iomodel.floor(tree, BUILTIN["h100"])
    assert limit["kv_bytes"] == 120 * a.kv_heads * a.head_dim * 2 * a.element_bytes
    deft_kv = iomodel.estimate(tree, BUILTIN["h100"], ["deft_flatten"])
    assert deft_kv["strategies"]["deft_flatten"]["kv_bytes"] >= limit["kv_bytes"]


NO_INTERPRETER = """
import torch, deft
tree = deft.Tree([0, 1], [None, 0], [8, 4])
a = tree.attention
q = torch.zeros(tree.num_queries, a.q_heads, a.head_dim, dtype=torch.float16)
k = torch.zeros(tree.num_tokens, a.kv_heads, a.head_dim, dtype=torch.float16)
k_cache, v_cache, table = deft.paged_cache(tree, k, k)
attn = deft.TreeAttention(max_queries=4, max_tokens=64, device="cpu")  # planning needs no kernel
plan = attn.plan(tree, table)
for call in (lambda: deft.attention("deft_flatten", tree, q, k, k),
             lambda: attn.run(q, k_cache, v_cache, plan)):
    try:
        call()
    except ValueError as error:
        print(error)
"""


def test_kernels_refuse_the_cpu_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", NO_INTERPRETER], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    message = ("the Triton kernels need a GPU: set TRITON_INTERPRET=1 before importing deft to "
               "run them on the CPU")
    assert result.stdout.splitlines() == [message, message]


def test_bf16_kernels_refuse_the_interpreter():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module loads
    import torch

    import deft
    from deft.kernels.tree_attention_op import INTERPRETED

    if not INTERPRETED:
        pytest.skip("the kernels loaded for a GPU")
    tree = Tree([0, 1], [None, 0], [8, 4], attention=deft.AttentionShape(dtype="bfloat16"))
    a = tree.attention
    q = torch.zeros(tree.num_queries, a.q_heads, a.head_dim, dtype=torch.bfloat16)
    k = torch.zeros(tree.num_tokens, a.kv_heads, a.head_dim, dtype=torch.bfloat16)
    message = "bf16 kernels need a GPU; under the interpreter use float16 or float32"
    with pytest.raises(ValueError, match=message):
        deft.attention("deft_flatten", tree, q, k, k)
    k_cache, v_cache, table = deft.paged_cache(tree, k, k)
    attn = deft.TreeAttention(max_queries=4, max_tokens=64, device="cpu")
    plan = attn.plan(tree, table)
    with pytest.raises(ValueError, match=message):
        attn.run(q, k_cache, v_cache, plan)


def test_a_cuda_tree_attention_without_cuda_says_what_to_pass():
    import torch

    from deft import TreeAttention

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(ValueError, match='no CUDA device here .device="cpu"'):
        TreeAttention("deft_flatten", max_queries=4, max_tokens=64)
