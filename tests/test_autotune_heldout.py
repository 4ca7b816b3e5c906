"""Head-shape buckets, the fill rung, old tables, the held-out and check runs (with a fake
measurement) and the latency model's refit to size sweeps (synthetic records), on a CPU."""

import dataclasses
import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from autotune import evaluation, heldout, store
from autotune.measure import Measurement
from autotune.space import Candidate, default_tile
from autotune.store import Table, write_configs
from cli import main
from deft.kernels import fill
from deft.kernels import tuned as tuned_module
from deft.kernels.buckets import Bucket, bucket_of
from deft.kernels.tuned import TunedConfigWarning, tuned_config
from deft.kernels.waves import wave_chunk
from deft.plan import build_plan
from deft.tree import AttentionShape
from deft.tree_format import tree_from_dict, tree_to_dict
from deft.workloads import star
from harness.bench.calibrate import calibrate_sweep, spearman
from iomodel import kernel_model
from iomodel.gpus import BUILTIN
from iomodel.latency import predict_latency

H200 = BUILTIN["h200"]
DEVICE = {"name": H200.name, "capability": [9, 0], "sm_count": 132}
TREE = star(20, 4000, 200)  # fewshot_b20_P4000_L200, 32/8 heads
LEGACY_KEY = "q32-n8192-s16-g4-d128-float16"  # written before KV heads joined the key


pytestmark = pytest.mark.usefixtures("isolated_tables")


def write(key, chunk=512, versions=None):
    chosen = {"chunk_size": chunk, "group_size": 16, "tile": None, "us": 10.0}
    table = Table("measured", DEVICE, versions or tuned_module.current_versions(),
                  {"deft_flatten": {key: {"workload": "w", "chosen": chosen, "candidates": []}}})
    return write_configs(table, store.table_path(H200.name))


# ---------------------------------------------------------------------------- buckets
def test_each_head_shape_has_its_own_bucket():
    keys = [bucket_of(tree).key for _, tree in heldout.shaped([("t", TREE)])]
    assert keys == ["q32-n8192-s16-h8-g4-d128-float16", "q32-n8192-s16-h2-g8-d128-float16",
                    "q32-n8192-s16-h1-g8-d128-float16", "q32-n8192-s16-h1-g4-d128-float16"]
    assert all(Bucket.parse(key).key == key for key in keys)


def test_legacy_keys_apply_to_the_shape_they_were_tuned_at():
    legacy = Bucket.parse(LEGACY_KEY)
    assert (legacy.kv_heads, legacy.gqa) == (8, 4)  # 32 query heads
    write(LEGACY_KEY)
    at_32_8 = tuned_config("deft_flatten", TREE, H200.name, (9, 0))
    assert (at_32_8.rung, at_32_8.chunk_size, at_32_8.matched) == ("exact", 512, LEGACY_KEY)
    at_4_1 = heldout.with_heads(TREE, 4, 1)  # GQA 4 too, but one KV head: not its bucket
    assert tuned_config("deft_flatten", at_4_1, H200.name, (9, 0)).rung == "default"


def test_a_table_of_other_versions_is_used_with_a_note_and_no_tiles():
    write(LEGACY_KEY, versions={"torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"})
    if tuned_module.release(tuned_module.current_versions()) == ("2.11", "3.6"):
        pytest.skip("this machine runs the table's versions")
    with pytest.warns(TunedConfigWarning, match="torch 2.11 / triton 3.6.*its sizes"):
        found = tuned_config("deft_flatten", TREE, H200.name, (9, 0))
    assert (found.rung, found.chunk_size, found.group_size, found.config) == (
        "exact", 512, 16, None)


