"""Tuned configs: the chunk size, group size and tile chosen per card and tree bucket, which
`deft.TreeAttention` plans and runs with when its caller fixes none of them.

Tables are files, one per card and source: ``<card>.json`` (measured on the card) and
``<card>.predicted.json`` (ranked by the IO model on the card's spec), ``<card>`` the device
name in lower case with other characters as ``-``; ``deft-cli autotune`` writes them
(docs/autotune.md). They are read from ``$DEFT_TUNED_CONFIGS`` (if set), then from the shipped
``deft/kernels/configs/``. A table holds the chosen configs only::

    {"format": "deft-configs/1", "source": "measured",
     "device": {"name": "NVIDIA H200", "capability": [9, 0], "sm_count": 132},
     "versions": {"torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"},
     "date": "2026-11-26T10:17:13Z",
     "strategies": {"deft_flatten": {"q64-n32768-s64-h8-g4-d128-float16": {
         "chunk_size": 1024, "group_size": 16,
         "tile": {"block_m": 64, "block_n": 64, "num_warps": 4, ...}}}}}

``tile`` null means the kernel's own (`deft.kernels.tile_config`). Bucket keys carry the
head shape (`deft.kernels.buckets`; keys without KV heads read as tuned at 32 query heads).
Lookup (`tuned_config`): the first rung with a config for the tree's bucket, or for the
nearest stored bucket within `deft.kernels.buckets.MAX_DISTANCE`, answers (for deft_flatten,
where the card's programs are known, its chunk is then moved to the tree at hand,
`flatten_chunk`; the group size and tile stay the rung's, except that a deft_flatten entry
stored without a group cap, looked up for a tree of more queries than its bucket holds, takes
the fill rung's group, one query tile of rows: "no cap" was only ever measured on work items
of that many queries, and on a random forest of 87 queries it ran 1.67-1.87x the best size,
docs/autotune.md, session 14):

1. ``exact``: a table of this card (same device name), measured before predicted;
2. ``dtype``: the same, for the other 16-bit dtype (a bf16 tree on the fp16 buckets, and back:
   the same kernel, bytes and MMA rate; `OTHER_HALF`);
3. ``sibling``: a table of another card of the same compute capability (an H200's on an H100),
   with a `TunedConfigWarning`;
4. ``fill``: where no table applies and the card's programs are known (a CUDA device: its SM
   count x `deft.kernels.fill.PROGRAMS_PER_SM`), the chunk that fills the machine
   (`deft.kernels.fill.fill_chunk`), a group of one query tile's rows
   (`deft.kernels.fill.fill_group`), the kernel's own tile;
5. ``default``: the strategy's default sizes (chunk `deft.strategies.DEFAULT_CHUNK_SIZE` where
   it takes one, no group cap) and the kernel's own tile, where nothing else applies or the
   device is not CUDA.

The tables are read once per process, and each (strategy, bucket, card) is looked up once, so a
`plan` pays a bucket, a dictionary look-up and, for deft_flatten, the wave count of ten chunk
sizes (a few tens of numpy calls; a `TreeAttention` skips both while `reuse_key` holds).
Reading never raises: a corrupted table or one of
another format is skipped with a `TunedConfigWarning`. A measured table from other torch or
triton versions (major.minor) is used with a one-line `TunedConfigWarning`: its sizes carry
over (they follow the tree), its tiles are dropped to the kernel's own (they follow the
compiler); ``deft-cli autotune --check`` re-measures whether it still holds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from deft.kernels.buckets import Bucket, bucket_of, nearest
from deft.kernels.fill import PROGRAMS_PER_SM, fill_chunk, fill_group, resident_programs
from deft.kernels.partials import TileConfig
from deft.kernels.table_format import TableError, check_table
from deft.kernels.waves import wave_chunk
from deft.plan import build_plan, check_parameters
from deft.strategies import USES_CHUNK_SIZE, USES_GROUP_SIZE
from deft.tree import Tree

FORMAT = "deft-configs/1"
RUNGS = ("exact", "dtype", "sibling", "fill", "default")
OTHER_HALF = {"float16": "bfloat16", "bfloat16": "float16"}
"""The 16-bit dtype whose buckets the ``dtype`` rung reads for a tree of the other. Measured
on an H200 (session 8, docs/autotune.md): bf16 held-out trees at 32/8 and 4/1 on the fp16
buckets, 22 of 24 within 5% of their bf16 sweep's best (the fp16 misses, the same two trees),
against 20 of 24 on the H100's bf16 table and the fill rung."""
WAVE_STRATEGY = "deft_flatten"
"""The strategy whose chunk `tuned_config` moves to the tree at hand (`flatten_chunk`)
wherever the card's programs are known."""

