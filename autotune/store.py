"""The files a tuning run writes: the chosen configs `deft.TreeAttention` reads, and a log of
every candidate.

For one card and source, ``deft-cli autotune`` writes (`write_tuned`):

- the chosen configs (`deft.kernels.tuned.Configs`, format ``deft-configs/1``):
  ``deft/kernels/configs/<card>.json`` when measured, ``<card>.predicted.json`` when ranked by
  the IO model (``--predict``), or the ``--output`` file;
- the log (a `Table`, format ``deft-autotune/1``): per strategy and tree bucket
  (`deft.kernels.buckets`) the chosen config and every candidate that was measured (or ranked),
  plus what it was tuned on, under the same file name in ``autotune/logs/`` (``logs/`` beside
  an ``--output`` file)::

    {"format": "deft-autotune/1", "source": "measured",
     "device": {"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "sm_count": 132},
     "versions": {"torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"},
     "date": "2025-05-01T12:00:00Z", "tuning_s": 141.2, "settings": {...},
     "strategies": {"deft_flatten": {"q64-n32768-s64-h8-g4-d128-float16": {
         "workload": "long_P20000_q64_L100",
         "chosen": {"chunk_size": 2048, "group_size": null, "tile": {"block_m": 64, ...},
                    "us": 41.0, "predicted_us": 60.4},
         "default": {"chunk_size": 128, "group_size": null, "tile": {...}, "us": 117.0, ...},
         "speedup": 2.85,
         "candidates": [{"chunk_size": ..., "group_size": ..., "tile": {...}, "stage": "sizes",
                         "predicted_us": ..., "predicted_rank": 1, "us": ..., "status": "ok",
                         ...}, ...]}}}}

``source`` is ``"measured"`` (timed on the card) or ``"predicted"`` (ranked by the IO model on
the card's spec, ``tile`` null: the kernel's own); one file is never both, and a predicted table
never replaces a measured one (`check_writable`). Writes are atomic (a temporary file, then
`os.replace`). Reading follows `deft.kernels.tuned.load_table`: never raises, skips with a
warning what is malformed, and reads a table measured with other torch or triton versions with
its tiles dropped (and a one-line warning).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from deft.kernels import tuned
from deft.kernels.buckets import Bucket, nearest
from deft.kernels.tuned import Configs, check_table, load_table, parse_config, read_configs, release

FORMAT = "deft-autotune/1"

LOG_DIR = Path(__file__).resolve().parent / "logs"
"""The logs of the shipped configs."""

CAPABILITIES = {
    "NVIDIA A100-SXM4-80GB": (8, 0),
    "NVIDIA H100 80GB HBM3": (9, 0),
    "NVIDIA H200": (9, 0),
}
"""Compute capability of the built-in cards (`iomodel.gpus.BUILTIN`), for predicted tables
written without the card."""


@dataclass
class Table:
    """One tuning run's log of one card (module docstring for the file format).

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
        """Parse and check a log dict; raises `deft.kernels.table_format.TableError` naming the first
        problem."""
        check_table(data, FORMAT, lambda entry: entry.get("chosen"), ".chosen")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def without_tiles(self) -> "Table":
        """The same log with every chosen tile dropped to the kernel's own (null)."""
        return dataclasses.replace(self, strategies={
            strategy: {key: {**entry, "chosen": {**entry["chosen"], "tile": None}}
                       for key, entry in buckets.items()}
            for strategy, buckets in self.strategies.items()})

    def entry(self, strategy: str, bucket: Bucket) -> tuple[str, dict, int] | None:
        """The entry of the bucket nearest to `bucket` (`deft.kernels.buckets.nearest`):
        (its key, the entry, the distance), or None."""
        buckets = self.strategies.get(strategy, {})
        found = nearest(bucket, buckets)
        return None if found is None else (found[0], buckets[found[0]], found[1])

    def configs(self) -> Configs:
        """The chosen configs alone: what `deft.TreeAttention` reads."""
        return Configs(self.source, self.device, self.versions, {
            strategy: {key: {k: entry["chosen"][k] for k in ("chunk_size", "group_size", "tile")}
                       for key, entry in buckets.items()}
            for strategy, buckets in self.strategies.items()}, self.date)


def chosen_config(entry: dict) -> tuple:
    """(chunk_size, group_size, TileConfig or None) of a log entry's chosen config."""
    return parse_config(entry["chosen"])


# ---------------------------------------------------------------------------- files
def sanitise(name: str) -> str:
    """A device name as a file stem: lower case, runs of other characters as one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table_path(device_name: str, directory=None, predicted: bool = False) -> Path:
    """``<directory>/<sanitised device name>.json``, ``.predicted.json`` for a prediction
    (default directory: the shipped configs, `deft.kernels.tuned.CONFIG_DIR`)."""
    suffix = ".predicted.json" if predicted else ".json"
    return Path(directory or tuned.CONFIG_DIR) / f"{sanitise(device_name)}{suffix}"


def log_path(path) -> Path:
    """Where the log of the configs file `path` goes: ``autotune/logs/<name>`` for the shipped
    configs, ``logs/<name>`` beside any other."""
    path = Path(path)
    if path.parent.resolve() == Path(tuned.CONFIG_DIR).resolve():
        return LOG_DIR / path.name
    return path.parent / "logs" / path.name


def check_writable(path, source: str) -> None:
    """Raise ValueError when a tuning run of `source` may not write the configs file `path` or
    its log: a predicted table never replaces a measured one."""
    for target in (path, log_path(path)):
        _refuse_over_measured(target, source)


def _refuse_over_measured(path, source: str) -> None:
    """ValueError when `source` is predicted and `path` holds a measured table (read as it is,
    whatever its versions)."""
    if source != "predicted":
        return
    try:
        held = json.loads(Path(path).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return
    if held == "measured":
        raise ValueError(f"{path} holds a measured table; a predicted one never replaces it "
                         "(write it elsewhere with --output)")


def write_tuned(table: Table, path) -> tuple[Path, Path]:
    """Write a tuning run: its chosen configs to `path`, its log to `log_path(path)`.

    Returns
    -------
    (configs path, log path)

    Raises
    ------
    ValueError
        From `check_writable`, before anything is written.
    """
    check_writable(path, table.source)
    return write_configs(table, path), write_table(table, log_path(path))


def write_configs(table: Table, path) -> Path:
    """Write the chosen configs of `table` to `path` (`write_table`'s rules)."""
    return _write(table.configs(), path, read_configs)


def write_table(table: Table, path) -> Path:
    """Write the log `table` to `path` atomically and return the path.

    If `path` already holds a readable table of the same source, device and versions, its
    buckets are kept where `table` has none (a later run tuning other strategies or workloads
    adds to it); otherwise the file is replaced, unless `table` is predicted and the file holds
    a measured table (ValueError).
    """
    return _write(table, path, read_table)


def read_table(path, quiet: bool = False) -> Table | None:
    """The log at `path`, or None (`deft.kernels.tuned.load_table`)."""
    return load_table(path, Table.from_dict, quiet)


def _write(table, path, read) -> Path:
    """Write a `Table` or `Configs`, merged into a readable one of the same source, device
    and versions at `path`."""
    path = Path(path)
    _refuse_over_measured(path, table.source)
    old = read(path, quiet=True) if path.exists() else None
    if old is not None and (old.source, old.device["name"], release(old.versions)) == (
            table.source, table.device["name"], release(table.versions)):
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


def detect_device() -> dict | None:
    """CUDA device 0 as a table's ``device`` dict (name, capability, sm_count), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": [props.major, props.minor],
            "sm_count": props.multi_processor_count}
