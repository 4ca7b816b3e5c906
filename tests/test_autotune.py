"""autotune on a CPU: buckets, the search space, the configs and log files, the lookup rungs of
`deft.kernels.tuned`, the search with a fake bench, the CLI (GPU detection faked), and one real
measurement (under the Triton interpreter without CUDA).

Timings, the tuned tables and the quality numbers need the GPU run (scripts/autotune_gpu.sh).
"""

import json
import os
import subprocess
import sys
import warnings

import torch


import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from autotune import store, tune  # noqa: E402
from autotune.measure import Measurement, Workbench  # noqa: E402
from autotune.space import (  # noqa: E402
    Candidate,
    default_candidate,
    fits,
    neighbours,
    rank_sizes,
    rank_wave_sizes,
    size_space,
    smem_bytes,
    tile_space,
)
from autotune.store import Table, read_table, write_configs, write_table  # noqa: E402
from cli import main  # noqa: E402
from deft.kernels import tuned as tuned_module  # noqa: E402
from deft.kernels.buckets import MAX_DISTANCE, Bucket, bucket_of, nearest  # noqa: E402
from harness.timing import WallTimer  # noqa: E402
from deft.kernels.partials import TileConfig  # noqa: E402
from autotune.heldout import with_heads  # noqa: E402
from deft.kernels.tuned import (  # noqa: E402
    Configs,
    TunedConfigWarning,
    flatten_chunk,
    read_configs,
    tuned_config,
    tuned_plan,
)
from deft.tree import AttentionShape, Tree  # noqa: E402
from deft.workloads import ANCHORS, anchor, star  # noqa: E402
from iomodel.gpus import BUILTIN  # noqa: E402
from tests.tables import forget_tables  # noqa: E402

