"""Whole-run replay (`harness.replay`) and the decoder (`harness.decoder`) on the CPU.

Short replays with the PyTorch reference strategies through a tiny attention shape: outputs
equal the oracle at the checked steps, the cache ends empty, sampling and extrapolation add up,
the three decode latencies are booked per step (a fake clock: no timing assertions), step
ranges merge into the full run (gaps and overlaps refused), the tables carry the paper's
eleven columns, the decoder's attention plugs in, and `deft-cli replay` writes its JSON.
"""

import os
import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from cli import main
from deft import workloads as w
from deft.cache import PagedKVCache, TreeCache
from harness.decoder import LLAMA3_8B, Decoder, DecoderConfig, LayerCaches
from deft.plan import build_plan
from harness.deft_methods import ReferenceMethod
from harness.kernel_traffic import kernel_traffic, plan_traffic
from harness.methods import Capacity
from harness.registry import parse_methods
from harness.replay import markdown_tables, render, replay, sample_steps
from reference import oracle_attention

TINY = DecoderConfig(layers=2, hidden=32, intermediate=64, q_heads=4, kv_heads=2, head_dim=16,
                     vocab=50)
SHAPE = TINY.attention()
TOLERANCE = 2e-3  # fp16 inputs, as the bench's

RUNS = {
    "fewshot": lambda: w.fewshot(prompt_tokens=37, width=3, iterations=5, attention=SHAPE),
    "tot": lambda: w.tot_run(3, depth=2, branching=3, prompt_tokens=21, min_tokens=2,
                             max_tokens=6, attention=SHAPE),
    "token_tree": lambda: w.token_tree_run(1, size=7, depth=3, prompt_tokens=18, steps=4,
                                           attention=SHAPE),
}


def tiny_replay(run, methods="ref:deft_flatten,ref:radix", **options):
    options = {"model": TINY, "device": "cpu", "page_size": 4, **options}
    return replay(run, parse_methods(methods, steps=True), **options)


def test_sample_steps_are_even_and_keep_the_ends():
    assert sample_steps(5) == sample_steps(5, 9) == [0, 1, 2, 3, 4]
    assert sample_steps(10, 4) == [0, 3, 6, 9]
    assert sample_steps(3708, 100)[::99] == [0, 3707] and len(sample_steps(3708, 100)) == 100


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_replay_equals_the_oracle_and_empties_the_cache(kind):
    run = RUNS[kind]()
    result = tiny_replay(run, check_steps=len(run))
    for entry in result["methods"]:
        assert entry["status"] == "ok", entry["reason"]
        assert entry["rel_err"] < TOLERANCE
        per_step = entry["per_step_ms"]
        assert len(per_step["attention"]) == len(per_step["plan"]) == len(run)
        assert entry["traffic"]["kv_bytes"] > 0
    assert result["cache"] == {"pages": result["workload"]["capacity"]["pages"],
                               "pages_in_use_at_end": 0, "nodes_at_end": 0}
    by_name = {e["method"]: e for e in result["methods"]}
    # KV-guided grouping reads a shared prefix once; query-guided once per query.
    kv_bytes = {name: e["traffic"]["kv_bytes"] for name, e in by_name.items()}
    assert kv_bytes["ref:deft_flatten"] < kv_bytes["ref:radix"]


def test_sampled_steps_extrapolate_to_the_run():
    run = RUNS["tot"]()
    result = tiny_replay(run, methods="ref:deft_node", max_steps=4, check_steps=2)
    workload, entry = result["workload"], result["methods"][0]
    assert workload["replayed"] == 4 and workload["step_indices"] == sample_steps(len(run), 4)
    assert workload["sampled"] and not workload["complete"] and workload["step_range"] is None
    assert entry["rel_err"] < TOLERANCE
    mean = entry["attention_s"] / 4
    assert entry["attention_s_run"] == pytest.approx(mean * len(run))
    assert entry["kv_bytes_run"] == pytest.approx(entry["traffic"]["kv_bytes"] * len(run) / 4)


def test_progress_reports_every_step():
    calls = []
    tiny_replay(RUNS["fewshot"](), methods="ref:deft_node", check_steps=0,
                progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 5) for i in range(1, 6)]


class Renamed(ReferenceMethod):
    """A custom method: a reference strategy under another name."""

    def __init__(self, strategy, name):
        super().__init__(strategy)
        self.name = name


