"""Tree buckets: the small deterministic key that tuned configs are stored and looked up under
(`deft.kernels.tuned`).

The best chunk and group size move with the tree's shape, not its exact numbers, so a bucket
rounds the three sizes that matter up to a power of two and keeps the rest exactly:

- ``queries`` (rounded up to a power of two),
- ``tokens``: unique KV tokens (rounded up),
- ``sharing``: visible tokens summed over queries / unique tokens (rounded up; at least 1),
- ``kv_heads``, ``gqa`` (query heads per KV head), ``head_dim`` and ``dtype`` (exact): the
  kernel runs partitions x kv_heads work items, so 32/8 and 4/1 heads (both GQA 4) fill the
  GPU differently and get their own choices.

The key reads ``q64-n32768-s64-h8-g4-d128-float16`` (the ``long_P20000_q64_L100`` anchor at
Llama-3-8B's 32/8 heads). Two buckets that differ only in the rounded sizes have a distance:
the steps between their powers of two, summed; buckets that differ in KV heads, GQA ratio,
head dim or dtype have none.

Keys written before ``kv_heads`` joined them (``q64-n32768-s64-g4-d128-float16``) still parse:
they were all tuned at `LEGACY_Q_HEADS` query heads, so they read as ``kv_heads`` =
`LEGACY_Q_HEADS` / ``gqa`` (h8 at g4) and apply to that head shape only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from deft.tree import Tree

MAX_DISTANCE = 2
"""Most power-of-two steps (summed over queries, tokens and sharing) a stored bucket may be
from the tree's own for its config to be used."""

LEGACY_Q_HEADS = 32
"""Query heads of every table whose keys carry no ``h`` (Llama-3-8B's, the only shape tuned
before KV heads joined the key)."""

_KEY = re.compile(r"q(\d+)-n(\d+)-s(\d+)(?:-h(\d+))?-g(\d+)-d(\d+)-(\w+)")


@dataclass(frozen=True)
class Bucket:
    """The shape class of a tree (module docstring).

    Attributes
    ----------
    queries, tokens, sharing : int
        Powers of two: the tree's queries, unique KV tokens and sharing ratio, rounded up.
    kv_heads, gqa, head_dim : int
        KV heads, query heads per KV head and head dim, exact.
    dtype : str
        The attention dtype (``float16``, ``bfloat16`` or ``float32``).
    """

    queries: int
    tokens: int
    sharing: int
    kv_heads: int
    gqa: int
    head_dim: int
    dtype: str

    @property
    def key(self) -> str:
        """``q{queries}-n{tokens}-s{sharing}-h{kv_heads}-g{gqa}-d{head_dim}-{dtype}``."""
        return (f"q{self.queries}-n{self.tokens}-s{self.sharing}-h{self.kv_heads}-g{self.gqa}-"
                f"d{self.head_dim}-{self.dtype}")

    @classmethod
    def parse(cls, key: str) -> "Bucket":
        """The bucket of a key (a legacy key without ``h``: module docstring); raises
        ValueError for anything `key` would not produce."""
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"bad bucket key {key!r}; expected e.g. "
                             "'q64-n32768-s64-h8-g4-d128-float16'")
        queries, tokens, sharing, kv_heads, gqa, head_dim, dtype = match.groups()
        gqa = int(gqa)
        kv_heads = int(kv_heads) if kv_heads is not None else max(1, LEGACY_Q_HEADS // max(1, gqa))
        bucket = cls(int(queries), int(tokens), int(sharing), kv_heads, gqa, int(head_dim), dtype)
        if any(n < 1 or n & (n - 1) for n in (bucket.queries, bucket.tokens, bucket.sharing)):
            raise ValueError(f"bad bucket key {key!r}: q, n and s must be powers of two")
        if bucket.kv_heads < 1:
            raise ValueError(f"bad bucket key {key!r}: h must be positive")
        return bucket

    def distance(self, other: "Bucket") -> int | None:
        """Power-of-two steps between two buckets' sizes, summed; None when KV heads, GQA ratio,
        head dim or dtype differ."""
        if (self.kv_heads, self.gqa, self.head_dim, self.dtype) != (
                other.kv_heads, other.gqa, other.head_dim, other.dtype):
            return None
        return sum(abs(a.bit_length() - b.bit_length()) for a, b in (
            (self.queries, other.queries), (self.tokens, other.tokens),
            (self.sharing, other.sharing)))


def bucket_of(tree: Tree) -> Bucket:
    """The bucket of `tree`."""
    shape = tree.attention
    sharing = tree.visible_token_sum / max(1, tree.num_tokens)
    return Bucket(
        queries=_power_of_two(tree.num_queries),
        tokens=_power_of_two(tree.num_tokens),
        sharing=1 << max(0, math.ceil(math.log2(sharing))) if sharing > 0 else 1,
        kv_heads=shape.kv_heads,
        gqa=shape.q_heads // shape.kv_heads,
        head_dim=shape.head_dim,
        dtype=shape.dtype,
    )


def nearest(bucket: Bucket, keys) -> tuple[str, int] | None:
    """The stored key nearest to `bucket` within `MAX_DISTANCE`, and its distance, or None.

    Ties go to the smallest key (sorted as text), so the answer never depends on file order.
    Keys that do not parse are skipped.
    """
    best = None
    for key in sorted(keys):
        try:
            distance = bucket.distance(Bucket.parse(key))
        except ValueError:
            continue
        if distance is not None and distance <= MAX_DISTANCE and (
                best is None or distance < best[1]):
            best = (key, distance)
    return best


def _power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