H100, H200, A100 = BUILTIN["h100"], BUILTIN["h200"], BUILTIN["a100"]
CHUNKED = "deft_node_chunk"
"""A strategy taking a chunk and a group whose stored chunk the lookup runs as it is: the
tuner's search of it is the general one (deft_flatten's keeps to wave chunks)."""
TREE = star(20, 4000, 200)  # fewshot_b20_P4000_L200
KEY = "q32-n8192-s16-h8-g4-d128-float16"
TILE = TileConfig(32, 64, 8, 3, 1)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where kernels run: compiled Triton takes CUDA tensors, the interpreter CPU ones."""


pytestmark = pytest.mark.usefixtures("isolated_tables")


def device(spec, capability=(9, 0)):
    return {"name": spec.name, "capability": list(capability), "sm_count": spec.sm_count}


def table(spec=H100, source="measured", chunk=1024, group=None, tile=TILE, key=KEY,
          versions=None, capability=(9, 0), strategy="deft_flatten") -> Table:
    chosen = {"chunk_size": chunk, "group_size": group,
              "tile": None if tile is None else vars(tile).copy(), "us": 10.0}
    return Table(source, device(spec, capability), versions or tuned_module.current_versions(),
                 {strategy: {key: {"workload": "w", "chosen": chosen, "candidates": []}}})


# ---------------------------------------------------------------------------- buckets
def test_anchor_buckets_are_distinct_and_round_trip():
    keys = [bucket_of(anchor(name)).key for name in ANCHORS]
    assert len(set(keys)) == len(ANCHORS)
    assert bucket_of(TREE).key == KEY
    assert all(Bucket.parse(key).key == key for key in keys)


def test_bucket_rounding_distance_and_nearest():
    b = bucket_of(star(20, 4000, 200))
    assert (b.queries, b.tokens, b.sharing, b.kv_heads, b.gqa, b.head_dim, b.dtype) == (
        32, 8192, 16, 8, 4, 128, "float16")
    assert bucket_of(star(17, 3000, 200)).queries == 32  # 17..32 queries share a bucket
    other = Bucket(64, 16384, 16, 8, 4, 128, "float16")
    assert b.distance(other) == 2
    assert b.distance(Bucket(32, 8192, 16, 4, 8, 128, "float16")) is None  # GQA differs
    assert b.distance(Bucket(32, 8192, 16, 1, 4, 128, "float16")) is None  # KV heads differ
    assert nearest(b, [other.key, "garbage"]) == (other.key, 2)
    far = Bucket(256, 8192, 16, 8, 4, 128, "float16")
    assert b.distance(far) > MAX_DISTANCE and nearest(b, [far.key]) is None
    for bad in ("q3-n8-s1-g4-d128-float16", "q32-n8192", "q32-n8192-s16-h0-g4-d128-float16"):
        with pytest.raises(ValueError):
            Bucket.parse(bad)


# ---------------------------------------------------------------------------- space
def test_shared_memory_filter():
    big = TileConfig(128, 128, 8, 3, 1)
    assert smem_bytes(big, 128, 2) == (3 * 2 * 128 + 128) * 128 * 2  # 224 KiB
    assert fits(big, H100, 128, 2) and not fits(big, H100, 256, 2)  # 227 KiB a block
    assert not fits(TileConfig(128, 128, 8, 3, 2), H100, 128, 2)  # two overflow an SM
    assert fits(TileConfig(64, 64, 4, 2, 2), H100, 128, 2)
    assert not fits(TileConfig(64, 64, 4, 2, 4), H100, 128, 2)
    space = tile_space(TREE, H100)
    assert space and all(fits(t, H100, 128, 2) for t in space)
    assert big in space and len(set(space)) == len(space)
    assert len(tile_space(star(2, 40, 8, attention=AttentionShape(32, 8, 256)), H100)) < len(space)
    wide = tile_space(star(2, 40, 8, attention=AttentionShape(32, 1, 128)), H100)
    assert min(t.block_m for t in wide) == 32  # raised to hold one query's 32 heads


def test_rank_sizes_dedupes_identical_plans_and_keeps_defaults():
    assert size_space("deft_flatten")[0] == (128, None)
    assert size_space("deft_node") == [(None, None), (None, 8), (None, 16), (None, 32),
                                       (None, 64)]
    ranked = rank_sizes("deft_flatten", TREE, H100, 16)
    sizes = [r.sizes for r in ranked]
    assert (128, None) in sizes and len(set(sizes)) == len(sizes)
    assert all(group in (None, 8, 16) for _, group in sizes)  # caps >= 20 queries: no cap
    assert [r.rank for r in ranked] == list(range(1, len(ranked) + 1))
    assert all(a.predicted_us <= b.predicted_us for a, b in zip(ranked, ranked[1:]))


def test_neighbours_change_one_knob():
    space = tile_space(TREE, H100)
    start = default_candidate("deft_flatten", TREE).tile
    options = neighbours(start, ("num_stages", "programs_per_sm"), space)
    assert start in options and {t.num_stages for t in options} == {2, 3, 5}
    # uncapped registers (about 255 a thread): two programs of 4 warps fill an SM's registers
    assert {t.programs_per_sm for t in options} == {1, 2}
    capped = neighbours(start, ("num_stages", "programs_per_sm", "max_registers"), space)
    triples = {(t.num_stages, t.programs_per_sm, t.max_registers) for t in capped}
    assert (2, 4, 128) in triples  # 4 x 48 KiB, 4 x 128 x 128 registers
    assert (2, 4, 168) not in triples  # registers
    assert (3, 3, 168) in triples  # 3 x 64 KiB
    assert (3, 4, 128) not in triples  # 4 x 64 KiB
    assert (5, 4, 128) not in triples  # 4 x 96 KiB
    assert all(t.block_m == start.block_m and t.block_n == start.block_n for t in capped)



def test_neighbour_chunks_and_the_chunk_stage():
    assert tune.neighbour_chunks(512) == [256, 384, 768, 1024]
    assert tune.neighbour_chunks(32) == [64, 128] and tune.neighbour_chunks(100) == []
    FakeBench.made.clear()
    t = tune.autotune([("w", TREE)], [CHUNKED], H100, device(H100), FakeBench, top_k=1)
    entry = t.strategies[CHUNKED][KEY]
    sizes, _ = FakeBench.made[0].calls[0]
    best = min(sizes, key=FakeBench.us)  # the default included
    chunks = {c["chunk_size"] for c in entry["candidates"] if c["stage"] == "chunks"}
    assert chunks == set(tune.neighbour_chunks(best.chunk_size))


def test_search_starts_from_the_stored_configs_of_the_bucket(isolated_tables):
    """A sibling card's choice is measured with the sizes: here (chunk 512, 2 stages) it is
    the fake bench's optimum and wins, though the IO model's top sizes may not hold it."""
    seed = TileConfig(64, 32, 4, 2, 2)
    write_configs(table(H200, chunk=512, group=16, tile=seed, strategy=CHUNKED),
                  isolated_tables / "h200.json")
    FakeBench.made.clear()
    t = tune.autotune([("w", TREE)], [CHUNKED], H100, device(H100), FakeBench, top_k=1)
    sizes, _ = FakeBench.made[0].calls[0]
    assert Candidate(512, 16, seed) in sizes
    chosen = Candidate.from_dict(t.strategies[CHUNKED][KEY]["chosen"])
    assert FakeBench.us(chosen) == FakeBench.us(Candidate(512, 16, seed))


def test_flatten_measures_the_stored_configs_at_their_wave_chunks(isolated_tables):
    """For deft_flatten a stored config's group and tile are measured at the chunk the lookup
    would run them with on the tuning tree, not at the stored chunk."""
    seed = TileConfig(64, 32, 4, 2, 2)
    write_configs(table(H200, chunk=512, group=16, tile=seed), isolated_tables / "h200.json")
    FakeBench.made.clear()
    tune.autotune([("w", TREE)], ["deft_flatten"], H100, device(H100), FakeBench, top_k=1)
    sizes, _ = FakeBench.made[0].calls[0]
    wave = flatten_chunk(TREE, 16, tune.card_programs(device(H100)), (9, 0))
    assert wave != 512 and Candidate(wave, 16, seed) in sizes
    assert Candidate(512, 16, seed) not in sizes

# ---------------------------------------------------------------------------- store
def test_table_round_trip_and_atomic_write(tmp_path, monkeypatch):
    tmp_path = tmp_path / "out"
    path = write_table(table(), tmp_path / "t.json")
    data = json.loads(path.read_text())
    assert data["format"] == store.FORMAT and data["source"] == "measured"
    assert data["device"] == {"name": H100.name, "capability": [9, 0], "sm_count": 132}
    assert set(data["versions"]) == {"torch", "triton", "cuda"} and data["date"]
    assert read_table(path).strategies == table().strategies
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temporary left

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "replace", broken)
    with pytest.raises(OSError):
        write_table(table(chunk=64), path)
    assert read_table(path).strategies == table().strategies  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_tables_merge_by_source_and_never_mix(tmp_path):
    path = tmp_path / "t.json"
    other = "q64-n4096-s64-g4-d128-float16"
    write_table(table(), path)
    write_table(table(key=other), path)
    assert len(read_table(path).strategies["deft_flatten"]) == 2  # same source: merged
    with pytest.raises(ValueError, match="holds a measured table"):
        write_table(table(source="predicted", tile=None), path)
    assert len(read_table(path).strategies["deft_flatten"]) == 2  # the measured one is intact
    predicted = tmp_path / "p.json"
    write_table(table(source="predicted", tile=None, key=other), predicted)
    write_table(table(), predicted)  # a measurement replaces a prediction
    replaced = read_table(predicted)
    assert replaced.source == "measured" and list(replaced.strategies["deft_flatten"]) == [KEY]


def test_configs_hold_the_chosen_configs_only(tmp_path):
    log = table()
    log.strategies["deft_flatten"][KEY]["default"] = {"chunk_size": 128, "group_size": None,
                                                      "tile": None, "us": 20.0}
    path = write_configs(log, tmp_path / "c.json")
    data = json.loads(path.read_text())
    assert data["format"] == tuned_module.FORMAT and data["device"] == log.device
    assert data["strategies"] == {"deft_flatten": {KEY: {
        "chunk_size": 1024, "group_size": None, "tile": vars(TILE)}}}
    configs = read_configs(path)
    assert configs.entry("deft_flatten", bucket_of(TREE)) == (KEY, (1024, None, TILE))
    assert Configs.from_dict(configs.to_dict()) == configs
    for broken in ({**data, "format": store.FORMAT},
                   {**data, "strategies": {"deft_node": {KEY: {"chunk_size": 64,
                                                              "group_size": None}}}},
                   {**data, "strategies": {"deft_flatten": {KEY: {
                       "chunk_size": 64, "group_size": None, "tile": {"block_m": 64}}}}}):
        path.write_text(json.dumps(broken))
        with pytest.warns(TunedConfigWarning, match="ignored, falling back"):
            assert read_configs(path) is None


@pytest.mark.parametrize("content", [
    "{not json", '{"format": "deft-autotune/0"}',
    json.dumps({**table().to_dict(), "source": "mixed"}),
    json.dumps({**table().to_dict(), "strategies": {"deft_flatten": {"bad-key": {}}}}),
    json.dumps({**table().to_dict(), "strategies": {"flash_decoding": {
        KEY: {"chosen": {"chunk_size": 64, "group_size": 8, "tile": None}}}}}),
], ids=["json", "format", "source", "bucket", "size"])
def test_corrupted_tables_warn_and_read_as_none(tmp_path, content):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.warns(TunedConfigWarning, match="ignored, falling back"):
        assert read_table(path) is None


def test_measured_tables_of_other_versions_keep_their_sizes_and_drop_their_tiles(tmp_path):
    old = {"torch": "1.13.0", "triton": "2.0.0", "cuda": "11.8"}
    write_table(table(versions=old), tmp_path / "m.json")
    with pytest.warns(TunedConfigWarning, match="measured with torch 1.13 / triton 2.0.*its "
                                                "tiles dropped"):
        read = read_table(tmp_path / "m.json")
    assert read.strategies["deft_flatten"][KEY]["chosen"]["chunk_size"] == 1024
    assert read.strategies["deft_flatten"][KEY]["chosen"]["tile"] is None
    write_configs(table(versions=old), tmp_path / "c.json")
    with pytest.warns(TunedConfigWarning, match="its tiles dropped"):
        configs = read_configs(tmp_path / "c.json")
    assert configs.entry("deft_flatten", bucket_of(TREE)) == (KEY, (1024, None, None))
    write_table(table(source="predicted", tile=None, versions=old), tmp_path / "p.json")
    assert read_table(tmp_path / "p.json") is not None  # predictions hold across versions


# ---------------------------------------------------------------------------- lookup
def test_lookup_exact_then_sibling_then_default(isolated_tables):
    write_configs(table(H200, chunk=512), store.table_path(H200.name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = tuned_config("deft_flatten", TREE, H200.name, (9, 0))
    assert (exact.rung, exact.chunk_size, exact.config, exact.source) == (
        "exact", 512, TILE, "measured")
    with pytest.warns(TunedConfigWarning, match="using NVIDIA H200's"):
        sibling = tuned_config("deft_flatten", TREE, H100.name, (9, 0))
    assert (sibling.rung, sibling.chunk_size) == ("sibling", 512)
    for name, capability in ((A100.name, (8, 0)), ("NVIDIA L4", (8, 9))):  # no IO-model rung
        default = tuned_config("deft_flatten", TREE, name, capability)
        assert (default.rung, default.chunk_size, default.group_size, default.config) == (
            "default", 128, None, None)


def test_a_bf16_tree_takes_this_cards_fp16_bucket_before_a_siblings_bf16_one(isolated_tables):
    """The dtype rung: the other 16-bit dtype's bucket of the same card, after an exact bucket
    and before another card's; float32 has no other half."""
    def in_dtype(dtype):
        parents = [None if p < 0 else int(TREE.node_ids[p]) for p in TREE.parent]
        return Tree(TREE.node_ids.tolist(), parents, TREE.tokens.tolist(), TREE.queries.tolist(),
                    AttentionShape(32, 8, 128, dtype))

    write_configs(table(H200, chunk=512), store.table_path(H200.name))
    bf16_key = KEY.replace("float16", "bfloat16")
    write_configs(table(H100, chunk=2048, key=bf16_key), store.table_path(H100.name))
    found = tuned_config("deft_flatten", in_dtype("bfloat16"), H200.name, (9, 0))
    assert (found.rung, found.chunk_size, found.matched, found.bucket) == (
        "dtype", 512, KEY, bf16_key)
    write_configs(table(H200, chunk=256, key=bf16_key), store.table_path(H200.name))
    forget_tables()
    assert tuned_config("deft_flatten", in_dtype("bfloat16"), H200.name, (9, 0)).rung == "exact"
    assert tuned_config("deft_flatten", in_dtype("float32"), H200.name, (9, 0)).rung == "default"


