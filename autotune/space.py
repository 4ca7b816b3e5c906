"""The search space of one strategy on one tree: sizes ranked by the IO model, tiles that fit.

A candidate is a chunk size, a group size and a `TileConfig` (the kernel's block_m, block_n,
num_warps, num_stages and programs_per_sm). The two halves are searched differently:

- sizes (chunk x group, each only where the strategy takes it, docs/design.md's partition table)
  change the plan, so the IO model can rank them: each size's plan is built
  (`deft.plan.build_plan`), sizes whose plans are identical are kept once (a group cap
  above every partition's queries is no cap), and the rest are ordered by
  `iomodel.predict_latency` on the card's spec;
- for deft_flatten the lookup does not run a stored chunk: it moves it to the tree's waves
  (`deft.kernels.tuned.flatten_chunk`), so the sizes it can run on a tree are one per group size,
  each at its wave chunk (`rank_wave_sizes`), ranked the same way;
- tiles leave the plan alone and the IO model cannot see them, so they are only filtered: a
  tile whose estimated shared memory (`smem_bytes`) exceeds what one program may use, or whose
  ``programs_per_sm`` programs do not fit one SM together, is dropped before any run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
import triton

from deft.kernels import tile_config
from deft.kernels.partials import TileConfig
from deft.kernels.tuned import flatten_chunk
from deft.tree import Tree
from iomodel.gpus import GpuSpec
from iomodel.latency import predict_latency
from deft.plan import build_plan
from deft.strategies import DEFAULT_CHUNK_SIZE, USES_CHUNK_SIZE, USES_GROUP_SIZE

CHUNK_SIZES = (32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
"""Chunk sizes tried (KV tokens per chunk or block). The 1.5x steps balance the persistent
grid where a power of two leaves it uneven: on an H100, fewshot_b20 at chunk 384 makes 256
work items for 264 programs (one round of 6 tiles) where 512 makes 192 items of 8 tiles
(27.98 vs 30.42 us), long_P20000 runs 123.8 us at 1536 against 133.2 at 1024
(scripts/perf_flatten.py --chunks)."""

GROUP_SIZES = (None, 8, 16, 32, 64)
"""Group sizes tried (most queries per group; None: no cap)."""

TILE_KNOBS = {
    "block_m": (16, 32, 64, 128),
    "block_n": (32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 5),
    "programs_per_sm": (1, 2, 3, 4),
    "prefetch": (False, True),
    "lean": (False, True),
    "max_registers": (0, 128, 168),
}
"""Values tried for each `TileConfig` field."""


@dataclass(frozen=True)
class Candidate:
    """One point of the search: sizes and tile.

    Attributes
    ----------
    chunk_size, group_size : int or None
        As `deft.TreeAttention` takes them (None where the strategy takes none, and for
        group_size also "no cap").
    tile : TileConfig
    """

    chunk_size: int | None
    group_size: int | None
    tile: TileConfig

    @property
    def sizes(self) -> tuple:
        return self.chunk_size, self.group_size

    def label(self) -> str:
        """Short text, e.g. ``c1024 g- m64 n64 w4 s2 p2``."""
        t = self.tile
        return (f"c{self.chunk_size or '-'} g{self.group_size or '-'} m{t.block_m} n{t.block_n} "
                f"w{t.num_warps} s{t.num_stages} p{t.programs_per_sm}"
                + (" pf" if t.prefetch else "") + (" lean" if t.lean else "")
                + (f" r{t.max_registers}" if t.max_registers else ""))

    def to_dict(self) -> dict:
        return {"chunk_size": self.chunk_size, "group_size": self.group_size,
                "tile": dataclasses.asdict(self.tile)}

    @classmethod
    def from_dict(cls, data: dict) -> "Candidate":
        return cls(data["chunk_size"], data["group_size"], TileConfig(**data["tile"]))


@dataclass(frozen=True)
class RankedSizes:
    """A size pair and the IO model's prediction for it on one tree.

    Attributes
    ----------
    chunk_size, group_size : int or None
    predicted_us : float
    rank : int
        1 for the fastest predicted.
    """

    chunk_size: int | None
    group_size: int | None
    predicted_us: float
    rank: int

    @property
    def sizes(self) -> tuple:
        return self.chunk_size, self.group_size


def default_sizes(strategy: str) -> tuple:
    """docs/design.md's defaults: (chunk 128 where the strategy takes a chunk, no group cap)."""
    return (DEFAULT_CHUNK_SIZE if strategy in USES_CHUNK_SIZE else None), None