def test_e2e_rows_upper_bound_and_speedups():
    run = RUNS["token_tree"]()
    methods = [Renamed("radix", "radix"), Renamed("deft_flatten", "deft_flatten"),
               *parse_methods("deft_node", steps=True)]
    result = replay(run, methods, model=TINY, e2e=True, device="cpu", page_size=4)
    by_name = {e["method"]: e for e in result["methods"]}
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # then the kernel runs on the CPU
    if interpreted:
        assert by_name["deft_node"]["status"] == "ok"
    else:
        assert by_name["deft_node"]["status"] == "skipped" and "CUDA" in by_name["deft_node"]["reason"]
    assert result["workload"]["complete"]
    for name in ("radix", "deft_flatten"):
        for key in ("e2e", "inline", "overlap"):
            assert len(by_name[name]["per_step_ms"][key]) == len(run)
        assert by_name[name]["e2e_s_run"] > 0
    assert len(result["upper_bound"]["per_step_ms"]) == len(run)
    assert result["baseline"] == "radix"
    speed = result["speedups"]["deft_flatten"]
    assert speed["attention"] == pytest.approx(
        by_name["radix"]["attention_s_run"] / by_name["deft_flatten"]["attention_s_run"])
    assert speed["e2e"] > 0 and result["speedups"]["radix"]["attention"] == 1.0
    tables = markdown_tables([result])
    assert "| upper bound (no attention) |" in tables
    assert f"| ours: decoding speedup, no planning | {speed['e2e']:.2f}x |" in tables
    assert "DeFT-Flatten over radix (Radix Attention)" in tables
    assert ("deft_node" in tables) == interpreted  # a skipped method gets no column
    assert render(result).row_count == 4


def test_graphs_are_captured_once_and_failures_fall_back(monkeypatch):
    import harness.replay.measure as r

    captured, calls = [], []

    class Graph:
        def __init__(self, step):
            self.replay = step

    def fake_capture(steps):
        captured.append(steps)
        if len(captured) == 2:
            raise r.GraphCaptureError("no capture")
        return Graph(steps[0]), []

    monkeypatch.setattr(r, "capture", fake_capture)
    entry = r.Measured("m", "deft", "deft_flatten", timing="graph", e2e_timing="graph")
    for _ in range(3):
        r.time_step(entry, "", lambda: calls.append("attention"), torch.device("cpu"))
    assert len(captured) == 1 and calls == ["attention"] * 3 and entry.timing == "graph"
    for _ in range(2):
        r.time_step(entry, "e2e_", lambda: calls.append("e2e"), torch.device("cpu"))
    assert len(captured) == 2 and entry.e2e_timing == "eager-fallback"
    assert entry.timing == "graph" and entry.capture_error == "no capture"
    assert calls[3:] == ["e2e", "e2e"]


def test_decoder_attention_plugs_in():
    """Through the decoder, the reference method equals dense oracle attention over the same
    caches (each layer writes the step's K and V before attending)."""
    tree = RUNS["tot"]().tree(6)
    cache = TreeCache(PagedKVCache(Capacity.of([tree], 4).pages, 4, 1, 1))
    slots = cache.apply(tree)
    caches = LayerCaches(TINY.layers, cache.pool.num_pages, 4, TINY.kv_heads, TINY.head_dim,
                         torch.float32)
    caches.fill_random(slots, torch.Generator().manual_seed(0))
    model = Decoder(TINY, torch.float32, "cpu")
    n = tree.num_queries
    tokens = torch.arange(n) % TINY.vocab
    positions = torch.from_numpy(tree.visible_tokens - 1)
    query_slots = cache.token_slots(tree)[tree.query_token]
    method = ReferenceMethod("deft_node_chunk")
    method.setup(None, SHAPE, torch.device("cpu"), caches.scratch_slot)

    def oracle(q, k_cache, v_cache, plan, out):
        test_layout = cache.token_slots(tree)
        k, v = k_cache.flatten(0, 1)[test_layout], v_cache.flatten(0, 1)[test_layout]
        return out.copy_(oracle_attention(tree, q, k, v))

    logits = [model.forward(tokens, positions, query_slots, caches, attention, plan)
              for attention, plan in ((method.run, method.plan(tree, cache)), (oracle, None),
                                      (None, None))]
    assert logits[0].shape == (n, TINY.vocab)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits[0], logits[2])