def test_measured_configs_come_before_predicted_ones_and_are_read_once(isolated_tables):
    predicted = table(A100, "predicted", chunk=256, tile=None, capability=(8, 0))
    write_configs(predicted, store.table_path(A100.name, predicted=True))
    found = tuned_config("deft_flatten", TREE, A100.name, (8, 0))
    assert (found.rung, found.source, found.chunk_size, found.config) == (
        "exact", "predicted", 256, None)
    write_configs(table(A100, chunk=512, capability=(8, 0)), store.table_path(A100.name))
    assert tuned_config("deft_flatten", TREE, A100.name, (8, 0)) == found  # read once
    forget_tables()
    found = tuned_config("deft_flatten", TREE, A100.name, (8, 0))
    assert (found.rung, found.source, found.chunk_size) == ("exact", "measured", 512)


def test_lookup_uses_the_nearest_bucket_and_the_env_directory(tmp_path, monkeypatch):
    extra = tmp_path / "mine"
    monkeypatch.setenv(tuned_module.CONFIG_ENV, str(extra))
    write_configs(table(chunk=256, key="q64-n8192-s16-g4-d128-float16"), store.table_path(
        H100.name, extra))
    found = tuned_config("deft_flatten", TREE, H100.name, (9, 0))
    assert (found.rung, found.chunk_size, found.matched, found.bucket) == (
        "exact", 256, "q64-n8192-s16-g4-d128-float16", KEY)
    assert found.table == str(store.table_path(H100.name, extra))