def default_tile(strategy: str, tree: Tree) -> TileConfig:
    """The kernel's own tile for the tree's head dim and GQA ratio."""
    shape = tree.attention
    return tile_config(strategy, shape.head_dim, shape.q_heads // shape.kv_heads)


def default_candidate(strategy: str, tree: Tree) -> Candidate:
    """What `deft.TreeAttention` runs when nothing is tuned."""
    return Candidate(*default_sizes(strategy), default_tile(strategy, tree))


def size_space(strategy: str) -> list[tuple]:
    """Every (chunk_size, group_size) of the strategy, the defaults first."""
    chunks = CHUNK_SIZES if strategy in USES_CHUNK_SIZE else (None,)
    groups = GROUP_SIZES if strategy in USES_GROUP_SIZE else (None,)
    default = default_sizes(strategy)
    return [default] + [s for s in itertools.product(chunks, groups) if s != default]


def rank_sizes(strategy: str, tree: Tree, gpu: GpuSpec, page_size: int) -> list[RankedSizes]:
    """The strategy's sizes whose plans differ, fastest predicted first.

    Of sizes with identical plans the first of `size_space` is kept, so the defaults always
    stand for their class. Ties in prediction keep `size_space` order.
    """
    return rank_plans(strategy, tree, gpu, page_size, size_space(strategy))


def rank_wave_sizes(tree: Tree, gpu: GpuSpec, page_size: int, programs: int,
                    capability) -> list[RankedSizes]:
    """deft_flatten's sizes that the lookup runs on `tree`: each group size of `GROUP_SIZES`
    at its wave chunk (`deft.kernels.tuned.flatten_chunk` at `programs`, as
    `deft.kernels.tuned.tuned_config` moves a stored chunk), fastest predicted first.

    Of groups whose plans are identical there (a cap above every partition's queries is no cap)
    the first of `GROUP_SIZES` is kept; ties in prediction keep that order.

    Parameters
    ----------
    tree : Tree
    gpu : GpuSpec
    page_size : int
    programs : int
        Resident programs of the card (SMs x `deft.kernels.fill.PROGRAMS_PER_SM`).
    capability : (int, int)
        The card's compute capability (`deft.kernels.tuned.flatten_chunk`).
    """
    sizes = [(flatten_chunk(tree, group, programs, capability), group) for group in GROUP_SIZES]
    return rank_plans("deft_flatten", tree, gpu, page_size, sizes)


def rank_plans(strategy: str, tree: Tree, gpu: GpuSpec, page_size: int,
           sizes) -> list[RankedSizes]:
    """`sizes` ((chunk_size, group_size) pairs) whose plans differ, the first of each plan kept,
    ordered by `iomodel.predict_latency` on `gpu` (ties keep the order given)."""
    seen, predicted = set(), []
    for chunk, group in sizes:
        plan = build_plan(strategy, tree, chunk, group, page_size)
        signature = plan_signature(plan)
        if signature not in seen:
            seen.add(signature)
            predicted.append((predict_latency(plan, gpu)["predicted_us"], chunk, group))
    order = sorted(range(len(predicted)), key=lambda i: predicted[i][0])
    return [RankedSizes(predicted[i][1], predicted[i][2], predicted[i][0], rank + 1)
            for rank, i in enumerate(order)]


def smem_bytes(tile: TileConfig, head_dim: int, element_bytes: int) -> int:
    """Estimated shared memory of one program of the partials kernel, bytes.

    A K and a V tile (``block_n x head_dim``) per pipeline stage and the query tile
    (``block_m x head_dim``), in the input dtype, head dim padded to a power of two. Checked
    against the kernel compiled for sm_90 by Triton 3.9 (``metadata.shared``, fp16, head dim
    128), compiled / estimated KiB: 80.3 / 80 at block 64 x 64 and 2 stages, 145.5 / 144 at
    64 x 128, 160.5 / 160 at 128 x 128, 162 / 224 at 128 x 128 and 3 stages (its pipeliner
    keeps two buffers): tight at two stages, conservative above. A tile that fits here and
    still fails to compile or launch is measured as an error, never a crash.
    """
    d = triton.next_power_of_2(head_dim)
    return (max(1, tile.num_stages) * 2 * tile.block_n + tile.block_m) * d * element_bytes


REGISTERS_PER_SM = 65536
"""32-bit registers of one SM (A100, H100 and H200 alike)."""
UNCAPPED_REGISTERS = 255
"""Registers per thread to assume where the tile leaves the compiler free (``max_registers``
0): the partials kernel takes 240 to 255 at head dim 128 on sm_90."""


def fits(tile: TileConfig, gpu: GpuSpec, head_dim: int, element_bytes: int) -> bool:
    """Whether one program fits a block's shared memory and ``programs_per_sm`` programs fit
    one SM's shared memory and registers (a program that does not fit would wait for a later
    wave of the persistent grid)."""
    need = smem_bytes(tile, head_dim, element_bytes)
    registers = (tile.max_registers or UNCAPPED_REGISTERS) * tile.num_warps * 32
    return (need <= gpu.smem_per_block_kb * 1024
            and need * tile.programs_per_sm <= gpu.smem_per_sm_kb * 1024
            and registers * tile.programs_per_sm <= REGISTERS_PER_SM)


def tile_space(tree: Tree, gpu: GpuSpec) -> list[TileConfig]:
    """Every tile of `TILE_KNOBS` that fits the card, for the tree's head dim, dtype and GQA
    ratio (block_m raised to hold one query's heads, as the kernel raises it; duplicates
    dropped)."""
    shape = tree.attention
    group = shape.q_heads // shape.kv_heads
    tiles = dict.fromkeys(
        TileConfig(**dict(zip(TILE_KNOBS, values))).for_group(group)
        for values in itertools.product(*TILE_KNOBS.values())
    )
    return [t for t in tiles if fits(t, gpu, shape.head_dim, shape.element_bytes)]


def neighbours(tile: TileConfig, knobs, space: list[TileConfig]) -> list[TileConfig]:
    """The tiles of `space` that differ from `tile` in `knobs` (field names) alone, and `tile`
    itself if in `space`."""
    others = [f for f in TILE_KNOBS if f not in knobs]
    return [t for t in space
            if all(getattr(t, f) == getattr(tile, f) for f in others)]


def plan_signature(plan) -> bytes:
    """A digest of the partitions (queries and token segments) of a plan."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (plan.query_ptr, plan.query_index, plan.segment_ptr, plan.segment_node,
                  plan.segment_pos, plan.segment_len):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.digest()