def test_llama3_8b_shape():
    assert LLAMA3_8B.parameters == 8_030_261_248
    assert LLAMA3_8B.attention() == w.fewshot().tree(0).attention


def test_trees_must_fit_the_model():
    with pytest.raises(ValueError, match="heads"):
        tiny_replay(w.fewshot(prompt_tokens=8, width=2, iterations=2))


def test_cli_replay_writes_json(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "replay.json"
    result = CliRunner().invoke(main, [
        "replay", "--workload", "fewshot", "--prompt-tokens", "40", "--width", "2",
        "--iterations", "3", "--methods", "ref:deft_flatten,sglang", "--layers", "1",
        "--json", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["format"] == "deft-replay/2" and saved["workload"]["steps"] == 3
    assert saved["methods"][0]["rel_err"] < TOLERANCE
    assert saved["methods"][1]["status"] == "skipped"


@pytest.mark.parametrize("args, message", [
    (["--methods", "nope"], "unknown method"),
    (["--json", "/no/such/dir/out.json"], "directory does not exist"),
    (["--e2e"], "needs a CUDA GPU"),
])
def test_cli_replay_bad_input_exits_2(monkeypatch, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(main, ["replay", "--workload", "fewshot", *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_replay_takes_only_methods_that_step():
    names = [m.name for m in parse_methods("all", steps=True)]
    assert names[-1] == "sglang" and "sdpa" not in names and "fi_decode" not in names
    assert all(m.steps for m in parse_methods("all,ref:radix", steps=True))
    with pytest.raises(ValueError, match="cannot be replayed"):
        parse_methods("sdpa", steps=True)
    with pytest.raises(ValueError, match="unknown method 'ref:nope'"):
        parse_methods("ref:nope", steps=True)


@pytest.mark.parametrize("strategy", ["deft_flatten", "tree_attention_s", "radix", "deft_node"])
def test_kernel_traffic_reads_slots_and_intervals_not_masks_or_page_tables(strategy):
    tree = RUNS["tot"]().tree(6)
    plan = build_plan(strategy, tree, page_size=4)
    paper, kernels = plan_traffic(plan), kernel_traffic(plan)
    assert kernels["mask_bytes"] == kernels["index_bytes"] == 0
    assert paper["mask_bytes"] + paper["index_bytes"] > 0
    for key in ("kv_bytes", "q_bytes", "partial_bytes", "score_bytes", "output_bytes"):
        assert kernels[key] == paper[key]
    per_token = 1 if strategy == "radix" else 2  # slots, and subtree ends where flattened
    per_query = 0 if strategy == "radix" else 1
    expected = (per_token * plan.tokens.sum() + per_query * plan.queries.sum()) \
        * SHAPE.kv_heads * 4
    assert kernels["addressing_bytes"] == expected


def test_replay_reports_kernel_reads_beside_the_strategy_accounting():
    """A kernel method's replay entry sums `kernel_traffic` per layer; others report None."""

    class KernelReads(ReferenceMethod):
        def kernel_traffic(self, plan):
            return kernel_traffic(plan.plan)

    run = RUNS["fewshot"]()
    result = replay(run, [KernelReads("deft_flatten", "deft_flatten"), ReferenceMethod("radix")],
                    model=TINY, device="cpu", page_size=4, check_steps=0)
    flatten, radix = result["methods"]
    assert radix["kernel_traffic"] is None and radix["kernel_bytes_run"] is None
    expected = sum(kernel_traffic(build_plan("deft_flatten", run.tree(i), page_size=4))
                   ["addressing_bytes"] for i in range(len(run))) * TINY.layers
    assert flatten["kernel_traffic"]["addressing_bytes"] == expected
    assert flatten["kernel_traffic"]["mask_bytes"] == 0 < flatten["traffic"]["mask_bytes"]
    assert flatten["kernel_bytes_run"] == sum(flatten["kernel_traffic"].values())


class FakeClock:
    """A perf_counter that only the fake methods advance (seconds)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Clocked(ReferenceMethod):
    """A reference method whose plan takes PLAN_MS and each layer's run RUN_MS on a fake
    clock."""

    PLAN_MS, RUN_MS = 2.0, 1.0

    def __init__(self, strategy, name, clock):
        super().__init__(strategy)
        self.name, self.clock = name, clock

    def plan(self, tree, cache):
        self.clock.now += self.PLAN_MS / 1e3
        return super().plan(tree, cache)

    def run(self, q, k_cache, v_cache, plan, out=None):
        self.clock.now += self.RUN_MS / 1e3
        return super().run(q, k_cache, v_cache, plan, out=out)


def test_three_decode_latencies_are_booked_per_step(monkeypatch):
    """No planning = the step; in line = plan + step; overlapped = step + the next step's plan
    (none after the last, the first plan added to the first step). On the CPU nothing runs
    concurrently, so the overlap hides nothing."""
    import harness.replay.measure as measure

    clock = FakeClock()
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=clock))
    run = RUNS["fewshot"]()
    methods = [Clocked("radix", "sglang", clock), Clocked("deft_flatten", "deft_flatten", clock)]
    result = replay(run, methods, model=TINY, e2e=True, device="cpu", page_size=4)
    step = TINY.layers * Clocked.RUN_MS
    plan = Clocked.PLAN_MS
    n = len(run)
    for e in result["methods"]:
        per_step = e["per_step_ms"]
        assert per_step["attention"] == pytest.approx([step] * n)
        assert per_step["e2e"] == pytest.approx([step] * n)
        assert per_step["plan"] == pytest.approx([plan] * n)
        assert per_step["inline"] == pytest.approx([plan + step] * n)
        assert per_step["overlap"] == pytest.approx(
            [2 * plan + step] + [plan + step] * (n - 2) + [step])
        assert e["e2e_s_run"] == pytest.approx(n * step / 1e3)
        assert e["inline_s_run"] == pytest.approx(n * (plan + step) / 1e3)
        assert e["overlap_s_run"] == pytest.approx(n * (plan + step) / 1e3)
        assert e["plan_share_inline"] == pytest.approx(plan / (plan + step))
        assert e["plan_hidden"] == pytest.approx(0.0, abs=1e-9)
    assert result["speedups"]["deft_flatten"] == pytest.approx(
        {"attention": 1.0, "e2e": 1.0, "inline": 1.0, "overlap": 1.0})


def test_step_ranges_merge_into_the_full_run():
    from harness.replay import combine, merge

    run = RUNS["tot"]()
    n = len(run)
    options = dict(methods="ref:deft_flatten,ref:radix", check_steps=1)
    full = tiny_replay(run, **options)
    parts = [tiny_replay(run, steps=(0, 5), **options),
             tiny_replay(run, steps=(5, n), **options)]
    assert not parts[0]["workload"]["complete"] and parts[0]["workload"]["step_range"] == [0, 5]
    merged = merge(parts[::-1])
    w = merged["workload"]
    assert w["complete"] and w["step_indices"] == list(range(n)) and w["parts"] == [[0, 5],
                                                                                    [5, n]]
    for whole, joined in zip(full["methods"], merged["methods"]):
        assert joined["traffic"] == whole["traffic"]
        for key, values in joined["per_step_ms"].items():
            assert len(values) == len(whole["per_step_ms"][key])
        assert joined["attention_s_run"] == pytest.approx(sum(joined["per_step_ms"]["attention"])
                                                          / 1e3)
        assert joined["rel_err"] < TOLERANCE
    assert merged["cache"]["nodes_at_end"] == 0
    assert [r["workload"]["complete"] for r in combine([parts[1], full, parts[0]])] == [True,
                                                                                        True]
    gap = [parts[0], tiny_replay(run, steps=(6, n), **options)]
    with pytest.raises(ValueError, match="gap"):
        merge(gap)
    with pytest.raises(ValueError, match="overlap"):
        merge([tiny_replay(run, steps=(0, 6), **options), parts[1]])
    with pytest.raises(ValueError, match="sampled"):
        merge([tiny_replay(run, max_steps=3, **options), parts[1]])
    other = tiny_replay(RUNS["fewshot"](), steps=(0, 2), **options)
    with pytest.raises(ValueError, match="cannot merge"):
        merge([parts[0], other])


def test_step_range_parsing():
    from harness.replay import parse_step_range

    assert parse_step_range("0:400", 400) == (0, 400)
    assert parse_step_range("100:", 400) == (100, 400)
    assert parse_step_range(":5", 400) == (0, 5)
    for text in ("5", "a:b", "300:200", "0:401", "-1:3"):
        with pytest.raises(ValueError):
            parse_step_range(text, 400)
    with pytest.raises(ValueError, match="do not go together"):
        tiny_replay(RUNS["fewshot"](), steps=(0, 2), max_steps=2)


ELEVEN_RUNS = ("fewshot_b20_P4000_L400", "fewshot_b30_P4000_L400", "fewshot_b50_P4000_L400",
               "reasoning_sorting128ToT_0_P4000", "reasoning_docmergeToT_0_P4000",
               "reasoning_keywordToT_0_P4000", "reasoning_set128ToT_0_P4000",
               "speculative_t32_P4000", "speculative_t64_P4000", "speculative_t128_P4000",
               "speculative_t256_P4000")


def test_tables_have_the_papers_eleven_columns_and_verdicts():
    """One result per paper column (renamed tiny runs, speedups set): the header lists the
    eleven columns in the paper's order, the paper's speedups sit beside ours, the verdict says
    yes or no and by how much, and a sampled run gets no verdict."""
    from harness.replay import paper

    run = RUNS["fewshot"]()
    base = replay(run, [Renamed("radix", "sglang"), Renamed("deft_flatten", "deft_flatten")],
                  model=TINY, e2e=True, device="cpu", page_size=4, check_steps=0)
    results = []
    for i, name in enumerate(reversed(ELEVEN_RUNS)):
        result = json.loads(json.dumps(base))
        result["workload"]["name"] = name
        column = paper.column_of(name)
        margin = 0.25 if i % 2 else -0.5
        result["speedups"]["deft_flatten"]["attention"] = \
            paper.paper(paper.ATTENTION_SPEEDUP, column) + margin
        results.append(result)
    sampled = tiny_replay(run, methods="ref:radix,ref:deft_flatten", max_steps=3, check_steps=0)
    sampled["workload"]["name"] = "fewshot_b70_P4000_L400"
    tables = markdown_tables(results + [sampled])
    header = "|  | " + " | ".join(paper.COLUMNS) + " | fewshot_b70_P4000_L400 |"
    assert tables.count(header) == 4  # Tables 3 and 4, planning, traffic
    attention = [line for line in tables.splitlines()
                 if line.startswith("| paper: attention speedup |")][0]
    assert attention.split(" | ")[1:-1] == [f"{s:.2f}x" for s in paper.ATTENTION_SPEEDUP]
    verdicts = [line for line in tables.splitlines()
                if line.startswith("| beats the paper's attention speedup |")][0].split(" | ")
    # the runs went in reversed: t256 (i = 0) is -0.5, t128 +0.25, ...
    expected = ["yes, by +0.25x" if (len(ELEVEN_RUNS) - 1 - j) % 2 else "no, by -0.50x"
                for j in range(len(ELEVEN_RUNS))]
    assert verdicts[1:-1] == expected and verdicts[-1] == "- |"
    steps = [line for line in tables.splitlines() if line.startswith("| steps |")][0]
    assert steps.endswith(f"| {len(run)} | 3/{len(run)} sampled |")
    for row in ("sglang: no planning", "deft_flatten: planning in line",
                "deft_flatten: planning overlapped", "upper bound (no attention)",
                "paper: decoding speedup", "beats the paper's decoding speedup",
                "deft_flatten: planning hidden by the overlap"):
        assert f"| {row} |" in tables
    assert "SAMPLED" in render(sampled).title




def test_cli_step_ranges_merge_in_the_report(monkeypatch, tmp_path, capsys):
    from harness.replay.report import main as report

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    paths = []
    for step_range in ("0:2", "2:"):
        path = tmp_path / f"part_{step_range.replace(':', '_')}.json"
        result = CliRunner().invoke(main, [
            "replay", "--workload", "fewshot", "--prompt-tokens", "40", "--width", "2",
            "--iterations", "4", "--methods", "ref:deft_flatten,ref:radix", "--layers", "1",
            "--step-range", step_range, "--json", str(path)])
        assert result.exit_code == 0, result.output
        assert "steps, " in result.output and " s" in result.output  # the progress line
        paths.append(str(path))
    report(paths)
    assert "| steps | 4 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="overlap"):
        report(paths + paths[:1])
    bad = CliRunner().invoke(main, ["replay", "--workload", "fewshot", "--methods",
                                    "ref:radix", "--step-range", "3:1"])
    assert bad.exit_code == 2 and "step range" in bad.output