def test_an_uncapped_group_stored_for_fewer_queries_takes_one_query_tile(isolated_tables):
    """A deft_flatten entry without a group cap, tuned on a bucket of at most 32 queries, keeps
    no cap for trees of that many queries and caps a tree of more at the fill rung's group (one
    query tile of rows); a stored cap and the other strategies are left as stored."""
    write_configs(table(H200, chunk=512, group=None), store.table_path(H200.name))
    assert tuned_config("deft_flatten", TREE, H200.name, (9, 0)).group_size is None
    more = star(40, 4000, 100)  # 40 queries: bucket q64-n8192-s32, two steps from KEY
    found = tuned_config("deft_flatten", more, H200.name, (9, 0))
    assert (found.rung, found.matched, found.chunk_size) == ("exact", KEY, 512)
    assert found.group_size == 16  # 64 rows / 4 query heads per KV head
    assert tuned_config("deft_flatten", more, H200.name, (9, 0), programs=264).group_size == 16
    write_configs(table(H200, chunk=512, group=8), store.table_path(H200.name))
    forget_tables()
    assert tuned_config("deft_flatten", more, H200.name, (9, 0)).group_size == 8
    write_configs(table(H200, chunk=512, group=None, strategy=CHUNKED),
                  store.table_path(H200.name))
    forget_tables()
    assert tuned_config(CHUNKED, more, H200.name, (9, 0)).group_size is None


def test_one_tile_at_one_kv_head(isolated_tables, monkeypatch):
    """`tuned.ONE_TILE_AT_ONE_KV_HEAD` (on as it ships): a deft_flatten entry of a
    neighbouring bucket stored with half a query tile's group (8 at 4/1, 4 at 8/1) takes one
    tile's (16, 8) at one KV head, its chunk then moved at that group; the tree's own bucket (in
    either dtype), a full tile, more KV heads and the other strategies stay as stored."""
    own = with_heads(TREE, 4, 1)  # q32-n8192-s16
    near = with_heads(star(40, 4000, 100), 4, 1)  # q64-n8192-s32: two steps away
    path = store.table_path(H200.name)
    for key, group in (("q32-n8192-s16-h1-g4-d128-float16", 8), (KEY, 8),
                       ("q32-n8192-s16-h1-g8-d128-float16", 4)):
        write_configs(table(H200, chunk=128, group=group, key=key), path)
    write_configs(table(H200, chunk=128, group=8, key=KEY.replace("h8", "h1"),
                        strategy=CHUNKED), path)

    def group(tree, strategy="deft_flatten", **kwargs):
        return tuned_config(strategy, tree, H200.name, (9, 0), **kwargs).group_size

    assert tuned_module.ONE_TILE_AT_ONE_KV_HEAD is True
    found = tuned_config("deft_flatten", near, H200.name, (9, 0), programs=264)
    assert (found.matched, found.group_size) == ("q32-n8192-s16-h1-g4-d128-float16", 16)
    assert found.chunk_size == flatten_chunk(near, 16, 264, (9, 0))
    assert group(with_heads(near, 8, 1)) == 8  # 4 queries of 8 heads: half a tile, to one
    assert group(own) == 8  # the tree's own bucket
    bf16 = Tree(own.node_ids.tolist(), [None if p < 0 else int(own.node_ids[p])
                                        for p in own.parent], own.tokens.tolist(),
                own.queries.tolist(), AttentionShape(4, 1, 128, "bfloat16"))
    assert group(bf16) == 8  # the dtype rung's entry of its own sizes
    assert group(with_heads(star(40, 4000, 100), 32, 8)) == 8  # 8 KV heads
    assert group(near, CHUNKED) == 8
    write_configs(table(H200, chunk=128, group=16, key="q32-n8192-s16-h1-g4-d128-float16"),
                  path)
    forget_tables()
    assert group(near) == 16  # a full tile stored: as it is
    monkeypatch.setattr(tuned_module, "ONE_TILE_AT_ONE_KV_HEAD", False)
    write_configs(table(H200, chunk=128, group=8, key="q32-n8192-s16-h1-g4-d128-float16"),
                  path)
    forget_tables()
    assert group(near) == 8 and group(with_heads(near, 8, 1)) == 4  # off: as stored


def test_corrupted_exact_table_falls_back_with_a_warning(isolated_tables):
    store.table_path(H100.name).write_text("{broken")
    with pytest.warns(TunedConfigWarning, match="ignored"):
        assert tuned_config("deft_flatten", TREE, H100.name, (9, 0)).rung == "default"