# ---------------------------------------------------------------------------- fill
@pytest.mark.parametrize("q_heads, kv_heads", [(32, 8), (16, 2), (8, 1), (4, 1)])
def test_fill_reaches_the_programs_where_the_tree_allows(q_heads, kv_heads):
    tree = heldout.with_heads(TREE, q_heads, kv_heads)
    programs = 2 * 132
    chunk = fill.fill_chunk("deft_flatten", tree, programs)
    items = fill.work_items("deft_flatten", tree, chunk)
    assert chunk >= 64 and (items >= programs or chunk == 64)  # 64 is as far as it goes
    if chunk < fill.FILL_CHUNKS[0]:  # the next larger chunk would not fill the machine
        assert fill.work_items("deft_flatten", tree, 2 * chunk) < programs
    assert -(-tree.num_tokens // chunk) * kv_heads == items


def test_fill_never_goes_below_64_tokens_and_is_the_fill_rung():
    small = star(2, 100, 10, attention=AttentionShape(4, 1, 128))
    assert fill.fill_chunk("deft_flatten", small, 264) == 64
    # deft_flatten's fill chunk is moved to the tree's waves (tests/test_waves.py); the other
    # chunked strategies keep fill_chunk's
    found = tuned_config("deft_node_chunk", heldout.with_heads(TREE, 4, 1), H200.name, (9, 0),
                         programs=264)
    assert (found.rung, found.chunk_size, found.group_size, found.config) == (
        "fill", 64, 16, None)  # 8000 tokens x 1 head: 125 items at 64, the least chunk;
    # GQA 4: 16 queries x 4 heads fill a 64-row tile
    at_32_8 = tuned_config("deft_node_chunk", TREE, H200.name, (9, 0), programs=lambda: 264)
    assert (at_32_8.rung, at_32_8.chunk_size) == ("fill", 128)  # 63 x 8; 256: 32 x 8 < 264
    at_8_1 = tuned_config("deft_flatten", heldout.with_heads(TREE, 8, 1), H200.name, (9, 0),
                          programs=264)
    assert (at_8_1.rung, at_8_1.group_size) == ("fill", 8)  # GQA 8: 8 queries fill the tile
    flash = tuned_config("flash_decoding", TREE, H200.name, (9, 0), programs=264)
    assert flash.rung == "fill" and flash.group_size is None  # takes no group size
    assert tuned_config("deft_flatten", TREE, H200.name, (9, 0)).rung == "default"


def test_a_fill_chunk_too_fine_for_the_capacities_doubles_until_it_fits(monkeypatch):
    """Default capacities are sized for the default chunk (128): a fill chunk of 64 that needs
    more entries doubles instead of dropping to the defaults with a warning."""
    tree = heldout.with_heads(TREE, 4, 1)
    monkeypatch.setattr(tuned_module, "_identity", lambda device: (H200.name, (9, 0)))
    monkeypatch.setattr(tuned_module, "resident_programs", lambda device: 264)
    fits_128 = len(build_plan("deft_node_chunk", tree, 128, None, 16).query_index)
    assert len(build_plan("deft_node_chunk", tree, 64, None, 16).query_index) > fits_128
    with warnings.catch_warnings():
        warnings.simplefilter("error", TunedConfigWarning)
        plan, found = tuned_module.tuned_plan("deft_node_chunk", tree, 16,
                                              torch.device("cuda", 0), max_entries=fits_128)
    assert (found.rung, found.chunk_size, plan.chunk_size) == ("fill", 128, 128)


def test_a_wave_chunk_too_fine_for_the_capacities_doubles_and_keeps_its_group(monkeypatch):
    """The waves rule picks chunks from 64: where that plan needs more entries than a
    TreeAttention sized for the default chunk holds (reason_10x500 at 8/1, sized as the bench
    sizes it), the chunk doubles with the table's group kept, not the defaults (c128 without
    a group ran 1.24x c128 g8 on an H200, session 13's bench)."""
    from deft.workloads import anchor

    tree = heldout.with_heads(anchor("reason_10x500_P1104"), 8, 1)
    monkeypatch.setattr(tuned_module, "_identity", lambda device: (H200.name, (9, 0)))
    monkeypatch.setattr(tuned_module, "resident_programs", lambda device: 264)
    found = tuned_config("deft_flatten", tree, H200.name, (9, 0), programs=264)
    assert (found.chunk_size, found.group_size) == (64, 8)
    sized = len(build_plan("deft_flatten", tree, None, None, 16).query_index)
    assert len(build_plan("deft_flatten", tree, 64, 8, 16).query_index) > sized
    assert len(build_plan("deft_flatten", tree, 128, 8, 16).query_index) <= sized
    with warnings.catch_warnings():
        warnings.simplefilter("error", TunedConfigWarning)
        plan, fitted = tuned_module.tuned_plan("deft_flatten", tree, 16, torch.device("cuda", 0),
                                               max_entries=sized)
    assert (fitted.chunk_size, fitted.group_size, fitted.rung) == (128, 8, found.rung)
    assert (plan.chunk_size, plan.group_size) == (128, 8)


# ---------------------------------------------------------------------------- held out, check
class FakeBench:
    """Time = 10 + |chunk - 256| / 64, + 1 at group 8: the best is c256 with any other group."""

    def __init__(self, strategy, tree, reference):
        self.closed = False

    def measure(self, candidates, rounds, progress=None):
        out = {}
        for c in candidates:
            if progress:
                progress(c)
            us = 10.0 + abs((c.chunk_size or 0) - 256) / 64 + (c.group_size == 8)
            out[c] = Measurement("ok", us, [us] * rounds)
        return out

    def close(self):
        self.closed = True


def lookup_c512(strategy, tree):
    return 512, 16, None, "exact"


def test_evaluate_reports_tuned_over_best_and_the_records():
    trees = heldout.shaped([("star", star(8, 600, 40))], ((32, 8), (4, 1)))
    rows = heldout.evaluate(trees, "deft_flatten", H200, lookup_c512, FakeBench, page_size=16,
                            dtype=torch.float16)
    assert [r["workload"] for r in rows] == ["star@32/8", "star@4/1"]
    for row in rows:
        assert row["best"]["chunk_size"] == 256 and row["best"]["group_size"] != 8
        assert row["tuned_over_best"] == pytest.approx(14.0 / 10.0)
        assert row["sizes"] and all(s["predicted_us"] > 0 and s["us"] for s in row["sizes"])
        tile = default_tile("deft_flatten", trees[0][1] if row["heads"] == [32, 8] else trees[1][1])
        assert all(s["tile"] == dataclasses.asdict(tile) for s in row["sizes"])
    summary = heldout.summarize(rows)["held_out"]
    assert summary["compared"] == 2 and summary["within_5pct"] == 0
    assert summary["worst_tuned_over_best"] == pytest.approx(1.4)
    assert not heldout.holds(rows)


def test_evaluate_stops_at_the_deadline():
    rows = heldout.evaluate([("a", star(2, 100, 10)), ("b", star(3, 100, 10))], "deft_flatten",
                            H200, lookup_c512, FakeBench, page_size=16, dtype=torch.float16,
                            deadline=0.0)
    assert rows == []


def test_check_says_whether_the_table_holds():
    result = evaluation.judge("check", "deft_flatten", H200, DEVICE, FakeBench, torch.float16,
                              ((32, 8),), lookup=lambda s, t: (256, 16, None, "exact"))
    assert result["format"] == heldout.FORMAT and result["complete"]
    assert len(result["rows"]) == len(heldout.CHECK_TREES) and result["holds"]
    candidates = [Candidate.from_dict(s) for s in result["rows"][0]["sizes"]]
    assert {c.chunk_size for c in candidates} == {128, 256, 384}  # one step either side
    assert set(result["trees"]) == {r["workload"] for r in result["rows"]}
    assert "the table still holds" in evaluation.judge_text(result, check=True)
    worse = evaluation.judge("check", "deft_flatten", H200, DEVICE, FakeBench, torch.float16,
                             ((4, 1),), lookup=lookup_c512)
    assert not worse["holds"] and "no longer holds" in evaluation.judge_text(worse, True)


def test_cli_check_runs_on_the_card(monkeypatch, tmp_path):
    monkeypatch.setattr("autotune.tune.detect_device", lambda: DEVICE)
    monkeypatch.setattr("autotune.measure.workbenches", lambda dtype: FakeBench)
    write("q32-n8192-s16-h8-g4-d128-float16", chunk=256)
    report = tmp_path / "check.json"
    result = CliRunner().invoke(main, ["autotune", "--gpu", "auto", "--check", "--heads", "32/8",
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    row = data["rows"][0]  # the stored c256 moved to the tree's waves, c384: 12 us over 10
    assert row["tuned"]["chunk_size"] == wave_chunk(TREE, 16, 2 * DEVICE["sm_count"],
                                                    small_grid_sms=DEVICE["sm_count"]) == 384
    assert row["rung"] == "exact" and row["tuned_over_best"] == pytest.approx(12.0 / 10.0)
    assert "fewshot_b20_P4000_L200@32/8" in result.output
    bad = CliRunner().invoke(main, ["autotune", "--gpu", "auto", "--check", "--heads", "32/5"])
    assert bad.exit_code == 2 and "multiple of KV heads" in bad.output


# ---------------------------------------------------------------------------- the refit
def test_spearman_on_known_rankings():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(4.5 * 5))


TRUE = {"launch_us": 6.0, "program_us": 1.5, "memory_efficiency": 0.7,
        "compute_efficiency": 0.3, "sm_bandwidth_fraction": 0.02}


def synthetic_sweep(noise=0.0, constants=TRUE):
    """Sizes of four small trees timed by the model itself with `constants` (times
    (1 + noise) on the held-out ones)."""
    truth = dataclasses.replace(H200, calibration=constants)
    trees = {"a": star(8, 3000, 100), "b": star(30, 2000, 50),
             "c": star(12, 5000, 80), "d": star(40, 1000, 20)}
    rows = []
    for name, tree in trees.items():
        role = "held_out" if name in "cd" else "tuning"
        sizes = []
        for chunk in (64, 128, 256, 512, 1024):
            for group in (None, 8):
                us = predict_latency(build_plan("deft_flatten", tree, chunk, group, 16),
                                     truth)["predicted_us"]
                sizes.append({"chunk_size": chunk, "group_size": group, "tile": None,
                              "status": "ok",
                              "us": us * (1 + noise if role == "held_out" else 1)})
        rows.append({"workload": name, "role": role, "sizes": sizes})
    return {"format": heldout.FORMAT, "device": DEVICE, "strategy": "deft_flatten",
            "dtype": "float16", "page_size": 16, "rows": rows,
            "trees": {name: tree_to_dict(tree) for name, tree in trees.items()}}


def test_refit_recovers_model_generated_times_and_judges_on_held_out_trees():
    fit = calibrate_sweep([synthetic_sweep()], max_evaluations=60)
    assert fit["tuning"]["points"] == fit["held_out"]["points"] == 20
    assert fit["held_out"]["median_abs_err"] < 0.02 and abs(fit["held_out"]["worst_err"]) < 0.05
    assert fit["held_out"]["median_abs_err"] < fit["held_out"]["median_abs_err_before"]
    assert fit["held_out"]["min_spearman"] > 0.95 and fit["meets_goals"]
    off = calibrate_sweep([synthetic_sweep(noise=0.5)], max_evaluations=60)
    assert off["held_out"]["median_abs_err"] == pytest.approx(1 / 3, abs=0.03)  # 1/1.5 - 1
    assert not off["meets_goals"]


def test_refit_tells_the_small_grid_kernel_from_the_two_cta_one():
    # the sweep's chunks give plans of at most one item per SM (small grid) and more
    # a softness inside the fit's bounds (from 0.05), shared by the KV bytes and the rest
    truth = {**TRUE, "tile_us": 1.2, "small_grid_tile_us": 0.6, "overlap_softness": 0.3}
    sweep = synthetic_sweep(constants=truth)
    small = {kernel_model.small_grid(build_plan(
        "deft_flatten", tree_from_dict(sweep["trees"][row["workload"]]), size["chunk_size"],
        size["group_size"], 16), H200) for row in sweep["rows"] for size in row["sizes"]}
    assert small == {True, False}
    fit = calibrate_sweep([sweep], max_evaluations=60)
    assert fit["constants"]["tile_us"] == pytest.approx(1.2, rel=0.02)
    assert fit["constants"]["small_grid_tile_us"] == pytest.approx(0.6, rel=0.02)
    assert fit["constants"]["kv_overlap_softness"] == pytest.approx(0.3, abs=0.03)
    assert "merge_query_step_us" not in fit["constants"]  # no tree runs the per-query merge
    assert fit["held_out"]["median_abs_err"] < 0.02


def test_refit_needs_tuning_trees_and_writes_a_fit(tmp_path):
    sweep = synthetic_sweep()
    with pytest.raises(ValueError, match="no measured size on a tuning tree"):
        calibrate_sweep([{**sweep, "rows": [r for r in sweep["rows"] if r["role"] != "tuning"]}])
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep))
    out = tmp_path / "fit.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(main, ["autotune", "--refit", str(path), "--report", str(out)])
    assert result.exit_code == 0, result.output
    fit = json.loads(out.read_text())
    assert fit["format"] == "deft-refit/1" and fit["card"] == H200.name
    assert "held_out" in result.output and "goals" in result.output


