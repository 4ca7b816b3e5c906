"""Tuned tables on disk: ``autotune/configs/<sanitised device name>.json``, one per card.

A table holds, per strategy and tree bucket (`autotune.buckets`), the chosen config and every
candidate that was measured (or ranked), plus what it was tuned on::

    {"format": "deft-autotune/1", "source": "measured",
     "device": {"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "sm_count": 132},
     "versions": {"torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"},
     "date": "2025-05-01T12:00:00Z", "tuning_s": 141.2, "settings": {...},
     "strategies": {"deft_flatten": {"q64-n32768-s64-g4-d128-float16": {
         "workload": "long_P20000_q64_L100",
         "chosen": {"chunk_size": 2048, "group_size": null, "tile": {"block_m": 64, ...},
                    "us": 41.0, "predicted_us": 60.4},
         "default": {"chunk_size": 128, "group_size": null, "tile": {...}, "us": 117.0, ...},
         "speedup": 2.85,
         "candidates": [{"chunk_size": ..., "group_size": ..., "tile": {...}, "stage": "sizes",
                         "predicted_us": ..., "predicted_rank": 1, "us": ..., "status": "ok",
                         ...}, ...]}}}}

``source`` is ``"measured"`` (timed on the card) or ``"predicted"`` (ranked by the IO model on
the card's spec, ``tile`` null: the kernel's own); one table is never both. Tables are written
atomically (a temporary file, then `os.replace`). Reading never raises: a corrupted table, one
of another format, or a measured one from other torch or triton versions (major.minor) gives an
`AutotuneWarning` and None, and the caller falls back (`autotune.lookup`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from autotune.buckets import Bucket, nearest
from deft.kernels.partials import TileConfig
from deft.strategies import STRATEGIES, USES_CHUNK_SIZE, USES_GROUP_SIZE

FORMAT = "deft-autotune/1"
SOURCES = ("measured", "predicted")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped tables."""

CONFIG_ENV = "DEFT_AUTOTUNE_CONFIGS"
"""A directory of tables searched before the shipped ones (e.g. where `deft-cli autotune
--output` wrote)."""

CAPABILITIES = {
    "NVIDIA A100-SXM4-80GB": (8, 0),
    "NVIDIA H100 80GB HBM3": (9, 0),
    "NVIDIA H200": (9, 0),
}
"""Compute capability of the built-in cards (`iomodel.gpus.BUILTIN`), for predicted tables
written without the card."""

_TILE_FIELDS = tuple(f.name for f in dataclasses.fields(TileConfig))
_TILE_REQUIRED = ("block_m", "block_n", "num_warps", "num_stages", "programs_per_sm")
"""Tile fields every stored tile holds, positive integers; the others (booleans, and
``max_registers``, an integer >= 0) are optional: tables written before them mean the default."""
_TILE_FLAGS = tuple(f.name for f in dataclasses.fields(TileConfig) if f.type in (bool, "bool"))


class AutotuneWarning(UserWarning):
    """A tuned table was ignored, or a config came from a sibling card or a fallback."""


class TableError(ValueError):
    """A table that does not follow the format; the message says where."""