def test_tuned_plan_respects_capacity(monkeypatch, isolated_tables):
    write_configs(table(chunk=32), store.table_path(H100.name))
    monkeypatch.setattr(tuned_module, "_identity",
                        lambda device: (H100.name, (9, 0)) if device.type == "cuda" else None)
    monkeypatch.setattr(tuned_module, "resident_programs", lambda device: H100.sm_count * 2)
    cuda = torch.device("cuda", 0)
    plan, tuned = tuned_plan("deft_flatten", TREE, 16, cuda, max_entries=10**6)
    moved = flatten_chunk(TREE, None, H100.sm_count * 2, (9, 0))  # the stored c32, moved
    assert (tuned.rung, plan.chunk_size, tuned.config) == ("exact", moved, TILE)
    with pytest.warns(TunedConfigWarning, match="planning with the defaults"):
        plan, tuned = tuned_plan("deft_flatten", TREE, 16, cuda,
                                 max_entries=len(plan.query_index) - 1)
    assert (tuned.rung, plan.chunk_size, tuned.config) == ("default", 128, None)
    plan, tuned = tuned_plan("deft_flatten", TREE, 16, torch.device("cpu"), 10**6)
    assert tuned.rung == "default" and plan.chunk_size == 128


# ---------------------------------------------------------------------------- the search
class FakeBench:
    """Time = a function of the candidate; one size fails to compile."""

    made = []

    def __init__(self, strategy, tree, reference):
        self.reference, self.calls = reference, []
        FakeBench.made.append(self)

    @staticmethod
    def us(c):
        return abs((c.chunk_size or 128) - 512) / 64 + c.tile.num_stages + c.tile.block_n / 64

    def measure(self, candidates, rounds, progress=None):
        self.calls.append((list(candidates), rounds))
        out = {}
        for c in candidates:
            if progress:
                progress(c)
            if c.chunk_size == 2048:
                out[c] = Measurement("error", reason="OutOfResources")
            else:
                out[c] = Measurement("ok", self.us(c), [self.us(c)] * rounds, 0.0)
        return out

    def close(self):
        pass


def test_search_measures_top_k_then_tiles_then_leaders():
    FakeBench.made.clear()
    t = tune.autotune([("w", TREE)], [CHUNKED], H100, device(H100), FakeBench, top_k=4)
    entry = t.strategies[CHUNKED][KEY]
    bench = FakeBench.made[0]
    assert bench.reference == default_candidate(CHUNKED, TREE)
    sizes, rounds = bench.calls[0]
    assert sizes[0] == bench.reference and len(sizes) <= 5 and rounds == 3
    ranked = rank_sizes(CHUNKED, TREE, H100, 16)
    assert {c.sizes for c in sizes[1:]} == {r.sizes for r in ranked[:4]}
    leaders, rounds = bench.calls[-1]
    assert leaders[0] == bench.reference and len(leaders) == 4 and rounds == 5
    chosen = Candidate.from_dict(entry["chosen"])
    assert chosen.tile.num_stages == 2 and chosen.tile.block_n == 32  # the tile descent
    assert entry["chosen"]["us"] == min(c["retimed_us"] for c in entry["candidates"]
                                        if c["retimed_us"] is not None)
    assert entry["speedup"] == pytest.approx(entry["default"]["us"] / entry["chosen"]["us"])
    assert {c["stage"] for c in entry["candidates"]} == {"sizes", "tiles", "chunks"}
    assert t.source == "measured" and t.tuning_s > 0 and t.settings["top_k"] == 4


def test_sizes_only_keeps_the_kernel_tile_and_tunes_each_head_shape():
    FakeBench.made.clear()
    shapes = [("w@32/8", TREE), ("w@4/1", with_heads(TREE, 4, 1))]
    t = tune.autotune(shapes, ["deft_flatten"], H100, device(H100), FakeBench, tiles=False)
    assert set(t.strategies["deft_flatten"]) == {KEY, "q32-n8192-s16-h1-g4-d128-float16"}
    for (_, tree), entry in zip(shapes, t.strategies["deft_flatten"].values()):
        assert {c["stage"] for c in entry["candidates"]} <= {"sizes", "chunks"}
        tile = default_candidate("deft_flatten", tree).tile
        assert all(Candidate.from_dict(c).tile == tile for c in entry["candidates"])
    assert t.settings["tiles"] is False


def test_exhaustive_measures_everything_and_budget_skips_tiles():
    FakeBench.made.clear()
    t = tune.autotune([("w", TREE)], [CHUNKED], H100, device(H100), FakeBench, exhaustive=True)
    entry = t.strategies[CHUNKED][KEY]
    ranked = rank_sizes(CHUNKED, TREE, H100, 16)
    assert len(set(FakeBench.made[0].calls[0][0])) == len(ranked)
    assert len(FakeBench.made[0].calls[1][0]) == len(tile_space(TREE, H100))
    failed = [c for c in entry["candidates"] if c["status"] == "error"]
    assert failed and failed[0]["reason"] == "OutOfResources" and failed[0]["us"] is None
    for strategy in (CHUNKED, "deft_flatten"):
        FakeBench.made.clear()
        tune.autotune([("w", TREE)], [strategy], H100, device(H100), FakeBench, budget_s=0)
        assert len(FakeBench.made[0].calls) == 2  # sizes, then straight to the leaders


def test_exhaustive_flatten_measures_every_wave_size_and_every_tile():
    FakeBench.made.clear()
    tune.autotune([("w", TREE)], ["deft_flatten"], H100, device(H100), FakeBench,
                  exhaustive=True)
    waves = rank_wave_sizes(TREE, H100, 16, tune.card_programs(device(H100)), (9, 0))
    sizes = FakeBench.made[0].calls[0][0]
    assert sizes[0] == default_candidate("deft_flatten", TREE)
    assert [c.sizes for c in sizes[1:]] == [r.sizes for r in waves]
    assert len(FakeBench.made[0].calls[1][0]) == len(tile_space(TREE, H100))


