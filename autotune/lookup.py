"""Run-time lookup of a tuned config for one strategy, tree and card.

Rungs, in order; the first that has a config for the tree's bucket (or the nearest stored
bucket within `autotune.buckets.MAX_DISTANCE`) answers:

1. ``exact``: a table of this card (same device name), measured or predicted;
2. ``sibling``: a table of another card of the same compute capability (an H200's table on an
   H100, say), with an `AutotuneWarning`;
3. ``heuristic``: the IO model's fastest sizes on this card's built-in spec (`card_spec`;
   `autotune.space.rank_sizes`), the kernel's own tile; computed once per bucket and kept;
4. ``default``: DESIGN.md's defaults (chunk 128, no group cap, the kernel's tile), when no rung
   applies (no CUDA device, a card without a built-in spec).

Only `deft.TreeAttention` calls this (through `tuned_plan`), and only when its chunk_size,
group_size and config are all None; `reference` and `build_plan` never consult tables.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

from autotune.buckets import bucket_of
from autotune.space import default_sizes, rank_sizes
from autotune.store import AutotuneWarning, chosen_config, config_dirs, read_table, sanitise
from deft.kernels.partials import TileConfig
from deft.tree import Tree
from iomodel.gpus import BUILTIN, builtin_gpu
from deft.plan import build_plan

RUNGS = ("exact", "sibling", "heuristic", "default")


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
        ``measured`` or ``predicted`` (a table's), ``io-model`` (heuristic), None (default).
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


def lookup(strategy: str, tree: Tree, device_name: str, capability, page_size: int = 16) -> Tuned:
    """The config for `strategy` on `tree` on the card `device_name` (rungs: module docstring).

    Parameters
    ----------
    strategy : str
    tree : Tree
    device_name : str
        As ``torch.cuda.get_device_name`` reports it.
    capability : (int, int)
        The card's compute capability (siblings share it).
    page_size : int
        Page size the heuristic plans with.
    """
    bucket = bucket_of(tree)
    tables = _readable_tables()
    exact = [(p, t) for p, t in tables if t.device["name"] == device_name]
    siblings = sorted(((p, t) for p, t in tables if t.device["name"] != device_name
                       and tuple(t.device["capability"]) == tuple(capability)),
                      key=lambda pair: pair[1].device["name"])
    for rung, candidates in (("exact", exact), ("sibling", siblings)):
        for path, table in candidates:
            found = table.entry(strategy, bucket)
            if found is None:
                continue
            key, entry, _ = found
            if rung == "sibling":
                warnings.warn(f"no tuned config of {strategy} for {device_name}: using "
                              f"{table.device['name']}'s ({path}, same compute capability)",
                              AutotuneWarning, stacklevel=2)
            return Tuned(*chosen_config(entry), rung=rung, bucket=bucket.key,
                         source=table.source, table=str(path), matched=key)
    gpu = card_spec(device_name)
    if gpu is not None:
        best = _heuristic(strategy, tree, gpu, page_size, bucket.key)
        return Tuned(best.chunk_size, best.group_size, None, "heuristic", bucket.key, "io-model")
    return Tuned(*default_sizes(strategy), None, "default", bucket.key)


def card_spec(device_name: str):
    """The built-in spec (`iomodel.gpus.BUILTIN`) of a device name: the exact name, else the
    alias among the name's words (``NVIDIA H100 PCIe`` -> h100's); None for other cards."""
    words = sanitise(device_name).split("-")
    return builtin_gpu(device_name) or next(
        (spec for alias, spec in BUILTIN.items() if alias in words), None)


def tuned_plan(strategy: str, tree: Tree, page_size: int, device, max_entries: int):
    """The plan `deft.TreeAttention.plan` runs when nothing was fixed by its caller.

    Looks the config up for `device` (CUDA only; elsewhere the defaults) and builds its plan.
    A tuned plan that needs more (partition, query) entries than the caller's ``max_entries``
    falls back to the defaults, with an `AutotuneWarning`.

    Returns
    -------
    plan : deft.plan.Plan
    tuned : Tuned
    """
    if getattr(device, "type", None) == "cuda":
        tuned = lookup(strategy, tree, *_identity(device.index or 0), page_size=page_size)
    else:
        tuned = Tuned(*default_sizes(strategy), None, "default", bucket_of(tree).key)
    plan = build_plan(strategy, tree, tuned.chunk_size, tuned.group_size, page_size)
    if tuned.rung != "default" and len(plan.query_index) > max_entries:
        warnings.warn(f"{strategy}: the {tuned.rung} config (chunk {tuned.chunk_size}, group "
                      f"{tuned.group_size}) needs more entries than max_entries={max_entries}: "
                      "planning with the defaults", AutotuneWarning, stacklevel=3)
        tuned = Tuned(*default_sizes(strategy), None, "default", tuned.bucket)
        plan = build_plan(strategy, tree, tuned.chunk_size, tuned.group_size, page_size)
    return plan, tuned


def stored_configs(strategy: str, tree: Tree) -> list:
    """The chosen (chunk_size, group_size, TileConfig or None) of the tree's bucket in every
    readable table, any card (tuning starts from them: a card's best is often its sibling's)."""
    bucket = bucket_of(tree)
    found = []
    for _, table in _readable_tables():
        match = table.entry(strategy, bucket)
        if match is not None:
            found.append(chosen_config(match[1]))
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------------------- caches
def _readable_tables() -> list:
    """(path, Table) of every table lookups may use (unreadable or mismatched ones skipped)."""
    return [(path, table) for path in _table_paths()
            if (table := _read(path, *_stamp(path))) is not None]


def _table_paths() -> list[Path]:
    return [path for directory in config_dirs() for path in sorted(directory.glob("*.json"))]


def _stamp(path: Path) -> tuple:
    """(mtime_ns, size): a table is re-read (and re-checked) only when it changes."""
    try:
        status = path.stat()
    except OSError:
        return 0, 0
    return status.st_mtime_ns, status.st_size


@functools.lru_cache(maxsize=64)
def _read(path: Path, mtime_ns: int, size: int):
    return read_table(path)


@functools.lru_cache(maxsize=16)
def _identity(index: int) -> tuple:
    """(device name, compute capability) of a CUDA device."""
    import torch

    return torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)


_HEURISTIC: dict = {}


def _heuristic(strategy, tree, gpu, page_size, bucket_key):
    """The IO model's fastest sizes, ranked on the first tree seen of each bucket."""
    key = (strategy, gpu.name, page_size, bucket_key)
    if key not in _HEURISTIC:
        _HEURISTIC[key] = rank_sizes(strategy, tree, gpu, page_size)[0]
    return _HEURISTIC[key]