@dataclass
class Table:
    """One card's tuned configs (module docstring for the file format).

    Attributes
    ----------
    source : str
        ``"measured"`` or ``"predicted"``.
    device : dict
        ``name``, ``capability`` ([major, minor]) and ``sm_count``.
    versions : dict
        ``torch``, ``triton`` and ``cuda`` of the machine that wrote it.
    strategies : dict
        Strategy name -> bucket key -> entry (``chosen``, ``candidates``, ...).
    date : str
    settings : dict
        How it was tuned (workloads, budget, dtype, page size, ...).
    tuning_s : float or None
        Wall time of the tuning run.
    """

    source: str
    device: dict
    versions: dict
    strategies: dict = field(default_factory=dict)
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc)
                      .strftime("%Y-%m-%dT%H:%M:%SZ"))
    settings: dict = field(default_factory=dict)
    tuning_s: float | None = None

    def to_dict(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data) -> "Table":
        """Parse and check a table dict; raises TableError naming the first problem."""
        if not isinstance(data, dict):
            raise TableError(f"a table must be a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise TableError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("source") not in SOURCES:
            raise TableError(f"source must be one of {SOURCES}, got {data.get('source')!r}")
        device = data.get("device")
        if not (isinstance(device, dict) and isinstance(device.get("name"), str)
                and _int_list(device.get("capability"), 2)):
            raise TableError("device must hold a name and a [major, minor] capability")
        versions = data.get("versions")
        if not (isinstance(versions, dict) and all(isinstance(versions.get(k), (str, type(None)))
                                                   for k in ("torch", "triton", "cuda"))):
            raise TableError("versions must hold torch, triton and cuda (text or null)")
        strategies = data.get("strategies")
        if not isinstance(strategies, dict):
            raise TableError("strategies must be an object")
        for strategy, buckets in strategies.items():
            if strategy not in STRATEGIES:
                raise TableError(f"unknown strategy {strategy!r}")
            if not isinstance(buckets, dict):
                raise TableError(f"strategies.{strategy} must be an object of buckets")
            for key, entry in buckets.items():
                try:
                    Bucket.parse(key)
                except ValueError as error:
                    raise TableError(f"strategies.{strategy}: {error}") from None
                where = f"strategies.{strategy}.{key}"
                if not isinstance(entry, dict):
                    raise TableError(f"{where} must be an object")
                _check_config(entry.get("chosen"), f"{where}.chosen")
                chunk, group = entry["chosen"]["chunk_size"], entry["chosen"]["group_size"]
                if (chunk is not None and strategy not in USES_CHUNK_SIZE) or (
                        group is not None and strategy not in USES_GROUP_SIZE):
                    raise TableError(f"{where}.chosen gives a size {strategy} does not take")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def entry(self, strategy: str, bucket: Bucket) -> tuple[str, dict, int] | None:
        """The entry of the bucket nearest to `bucket` (`autotune.buckets.nearest`):
        (its key, the entry, the distance), or None."""
        buckets = self.strategies.get(strategy, {})
        found = nearest(bucket, buckets)
        return None if found is None else (found[0], buckets[found[0]], found[1])


def chosen_config(entry: dict) -> tuple:
    """(chunk_size, group_size, TileConfig or None) of an entry's chosen config."""
    chosen = entry["chosen"]
    tile = chosen.get("tile")
    return chosen["chunk_size"], chosen["group_size"], None if tile is None else TileConfig(**tile)


# ---------------------------------------------------------------------------- files
def sanitise(name: str) -> str:
    """A device name as a file stem: lower case, runs of other characters as one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table_path(device_name: str, directory=None) -> Path:
    """``<directory>/<sanitised device name>.json`` (default directory: the shipped one)."""
    return Path(directory or CONFIG_DIR) / f"{sanitise(device_name)}.json"


def config_dirs() -> list[Path]:
    """Where tables are looked up: ``$DEFT_AUTOTUNE_CONFIGS`` (if set), then the shipped ones."""
    extra = os.environ.get(CONFIG_ENV)
    return ([Path(extra)] if extra else []) + [CONFIG_DIR]


def write_table(table: Table, path) -> Path:
    """Write `table` to `path` atomically and return the path.

    If `path` already holds a readable table of the same source, device and versions, its
    buckets are kept where `table` has none (a later run tuning other strategies or workloads
    adds to it); otherwise the file is replaced.
    """
    path = Path(path)
    old = read_table(path, quiet=True) if path.exists() else None
    if old is not None and (old.source, old.device["name"], _release(old.versions)) == (
            table.source, table.device["name"], _release(table.versions)):
        merged = {s: dict(b) for s, b in old.strategies.items()}
        for strategy, buckets in table.strategies.items():
            merged.setdefault(strategy, {}).update(buckets)
        table = dataclasses.replace(table, strategies=merged)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w") as file:
            json.dump(table.to_dict(), file, indent=1)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def read_table(path, quiet: bool = False) -> Table | None:
    """The table at `path`, or None (with an `AutotuneWarning` unless `quiet`) when it cannot be
    read, is malformed, or was measured with other torch or triton versions."""
    try:
        table = Table.from_dict(json.loads(Path(path).read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TableError, TypeError) as error:
        reason = f"unreadable ({type(error).__name__}: {error})"
    else:
        reason = version_mismatch(table)
        if reason is None:
            return table
    if not quiet:
        warnings.warn(f"tuned table {path} ignored, falling back: {reason}", AutotuneWarning,
                      stacklevel=2)
    return None


def version_mismatch(table: Table) -> str | None:
    """Why a measured table does not apply to this torch and triton, or None.

    Timings hold for the compiler that produced the kernels, so a measured table must match
    torch and triton in major.minor. A predicted table depends on the IO model alone.
    """
    if table.source != "measured":
        return None
    mine, theirs = _release(current_versions()), _release(table.versions)
    if mine != theirs:
        return (f"measured with torch {theirs[0]} / triton {theirs[1]}, this is torch "
                f"{mine[0]} / triton {mine[1]}")
    return None


def current_versions() -> dict:
    """torch, triton and CUDA versions of this process."""
    import torch
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}


def detect_device() -> dict | None:
    """CUDA device 0 as a table's ``device`` dict (name, capability, sm_count), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": [props.major, props.minor],
            "sm_count": props.multi_processor_count}


def _release(versions: dict) -> tuple:
    """(torch, triton) as major.minor."""
    return tuple(".".join(str(versions.get(k) or "?").split(".")[:2]) for k in ("torch", "triton"))


def _int_list(value, length: int) -> bool:
    return (isinstance(value, list) and len(value) == length
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def _check_config(config, where: str) -> None:
    """A stored config: chunk_size and group_size positive ints or null, tile null or a
    TileConfig's fields as positive ints."""
    if not isinstance(config, dict):
        raise TableError(f"{where} must be an object")
    for key in ("chunk_size", "group_size"):
        value = config.get(key, "missing")
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and value > 0):
            raise TableError(f"{where}.{key} must be a positive integer or null, got {value!r}")
    tile = config.get("tile")
    counts = [f for f in _TILE_FIELDS if f not in _TILE_REQUIRED + _TILE_FLAGS]

    def is_int(value, least):
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    if tile is not None and not (
            isinstance(tile, dict) and set(_TILE_REQUIRED) <= set(tile) <= set(_TILE_FIELDS)
            and all(is_int(tile[f], 1) for f in _TILE_REQUIRED)
            and all(is_int(tile[f], 0) for f in counts if f in tile)
            and all(isinstance(tile[f], bool) for f in _TILE_FLAGS if f in tile)):
        raise TableError(f"{where}.tile must be null or {{{', '.join(_TILE_REQUIRED)}}} as "
                         f"positive integers, optionally with {', '.join(counts)} as integers "
                         f">= 0 and {', '.join(_TILE_FLAGS)} as booleans")