class GroupBench(FakeBench):
    """The fastest sizes are group 8 at twice its wave chunk on the tree (H200 programs), then
    group 16 at any chunk: a tuner choosing by time alone would store group 8 at that chunk,
    which the lookup would run at group 8's wave chunk instead."""

    def __init__(self, strategy, tree, reference):
        super().__init__(strategy, tree, reference)
        self.trap = (2 * flatten_chunk(tree, 8, tune.card_programs(device(H200)), (9, 0)), 8)

    def us(self, c):
        sizes = 1.0 if c.sizes == self.trap else 3.0 if c.group_size == 16 else 5.0
        return sizes + c.tile.num_stages + c.tile.block_n / 64


@pytest.mark.parametrize("bench", [FakeBench, GroupBench])
@pytest.mark.parametrize("tiles", [True, False])
@pytest.mark.parametrize("heads", [(32, 8), (4, 1)])
def test_flatten_choice_looked_up_for_its_tree_runs_as_measured(isolated_tables, bench, tiles,
                                                                heads):
    """The stored deft_flatten entry, looked up for the tree it was tuned on (the card's
    programs, as `TreeAttention` passes them), gives the chunk, group and tile measured."""
    tree = with_heads(TREE, *heads)
    card = device(H200)
    t = tune.autotune([("w", tree)], ["deft_flatten"], H200, card, bench, tiles=tiles)
    entry = t.strategies["deft_flatten"][bucket_of(tree).key]
    chosen = Candidate.from_dict(entry["chosen"])
    write_configs(t, store.table_path(H200.name))
    forget_tables()
    found = tuned_config("deft_flatten", tree, H200.name, (9, 0),
                         programs=tune.card_programs(card))
    assert found.rung == "exact"
    assert (found.chunk_size, found.group_size, found.config) == (
        chosen.chunk_size, chosen.group_size, chosen.tile)
    assert entry["chosen"]["us"] == min(c["retimed_us"] for c in entry["candidates"]
                                        if c["retimed_us"] is not None
                                        and c["chunk_size"] == flatten_chunk(
                                            tree, c["group_size"], tune.card_programs(card),
                                            (9, 0)))
    if bench is GroupBench:
        assert chosen.group_size == 16  # the trap is never measured: the lookup would not run it


def test_lookup_mismatches_finds_entries_the_lookup_does_not_reproduce(isolated_tables):
    from autotune.evaluation import lookup_mismatches

    workloads = [("w@32/8", TREE), ("w@4/1", with_heads(TREE, 4, 1))]
    t = tune.autotune(workloads, ["deft_flatten", CHUNKED], H200, device(H200), GroupBench)
    write_configs(t, store.table_path(H200.name))
    forget_tables()
    assert lookup_mismatches(t, workloads) == []
    entry = t.strategies["deft_flatten"][KEY]
    wave = entry["chosen"]["chunk_size"]
    entry["chosen"] = {**entry["chosen"], "chunk_size": 2 * wave}  # a chunk the lookup moves
    assert lookup_mismatches(t, workloads) == [
        f"deft_flatten on w@32/8 ({KEY}): chose c{2 * wave} g{entry['chosen']['group_size']}, "
        f"the lookup (exact) runs c{wave} g{entry['chosen']['group_size']}"]


def test_flatten_candidates_are_wave_chunks_of_their_groups():
    FakeBench.made.clear()
    card = device(H100)
    programs = tune.card_programs(card)
    t = tune.autotune([("w", TREE)], ["deft_flatten"], H100, card, FakeBench, top_k=8)
    entry = t.strategies["deft_flatten"][KEY]
    default = default_candidate("deft_flatten", TREE)
    measured = [Candidate.from_dict(c) for c in entry["candidates"]]
    assert default in measured and len(measured) > 1
    assert all(c.chunk_size == flatten_chunk(TREE, c.group_size, programs, (9, 0))
               for c in measured if c != default)
    waves = rank_wave_sizes(TREE, H100, 16, programs, (9, 0))
    assert {c.sizes for c in FakeBench.made[0].calls[0][0][1:]} == {r.sizes for r in waves}
    stages = {c["stage"] for c in entry["candidates"]}
    assert stages == {"sizes", "tiles", "groups"} and t.settings["programs"] == programs
    descent = {Candidate.from_dict(c).tile for c in entry["candidates"] if c["stage"] == "groups"}
    assert len(descent) == 1  # the other groups, at the tile the descent reached
    assert {c.sizes for c in measured if c.tile in descent} == {r.sizes for r in waves}


def test_one_bucket_per_workload_and_predicted_tables():
    FakeBench.made.clear()
    t = tune.autotune([("a", TREE), ("b", star(20, 4000, 200))], ["deft_flatten"], H100,
                      device(H100), FakeBench)
    assert len(FakeBench.made) == 1 and t.strategies["deft_flatten"][KEY]["workload"] == "a"
    p = tune.predict([("a", TREE)], ["deft_flatten", "flash_decoding"], H100, device(H100))
    entry = p.strategies["deft_flatten"][KEY]
    assert p.source == "predicted" and entry["chosen"]["tile"] is None
    assert entry["candidates"][0]["predicted_rank"] == 1
    assert Table.from_dict(json.loads(json.dumps(p.to_dict()))).source == "predicted"