ONE_TILE_AT_ONE_KV_HEAD = True
"""A deft_flatten entry of a neighbouring bucket (other queries, tokens or sharing than the
tree's own), at one KV head, stored with a group of half a query tile of rows (8 at 4 query
heads per KV head), takes one query tile's (`deft.kernels.fill.fill_group`). Decided on eight
fresh trees at 4/1 and 8/1 on an H200 (docs/autotune.md, session 16: 14 -> 16 of 16 within 5%
of the best); off, the lookup as it was (`scripts/select_on_sweeps.py --one-tile`)."""


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped tables."""

CONFIG_ENV = "DEFT_TUNED_CONFIGS"
"""A directory of tables searched before the shipped ones (e.g. where ``deft-cli autotune
--output`` wrote)."""

class TunedConfigWarning(UserWarning):
    """A tuned table was skipped, or a config came from a sibling card or the defaults."""


@dataclass(frozen=True)
class Tuned:
    """A looked-up config and where it came from.

    Attributes
    ----------
    chunk_size, group_size : int or None
        Sizes to plan with.
    config : TileConfig or None
        Tile to run with (None: the kernel's own).
    rung : str
        One of `RUNGS`.
    bucket : str
        The tree's bucket key.
    source : str or None
        ``measured`` or ``predicted`` (the table's); None for the defaults.
    table : str or None
        Path of the table used.
    matched : str or None
        The stored bucket key used (may differ from `bucket`: the nearest one).
    """

    chunk_size: int | None
    group_size: int | None
    config: TileConfig | None
    rung: str
    bucket: str
    source: str | None = None
    table: str | None = None
    matched: str | None = None


@dataclass
class Configs:
    """One card's chosen configs (module docstring for the file).

    Attributes
    ----------
    source : str
        ``"measured"`` or ``"predicted"``.
    device : dict
        ``name``, ``capability`` ([major, minor]) and ``sm_count``.
    versions : dict
        ``torch``, ``triton`` and ``cuda`` of the machine that chose them.
    strategies : dict
        Strategy name -> bucket key -> config (``chunk_size``, ``group_size``, ``tile``).
    date : str or None
    """

    source: str
    device: dict
    versions: dict
    strategies: dict
    date: str | None = None

    def to_dict(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data) -> "Configs":
        """Parse and check a table dict; raises TableError naming the first problem."""
        check_table(data, FORMAT)
        return cls(data["source"], data["device"], data["versions"], data["strategies"],
                   data.get("date"))

    def without_tiles(self) -> "Configs":
        """The same configs with every tile dropped to the kernel's own (null)."""
        return dataclasses.replace(self, strategies={
            strategy: {key: {**config, "tile": None} for key, config in buckets.items()}
            for strategy, buckets in self.strategies.items()})

    def entry(self, strategy: str, bucket: Bucket) -> tuple[str, tuple] | None:
        """The config of the stored bucket nearest to `bucket` (`deft.kernels.buckets.nearest`):
        (its key, (chunk_size, group_size, TileConfig or None)), or None."""
        buckets = self.strategies.get(strategy, {})
        found = nearest(bucket, buckets)
        return None if found is None else (found[0], parse_config(buckets[found[0]]))


# ---------------------------------------------------------------------------- lookup
REUSE_TOKENS = 128
"""The token bucket of `reuse_key` (the waves rule's least chunk until session 13; kept at 128
when it went to 64, so that a decode step looks up no more often than before)."""


def reuse_key(tree: Tree) -> tuple:
    """What `deft.TreeAttention.plan` reuses its last tuned choice under: the tree's table
    bucket (`deft.kernels.buckets.bucket_of`, so the group size and tile are the lookup's), its
    structure (parents and query counts), its attention shape, and its token count in buckets
    of `REUSE_TOKENS`.

    A decode step adds a token per query, so a run's steps reuse the choice until a branch forks
    or dies, the tokens cross a bucket or the tree changes table bucket; the steps between skip
    the wave count (tens of µs of numpy a plan), whose chunk may then be up to REUSE_TOKENS
    tokens old: an approximation of the waves rule, not the rule itself.
    """
    return (bucket_of(tree).key, tree.parent.tobytes(), tree.queries.tobytes(),
            tree.num_tokens // REUSE_TOKENS, tree.attention)


def tuned_plan(strategy: str, tree: Tree, page_size: int, device: torch.device,
               max_entries: int, build=None, tuned=None):
    """The plan `deft.TreeAttention.plan` runs when its caller fixed no size and no tile.

    Looks the config up for `device` (CUDA only; elsewhere the defaults) and builds its plan.
    A ``fill`` chunk, or a deft_flatten chunk of the waves rule, whose plan needs more
    (partition, query) entries than ``max_entries`` is doubled until the plan fits (at the
    latest at the default chunk, which the default capacities are sized for); any other tuned
    plan that does not fit falls back to the defaults, with a `TunedConfigWarning`.

    Parameters
    ----------
    build : callable, optional
        ``build(chunk_size, group_size) -> (plan, entries)``; default: `deft.plan.build_plan`
        (`TreeAttention` passes its node planner, which builds the device arrays directly).
    tuned : Tuned, optional
        A choice returned before for a tree of the same `reuse_key`: built as it is (and fitted
        to ``max_entries`` as a fresh one is), without a lookup.

    Returns
    -------
    plan : deft.plan.Plan, or what `build` returns
    tuned : Tuned
    """
    if build is None:
        def build(chunk, group):
            plan = build_plan(strategy, tree, chunk, group, page_size)
            return plan, len(plan.query_index)

    if tuned is None:
        identity = _identity(device)
        tuned = (tuned_config(strategy, tree, *identity,
                              programs=lambda: resident_programs(device))
                 if identity is not None else _defaults(strategy, bucket_of(tree).key))
    plan, entries = build(tuned.chunk_size, tuned.group_size)
    if (tuned.rung == "fill" or strategy == WAVE_STRATEGY) and entries > max_entries:
        # the capacities are sized for the default chunk: a chunk of the fill rung or of the
        # waves rule (which goes below it) doubles up to it, its group kept
        default_chunk = _defaults(strategy, tuned.bucket).chunk_size
        while entries > max_entries and tuned.chunk_size < default_chunk:
            tuned = dataclasses.replace(tuned, chunk_size=tuned.chunk_size * 2)
            plan, entries = build(tuned.chunk_size, tuned.group_size)
    if tuned.rung != "default" and entries > max_entries:
        warnings.warn(f"{strategy}: the {tuned.rung} config (chunk {tuned.chunk_size}, group "
                      f"{tuned.group_size}) needs more entries than max_entries={max_entries}: "
                      "planning with the defaults", TunedConfigWarning, stacklevel=3)
        tuned = _defaults(strategy, tuned.bucket)
        plan, _ = build(tuned.chunk_size, tuned.group_size)
    return plan, tuned


def tuned_config(strategy: str, tree: Tree, device_name: str, capability,
                 programs=None) -> Tuned:
    """The config for `strategy` on `tree` on the card `device_name` (rungs: module docstring).

    Parameters
    ----------
    strategy : str
    tree : Tree
    device_name : str
        As ``torch.cuda.get_device_name`` reports it.
    capability : (int, int)
        The card's compute capability (siblings share it).
    programs : int or callable, optional
        Resident programs of the card (`deft.kernels.fill.resident_programs`), or a callable
        giving them. With them, ``fill`` answers where no table applies, and a deft_flatten
        chunk (a table's or the fill rung's) is moved to the tree at hand: the chunk whose work
        items run in the fewest, shortest waves (`flatten_chunk`), at the rung's group size.
        Without them ``fill`` is skipped and a table's chunk is used as stored.
    """
    bucket = bucket_of(tree)
    found = _lookup(strategy, bucket, device_name, tuple(capability), config_dirs())
    if strategy == WAVE_STRATEGY and found.group_size is None and found.matched and (
            tree.num_queries > Bucket.parse(found.matched).queries):
        # no cap was measured on at most the stored bucket's queries: on more, one query tile
        found = dataclasses.replace(found, group_size=fill_group(tree))
    if (ONE_TILE_AT_ONE_KV_HEAD and strategy == WAVE_STRATEGY and found.matched
            and tree.attention.kv_heads == 1 and found.group_size is not None
            and 2 * found.group_size == fill_group(tree)
            and not _same_sizes(Bucket.parse(found.matched), bucket)):
        # half a tile carried from another tree's bucket: one tile
        found = dataclasses.replace(found, group_size=fill_group(tree))
    if programs is None or strategy not in USES_CHUNK_SIZE:
        return found
    programs = programs() if callable(programs) else programs
    if found.rung == "default":
        group = fill_group(tree) if strategy in USES_GROUP_SIZE else None
        found = dataclasses.replace(found, chunk_size=fill_chunk(strategy, tree, programs),
                                    group_size=group, rung="fill")
    if strategy == WAVE_STRATEGY:
        found = dataclasses.replace(
            found, chunk_size=flatten_chunk(tree, found.group_size, programs, capability))
    return found


def _same_sizes(stored: Bucket, own: Bucket) -> bool:
    """Whether a stored bucket has the tree's own queries, tokens and sharing (the ``dtype``
    rung's entry of the other dtype counts as its own)."""
    return (stored.queries, stored.tokens, stored.sharing) == (
        own.queries, own.tokens, own.sharing)


def flatten_chunk(tree: Tree, group_size: int | None, programs: int, capability) -> int:
    """The deft_flatten chunk `tuned_config` runs at a group size on a card: the chunk of
    fewest, shortest waves of its ``programs`` (`deft.kernels.waves.wave_chunk`), plans of at
    most one work item per SM counted at the small-grid kernel's cost on sm_90 (Hopper's
    `deft.kernels.deft_flatten_sm90`). The tuner measures the chunks this gives (autotune)."""
    sms = programs // PROGRAMS_PER_SM if tuple(capability)[0] == 9 else 0
    return wave_chunk(tree, group_size, programs, small_grid_sms=sms)


def config_dirs() -> tuple[Path, ...]:
    """Where tables are read from: ``$DEFT_TUNED_CONFIGS`` (if set), then the shipped ones."""
    extra = os.environ.get(CONFIG_ENV)
    return ((Path(extra),) if extra else ()) + (CONFIG_DIR,)


def readable_configs() -> tuple:
    """(path, Configs) of every table of `config_dirs` that can be used (read once)."""
    return _tables(config_dirs())


@functools.lru_cache(maxsize=8)
def _tables(directories: tuple) -> tuple:
    return tuple((path, configs) for directory in directories
                 for path in sorted(Path(directory).glob("*.json"))
                 if (configs := read_configs(path)) is not None)


@functools.lru_cache(maxsize=1024)
def _lookup(strategy: str, bucket: Bucket, device_name: str, capability: tuple,
            directories: tuple) -> Tuned:
    tables = _tables(directories)
    exact = sorted((pair for pair in tables if pair[1].device["name"] == device_name),
                   key=lambda pair: pair[1].source != "measured")
    siblings = sorted((pair for pair in tables if pair[1].device["name"] != device_name
                       and tuple(pair[1].device["capability"]) == capability),
                      key=lambda pair: (pair[1].device["name"], pair[1].source != "measured"))
    other = (dataclasses.replace(bucket, dtype=OTHER_HALF[bucket.dtype])
             if bucket.dtype in OTHER_HALF else None)
    for rung, candidates, wanted in (("exact", exact, bucket), ("dtype", exact, other),
                                     ("sibling", siblings, bucket)):
        for path, configs in candidates if wanted is not None else ():
            found = configs.entry(strategy, wanted)
            if found is None:
                continue
            key, (chunk_size, group_size, tile) = found
            if rung == "sibling":
                warnings.warn(f"no tuned config of {strategy} for {device_name}: using "
                              f"{configs.device['name']}'s ({path}, same compute capability)",
                              TunedConfigWarning, stacklevel=3)
            return Tuned(chunk_size, group_size, tile, rung, bucket.key, configs.source,
                         str(path), key)
    return _defaults(strategy, bucket.key)


def _defaults(strategy: str, bucket_key: str) -> Tuned:
    chunk_size, group_size, _ = check_parameters(strategy, None, None, 1)
    return Tuned(chunk_size, group_size, None, "default", bucket_key)


@functools.lru_cache(maxsize=16)
def _identity(device: torch.device) -> tuple | None:
    """(device name, compute capability) of a CUDA device; None for any other device."""
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


# ---------------------------------------------------------------------------- files
def read_configs(path, quiet: bool = False) -> Configs | None:
    """The chosen configs at `path`, or None (`load_table`)."""
    return load_table(path, Configs.from_dict, quiet)


def load_table(path, parse, quiet: bool = False):
    """``parse(the JSON at path)``, or None (with a `TunedConfigWarning` unless `quiet`) when the
    file cannot be read or does not follow the format (`parse` raises TableError).

    A measured table of other torch or triton versions is returned with its tiles dropped
    (``table.without_tiles()``: sizes carry over, tiles do not), with a one-line
    `TunedConfigWarning` unless `quiet`.
    """
    try:
        table = parse(json.loads(Path(path).read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TableError, TypeError) as error:
        if not quiet:
            warnings.warn(f"tuned table {path} ignored, falling back: unreadable "
                          f"({type(error).__name__}: {error})", TunedConfigWarning, stacklevel=3)
        return None
    reason = version_mismatch(table.source, table.versions)
    if reason is None:
        return table
    if not quiet:
        warnings.warn(f"tuned table {path} {reason}: using its sizes, its tiles dropped to the "
                      "kernel's own (deft-cli autotune --check re-measures it)",
                      TunedConfigWarning, stacklevel=3)
    return table.without_tiles()


def version_mismatch(source: str, versions: dict) -> str | None:
    """Why a table does not apply to this torch and triton, or None.

    A measured table's tiles hold for the torch and triton (major.minor) that compiled them; a
    predicted one depends on the IO model alone and always applies.
    """
    if source != "measured":
        return None
    mine, theirs = release(current_versions()), release(versions)
    if mine != theirs:
        return (f"measured with torch {theirs[0]} / triton {theirs[1]}, this is torch "
                f"{mine[0]} / triton {mine[1]}")
    return None


def current_versions() -> dict:
    """torch, triton and CUDA versions of this process."""
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}


def release(versions: dict) -> tuple:
    """(torch, triton) as major.minor."""
    return tuple(".".join(str(versions.get(k) or "?").split(".")[:2]) for k in ("torch", "triton"))


def parse_config(config: dict) -> tuple:
    """(chunk_size, group_size, TileConfig or None) of a checked stored config."""
    tile = config.get("tile")
    return config["chunk_size"], config["group_size"], None if tile is None else TileConfig(**tile)