def test_predict_ranks_with_the_h200_refit_and_states_its_error(monkeypatch, tmp_path):
    calibrate_module = importlib.import_module("harness.bench.calibrate")  # not the function
    fits = tmp_path / "fits"
    monkeypatch.setattr(calibrate_module, "FITS_DIR", fits)
    monkeypatch.setattr("autotune.tune.detect_device", lambda: None)
    calibrate_module.write_fit({"format": "deft-refit/1", "card": H200.name, "constants": TRUE,
                                "held_out": {"median_abs_err": 0.1, "worst_err": -0.25,
                                             "min_spearman": 0.85}})
    assert (fits / "nvidia-h200.json").is_file()
    result = CliRunner().invoke(main, ["autotune", "--gpu", "a100", "--predict", "--workloads",
                                       "fewshot_b20_P4000_L200", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    log = store.read_table(tmp_path / "logs" / "nvidia-a100-sxm4-80gb.predicted.json")
    assert log.source == "predicted"
    assert log.settings["model"] == {"fitted_on": H200.name, "constants": TRUE,
                                     "held_out_median_abs_err": 0.1, "held_out_worst_err": -0.25,
                                     "held_out_min_spearman": 0.85}
    entry = log.strategies["deft_flatten"]["q32-n8192-s16-h8-g4-d128-float16"]
    a100 = dataclasses.replace(BUILTIN["a100"], calibration=TRUE)
    chosen = build_plan("deft_flatten", TREE, entry["chosen"]["chunk_size"],
                        entry["chosen"]["group_size"], 16)
    assert entry["chosen"]["predicted_us"] == pytest.approx(
        predict_latency(chosen, a100)["predicted_us"])


def test_cli_held_out_then_refit_end_to_end(monkeypatch, tmp_path):
    monkeypatch.setattr("autotune.tune.detect_device", lambda: DEVICE)
    monkeypatch.setattr("autotune.measure.workbenches", lambda dtype: FakeBench)
    report = tmp_path / "heldout.json"
    result = CliRunner().invoke(main, [
        "autotune", "--gpu", "auto", "--held-out", "--heads", "4/1", "--fit-trees",
        "fewshot_b20_P4000_L200", "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    roles = [row["role"] for row in data["rows"]]
    assert roles == ["held_out"] * len(heldout.HELD_OUT) + ["tuning"] and data["complete"]
    assert all(row["rung"] == "fill" and row["heads"] == [4, 1] for row in data["rows"])
    assert data["summary"]["held_out"]["compared"] == len(heldout.HELD_OUT)
    assert "held_out:" in result.output and "tuning:" in result.output
    fit_path = tmp_path / "fit.json"
    refit = CliRunner().invoke(main, ["autotune", "--refit", str(report), "--report",
                                      str(fit_path)])
    assert refit.exit_code == 0, refit.output
    fit = json.loads(fit_path.read_text())
    assert fit["tuning"]["points"] == len(data["rows"][-1]["sizes"])
    assert set(fit["held_out"]["spearman"]) == {f"{w}@4/1" for w in heldout.HELD_OUT}


def test_cli_held_out_trees_replace_the_built_in_list(monkeypatch, tmp_path):
    """--held-out-trees sweeps the named trees as the held-out ones, and needs --held-out."""
    monkeypatch.setattr("autotune.tune.detect_device", lambda: DEVICE)
    monkeypatch.setattr("autotune.measure.workbenches", lambda dtype: FakeBench)
    report = tmp_path / "fresh.json"
    trees = "star:leaves=12:root_tokens=600:leaf_tokens=20,fewshot_b20_P4000_L200"
    result = CliRunner().invoke(main, [
        "autotune", "--gpu", "auto", "--held-out", "--held-out-trees", trees, "--heads", "4/1",
        "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert [row["role"] for row in data["rows"]] == ["held_out", "held_out"]
    assert [row["workload"] for row in data["rows"]] == [
        "star:leaves=12:root_tokens=600:leaf_tokens=20@4/1", "fewshot_b20_P4000_L200@4/1"]
    alone = CliRunner().invoke(main, ["autotune", "--gpu", "auto", "--held-out-trees", trees])
    assert alone.exit_code != 0 and "--held-out-trees goes with --held-out" in alone.output


def one_tile_replay(tmp_path, *sweeps) -> dict:
    """scripts/select_on_sweeps.py --one-tile's report on these sweeps (paths under docs/)."""
    root = Path(__file__).resolve().parents[1]
    report = tmp_path / "one-tile.json"
    done = subprocess.run([sys.executable, "scripts/select_on_sweeps.py", "--one-tile",
                           *(f"docs/{s}" for s in sweeps), "--json", str(report)],
                          cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(report.read_text())


def changed_rows(report) -> set:
    """(tree, heads) of the rows whose pick the rule changes, each from group 8 to 16."""
    changed = {(r["tree"], r["heads"]) for r in report["rows"]
               if r["half_tile"] != r["one_tile"]}
    assert all(r["half_tile"][1] == 8 and r["one_tile"][1] == 16 for r in report["rows"]
               if (r["tree"], r["heads"]) in changed)
    return changed


def test_one_tile_replay_on_session_14s_sweeps_gives_the_documented_rows(tmp_path):
    """--one-tile on session 14's fp16 sweeps (fresh trees and forests), the rows
    docs/autotune.md (session 14) names; only 4/1 rows of another bucket's group 8 change."""
    data = one_tile_replay(tmp_path, "autotune-h200-session14/heldout-fresh-32-8-4-1.json",
                           "autotune-h200-session14/heldout-forests-32-8-4-1.json")
    assert data["counts"] == {
        "float16 held_out": {"rows": 20, "half_tile": 17, "one_tile": 19},
        "float16 tuning": {"rows": 8, "half_tile": 7, "one_tile": 8}}
    assert changed_rows(data) == {
        ("star:leaves=40:root_tokens=3000:leaf_tokens=80", "4/1"),
        ("speculative:path=64:step=250", "4/1"),
        ("random:seed=23:nodes=60:max_tokens=512:roots=2:max_queries=3", "4/1")}


def test_one_tile_replay_on_session_16s_fresh_trees_gives_the_documented_rows(tmp_path):
    """--one-tile on the sweep that decided the rule (session 16: eight fresh trees at 4/1 and
    8/1, measured with the rule off): 14 -> 16 of 16 within 5%, six 4/1 rows changed."""
    data = one_tile_replay(tmp_path, "autotune-h200-session16/heldout-rule-4-1-8-1.json")
    assert data["counts"] == {
        "float16 held_out": {"rows": 16, "half_tile": 14, "one_tile": 16}}
    changed = changed_rows(data)
    assert len(changed) == 6 and {heads for _, heads in changed} == {"4/1"}


def test_one_tile_replay_on_session_16s_fresh_bf16_trees_gives_the_documented_rows(tmp_path):
    """--one-tile on nine fresh bf16 trees at 32/8 and 4/1 swept with the rule on (session 16,
    call 3): 12 -> 13 of 18 within 5%, five 4/1 rows changed, among them the 36-leaf star's
    1.000 -> 1.279 (the waves rule's chunk 64 at group 16)."""
    data = one_tile_replay(tmp_path, "autotune-h200-session16/heldout-bf16-fresh-32-8-4-1.json")
    assert data["counts"] == {
        "bfloat16 held_out": {"rows": 18, "half_tile": 12, "one_tile": 13}}
    changed = changed_rows(data)
    assert len(changed) == 5 and {heads for _, heads in changed} == {"4/1"}
    star = next(r for r in data["rows"] if r["tree"].startswith("star:leaves=36")
                and r["heads"] == "4/1")
    assert star["one_tile"][:2] == [64, 16] and star["one_tile"][2] > 1.25