def test_predicted_flatten_choice_is_the_best_predicted_wave_size(isolated_tables):
    card = device(H200)
    p = tune.predict([("a", TREE)], ["deft_flatten", CHUNKED], H200, card)
    waves = rank_wave_sizes(TREE, H200, 16, tune.card_programs(card), (9, 0))
    flatten, chunked = p.strategies["deft_flatten"][KEY], p.strategies[CHUNKED][KEY]
    assert (flatten["chosen"]["chunk_size"], flatten["chosen"]["group_size"]) == waves[0].sizes
    assert [(c["chunk_size"], c["group_size"]) for c in flatten["candidates"]] == [
        r.sizes for r in waves]
    assert flatten["default"]["chunk_size"] == 128 and flatten["default"]["group_size"] is None
    best = rank_sizes(CHUNKED, TREE, H200, 16)[0]
    assert (chunked["chosen"]["chunk_size"], chunked["chosen"]["group_size"]) == best.sizes
    write_configs(p, store.table_path(H200.name, predicted=True))
    found = tuned_config("deft_flatten", TREE, H200.name, (9, 0),
                         programs=tune.card_programs(card))
    assert (found.source, found.chunk_size, found.group_size) == ("predicted", *waves[0].sizes)


def test_quality_study_compares_tuned_with_every_size():
    from autotune.quality import study

    FakeBench.made.clear()
    tuned = tune.autotune([("w", TREE)], ["deft_flatten"], H100, device(H100), FakeBench)
    result = study([("w", TREE), ("other", star(3, 100, 10))], "deft_flatten", H100, tuned,
                   FakeBench, dtype=torch.float16, page_size=16)
    row, untuned = result["workloads"]
    assert len(row["sizes"]) == len(rank_sizes("deft_flatten", TREE, H100, 16))
    assert row["tuned_us"] == FakeBench.us(Candidate.from_dict(row["tuned"]))
    assert row["tuned_over_best"] <= 1 and -1 <= row["spearman"] <= 1
    assert untuned["tuned"] is None and untuned["tuned_over_best"] is None
    assert result["summary"]["compared"] == 1 and result["tuning_s"] == tuned.tuning_s


# ---------------------------------------------------------------------------- the CLI
def fake_gpu(monkeypatch, spec):
    monkeypatch.setattr(tune, "detect_device", lambda: None if spec is None else device(spec))


@pytest.mark.parametrize("found, asked, message", [
    (H100, "a100", "asks for 'NVIDIA A100-SXM4-80GB' but this machine has 'NVIDIA H100 80GB HBM3'"),
    (None, "h100", "has no CUDA GPU"),
    (None, "auto", "found no CUDA GPU"),
])
def test_cli_wrong_or_missing_gpu_exits_2(monkeypatch, tmp_path, found, asked, message):
    fake_gpu(monkeypatch, found)
    result = CliRunner().invoke(main, ["autotune", "--gpu", asked, "--output", str(tmp_path)])
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert not list(tmp_path.glob("*.json"))


def test_cards_match_their_alias_by_name(monkeypatch):
    pcie = {"name": "NVIDIA H100 PCIe", "capability": [9, 0], "sm_count": 114}
    monkeypatch.setattr(tune, "detect_device", lambda: pcie)
    assert tune.resolve_card("h100") == (H100, pcie) == tune.resolve_card("auto")
    with pytest.raises(ValueError, match="has 'NVIDIA H100 PCIe'"):
        tune.resolve_card("h200")
    assert tune.resolve_card("h200", predict=True)[1]["name"] == H200.name
    assert tune.card_spec(pcie["name"]) == H100 and tune.card_spec("NVIDIA L4") is None


