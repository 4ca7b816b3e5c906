"""The checks of a tuned table's JSON (`deft.kernels.tuned`'s ``deft-configs/1`` and
`autotune.store`'s ``deft-autotune/1`` log): what every reader relies on, with messages that
say where a table breaks its format."""

from __future__ import annotations

import dataclasses

from deft.kernels.buckets import Bucket
from deft.kernels.partials import TileConfig
from deft.strategies import STRATEGIES, USES_CHUNK_SIZE, USES_GROUP_SIZE

SOURCES = ("measured", "predicted")

_TILE_FIELDS = tuple(f.name for f in dataclasses.fields(TileConfig))
_TILE_REQUIRED = ("block_m", "block_n", "num_warps", "num_stages", "programs_per_sm")
"""Tile fields every stored tile holds, positive integers; the others (booleans, and
``max_registers``, an integer >= 0) are optional: tables written before them mean the default."""
_TILE_FLAGS = tuple(f.name for f in dataclasses.fields(TileConfig) if f.type in (bool, "bool"))


class TableError(ValueError):
    """A table that does not follow its format; the message says where."""


def check_table(data, fmt: str, chosen=lambda entry: entry, at: str = "") -> None:
    """Check a table dict of format `fmt`; raises TableError naming the first problem.

    Parameters
    ----------
    data : object
        The parsed JSON.
    fmt : str
        The ``format`` it must declare.
    chosen : callable
        ``chosen(entry)``: the config of a bucket's entry (the entry itself in a configs
        table).
    at : str
        Where that config sits in the entry, for messages (e.g. ``.chosen``).
    """
    if not isinstance(data, dict):
        raise TableError(f"a table must be a JSON object, got {type(data).__name__}")
    if data.get("format") != fmt:
        raise TableError(f"format is {data.get('format')!r}, expected {fmt!r}")
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
            config = chosen(entry)
            _check_config(config, where + at)
            if (config["chunk_size"] is not None and strategy not in USES_CHUNK_SIZE) or (
                    config["group_size"] is not None and strategy not in USES_GROUP_SIZE):
                raise TableError(f"{where}{at} gives a size {strategy} does not take")


def _int_list(value, length: int) -> bool:
    return (isinstance(value, list) and len(value) == length
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def _check_config(config, where: str) -> None:
    """A stored config: chunk_size and group_size positive ints or null, tile null or a
    TileConfig's fields (`_TILE_REQUIRED` positive ints, the optional ones as their type)."""
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