def test_cli_predict_writes_a_labelled_predicted_table(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, None)
    result = CliRunner().invoke(main, ["autotune", "--gpu", "a100", "--predict", "--workloads",
                                       "fewshot_b20_P4000_L200", "--output", str(tmp_path),
                                       "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "nvidia-a100-sxm4-80gb.predicted.json").read_text())
    assert data["source"] == "predicted" and data["device"]["capability"] == [8, 0]
    assert data["strategies"]["deft_flatten"][KEY]["tile"] is None
    log = read_table(tmp_path / "logs" / "nvidia-a100-sxm4-80gb.predicted.json")
    assert log.source == "predicted" and log.strategies["deft_flatten"][KEY]["candidates"]
    assert '"source": "predicted"' in result.output
    model = log.settings["model"]  # ranked with the shipped H200 refit, its error beside it
    assert model["fitted_on"] == "NVIDIA H200" and model["held_out_worst_err"] is not None
    printed = CliRunner().invoke(main, ["autotune", "--gpu", "a100", "--predict", "--workloads",
                                        "fewshot_b20_P4000_L200", "--output", str(tmp_path)])
    assert printed.exit_code == 0, printed.output
    flat = " ".join(printed.output.split())
    assert "fitted on NVIDIA H200" in flat and "not measured on this card" in flat
    assert f"worst {model['held_out_worst_err']:+.0%}" in flat


def test_model_caption_signs_the_worst_error_only():
    from autotune.report import model_caption

    for worst, shown in ((0.22, "worst +22%"), (-0.25, "worst -25%")):
        caption = model_caption({"fitted_on": "NVIDIA H200", "held_out_median_abs_err": 0.04,
                                 "held_out_worst_err": worst, "held_out_min_spearman": 0.96})
        assert shown in caption and "median |err| 4%," in caption and "min 0.96" in caption
    assert "worst -," in model_caption({"fitted_on": "NVIDIA H200"})


def test_cli_predict_never_replaces_a_measured_table(monkeypatch, isolated_tables):
    fake_gpu(monkeypatch, None)
    measured = write_configs(table(H100), store.table_path(H100.name))
    before = measured.read_text()
    predict = ["autotune", "--gpu", "h100", "--predict", "--workloads", "fewshot_b20_P4000_L200"]
    refused = CliRunner().invoke(main, predict + ["--output", str(measured)])
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert "holds a measured table" in refused.output and measured.read_text() == before
    result = CliRunner().invoke(main, predict)  # the default: its own labelled file
    assert result.exit_code == 0, result.output
    assert measured.read_text() == before
    beside = read_configs(store.table_path(H100.name, predicted=True))
    assert beside.source == "predicted" and KEY in beside.strategies["deft_flatten"]
    assert read_table(store.LOG_DIR / "nvidia-h100-80gb-hbm3.predicted.json") is not None


def test_cli_measures_on_the_card_asked_for(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, H200)
    monkeypatch.setattr("autotune.measure.workbenches", lambda dtype: FakeBench)
    out = tmp_path / "h200.json"
    result = CliRunner().invoke(main, ["autotune", "--gpu", "h200", "--workloads",
                                       "fewshot_b20_P4000_L200", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert read_configs(out).source == "measured" and "speedup" in result.output
    assert read_table(tmp_path / "logs" / "h200.json").strategies["deft_flatten"][KEY][
        "candidates"]


def test_cli_rejects_unknown_strategies(monkeypatch):
    fake_gpu(monkeypatch, H100)
    result = CliRunner().invoke(main, ["autotune", "--gpu", "h100", "--strategies", "vanilla_tree"])
    assert result.exit_code == 2 and "unknown strategy" in result.output


# ---------------------------------------------------------------------------- measuring
def test_workbench_measures_and_checks_candidates():
    tree = star(2, 40, 8, attention=AttentionShape(4, 2, 16))
    reference = default_candidate("deft_flatten", tree)
    bench = Workbench("deft_flatten", tree, reference, device=DEVICE, timer=WallTimer(2))
    other = Candidate(16, 8, TileConfig(16, 32, 4, 1, 1))
    broken = Candidate(16, 0, reference.tile)  # build_plan refuses group_size 0
    seen = []
    results = bench.measure([reference, other, broken], rounds=2, progress=seen.append)
    assert seen == [reference, other, broken]
    for candidate in (reference, other):
        measured = results[candidate]
        assert measured.status == "ok" and len(measured.rounds_us) == 2 and measured.us > 0
    assert results[reference].rel_err == 0 and results[other].rel_err < 2e-3
    assert results[broken].status == "error" and "group_size" in results[broken].reason
    bench.close()


def test_tree_attention_consults_tables_only_when_nothing_is_fixed():
    from deft import TreeAttention
    from deft.plan_buffers import paged_cache

    tree = star(2, 40, 8, attention=AttentionShape(4, 2, 16))
    kv = torch.zeros(tree.num_tokens, 2, 16)
    _, _, table = paged_cache(tree, kv, kv, 16)
    free = TreeAttention("deft_flatten", max_queries=2, max_tokens=56, device="cpu")
    assert free.tuned_from is None and (free.chunk_size, free.group_size) == (None, None)
    plan = free.plan(tree, table)
    assert free.tuned_from == "default"  # no CUDA device: the defaults
    assert (plan.chunk_size, plan.group_size) == (128, None)
    fixed = TreeAttention("deft_flatten", 64, max_queries=2, max_tokens=56, device="cpu")
    assert fixed.plan(tree, table).reference.chunk_size == 64 and fixed.tuned_from is None
    assert (fixed.chunk_size, fixed.group_size) == (64, None)


def test_tuned_tree_attention_reports_the_sizes_its_plans_use(monkeypatch, isolated_tables):
    from deft import TreeAttention
    from deft.plan_buffers import paged_cache

    tree = star(2, 40, 8, attention=AttentionShape(4, 2, 16))
    kv = torch.zeros(tree.num_tokens, 2, 16)
    _, _, pages = paged_cache(tree, kv, kv, 16)
    write_configs(table(chunk=1024, group=16, key=bucket_of(tree).key),
                  store.table_path(H100.name))
    monkeypatch.setattr(tuned_module, "_identity", lambda device: (H100.name, (9, 0)))
    monkeypatch.setattr(tuned_module, "resident_programs", lambda device: H100.sm_count * 2)
    attention = TreeAttention("deft_flatten", max_queries=2, max_tokens=56, device="cpu")
    plan = attention.plan(tree, pages)
    assert attention.tuned_from == "exact" and attention._tuned_config == TILE
    moved = flatten_chunk(tree, 16, H100.sm_count * 2, (9, 0))  # the stored chunk, moved
    assert (plan.chunk_size, plan.group_size) == (moved, 16) == (
        plan.reference.chunk_size, plan.reference.group_size)
    assert (attention.chunk_size, attention.group_size) == (None, None)  # per plan, tuned


def test_plan_reads_the_tables_without_autotune_or_the_io_model():
    """plan() looks the shipped tables up in the core: autotune, iomodel and reference stay
    unimported (no IO-model ranking inside a decode step)."""
    script = """
import sys, warnings, torch
from deft import TreeAttention
from deft.kernels import tuned
from deft.plan_buffers import paged_cache
from deft.workloads import star
tuned._identity = lambda device: ("NVIDIA H200", (9, 0))
tuned.resident_programs = lambda device: 264
tree = star(20, 4000, 200)
kv = torch.zeros(tree.num_tokens, 1, 1)
_, _, pages = paged_cache(tree, kv, kv, 16)
warnings.simplefilter("ignore")
attention = TreeAttention(max_queries=20, max_tokens=8000, device="cpu")
attention.plan(tree, pages)
assert attention.tuned_from in ("exact", "default"), attention.tuned_from
above = sorted({m.split(".")[0] for m in sys.modules} & {"autotune", "iomodel", "reference"})
assert not above, above
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
