"""A Llama-3-8B-shaped decoder with random weights and pluggable tree attention.

The end-to-end rows of the paper's Table 3 time a whole decoding step of the model: every query
of the step is one token of a batch that goes through embedding, ``layers`` x (RMSNorm, fused
QKV projection, RoPE, the K/V write into the layer's paged cache, attention, output projection,
RMSNorm, SwiGLU MLP) and the LM head. The weights are random (none can be downloaded, and the
cost of a step does not depend on their values); what is measured is the time, not the text.

Attention is any callable ``attention(q, k_cache, v_cache, plan, out=out) -> out`` — the
signature of `deft.TreeAttention.run` — over one layer's cache; ``attention=None`` skips it
(the output projection then reads zeros), which gives the paper's "upper bound (no attention)".

    config = DecoderConfig(layers=2, hidden=64, intermediate=128, vocab=100)   # small widths
    caches = LayerCaches(config.layers, 8, 16, kv_heads=8, head_dim=128, dtype=torch.float32)
    model = Decoder(config, dtype=torch.float32, device="cpu")
    logits = model.forward(tokens, positions, slots, caches)    # [n, 100], no attention
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deft.tree import AttentionShape

TREE_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


@dataclass(frozen=True)
class DecoderConfig:
    """Widths of a Llama-style decoder (defaults: Llama-3-8B).

    Attributes
    ----------
    layers, hidden, intermediate : int
        Decoder layers, model width, SwiGLU width.
    q_heads, kv_heads, head_dim : int
        Attention heads (GQA: ``q_heads`` a multiple of ``kv_heads``).
    vocab : int
        Embedding and LM-head rows.
    rope_theta, norm_eps : float
    """

    layers: int = 32
    hidden: int = 4096
    intermediate: int = 14336
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 128256
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("layers", "hidden", "intermediate", "q_heads", "kv_heads", "head_dim",
                     "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.q_heads % self.kv_heads or self.head_dim % 2:
            raise ValueError(f"q_heads ({self.q_heads}) must be a multiple of kv_heads "
                             f"({self.kv_heads}) and head_dim ({self.head_dim}) even")

    def attention(self, dtype: torch.dtype = torch.float16) -> AttentionShape:
        """The attention shape of a tree decoded by this model (`deft.tree.AttentionShape`)."""
        return AttentionShape(self.q_heads, self.kv_heads, self.head_dim, TREE_DTYPES[dtype])

    @property
    def parameters(self) -> int:
        """Number of weights (embedding and LM head included)."""
        qkv = self.hidden * (self.q_heads + 2 * self.kv_heads) * self.head_dim
        out = self.q_heads * self.head_dim * self.hidden
        layer = qkv + out + 3 * self.hidden * self.intermediate
        return self.layers * (layer + 2 * self.hidden) + 2 * self.vocab * self.hidden + self.hidden


LLAMA3_8B = DecoderConfig()
"""Llama-3-8B: 32 layers, hidden 4096, SwiGLU 14336, 32 query / 8 KV heads of 128, vocab 128256."""


class LayerCaches:
    """The paged K and V caches of every layer, under one page table.

    Parameters
    ----------
    layers, num_pages, page_size, kv_heads, head_dim : int
    dtype : torch.dtype
    device : str or torch.device

    ``k`` and ``v`` are ``[layers, num_pages + 1, page_size, kv_heads, head_dim]``, zeroed; a
    token's slot (``page * page_size + offset``, `deft.cache`) addresses the same row in every
    layer. The extra last page is scratch: padding rows of a batch write and read there
    (``scratch_slot``), never a token of the tree.
    """

    def __init__(self, layers, num_pages, page_size, kv_heads, head_dim, dtype=torch.float16,
                 device="cpu"):
        shape = (layers, num_pages + 1, page_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layers, self.page_size = layers, page_size
        self.scratch_slot = num_pages * page_size

    def layer(self, i: int) -> tuple:
        """K and V cache of layer ``i``: two [pages + 1, page_size, kv_heads, head_dim] views."""
        return self.k[i], self.v[i]

    def rows(self, i: int) -> tuple:
        """K and V of layer ``i`` by slot: two ``[slots, kv_heads, head_dim]`` views."""
        return self.k[i].flatten(0, 1), self.v[i].flatten(0, 1)

    def write(self, i: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K and V of layer ``i`` at slots. slots int64 [n]; k, v [n, kv_heads, head_dim]"""
        k_rows, v_rows = self.rows(i)
        k_rows[slots] = k
        v_rows[slots] = v

    def fill_random(self, slots: torch.Tensor, generator: torch.Generator) -> None:
        """Standard-normal K and V at ``slots`` in every layer (new tokens of a replayed step)."""
        shape = (self.layers, len(slots), *self.k.shape[-2:])
        for cache in (self.k, self.v):
            values = torch.randn(shape, generator=generator, device=cache.device,
                                 dtype=torch.float32)
            cache.flatten(1, 2)[:, slots] = values.to(cache.dtype)


@dataclass
class _LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(q_heads + 2 kv_heads) head_dim, hidden]
    out: torch.Tensor  # [hidden, q_heads head_dim]
    mlp_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


class Decoder:
    """A Llama-style decoder with random normal(0, 0.02) weights.

    Parameters
    ----------
    config : DecoderConfig
    dtype : torch.dtype
        Weights, activations and the caches' dtype (float16 or bfloat16; float32 for tests).
    device : str or torch.device
    seed : int
        Seed of the weights (generated on ``device``).
    """

    def __init__(self, config: DecoderConfig = LLAMA3_8B, dtype=torch.bfloat16, device="cuda",
                 seed: int = 0):
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        generator = torch.Generator(self.device).manual_seed(seed)

        def weight(*shape):
            return torch.empty(shape, dtype=dtype, device=self.device).normal_(
                0.0, 0.02, generator=generator)

        def ones(size):
            return torch.ones(size, dtype=dtype, device=self.device)

        c = config
        qkv_rows = (c.q_heads + 2 * c.kv_heads) * c.head_dim
        self.embed = weight(c.vocab, c.hidden)
        self.layers = [
            _LayerWeights(ones(c.hidden), weight(qkv_rows, c.hidden),
                          weight(c.hidden, c.q_heads * c.head_dim), ones(c.hidden),
                          weight(2 * c.intermediate, c.hidden), weight(c.hidden, c.intermediate))
            for _ in range(c.layers)
        ]
        self.norm = ones(c.hidden)
        self.lm_head = weight(c.vocab, c.hidden)
        exponent = torch.arange(0, c.head_dim, 2, dtype=torch.float32, device=self.device)
        self.inv_freq = c.rope_theta ** (-exponent / c.head_dim)  # [head_dim / 2]

    @torch.no_grad()
    def forward(self, tokens, positions, slots, caches: LayerCaches, attention=None, plan=None):
        """One decoding step: a batch of tokens through every layer; their K/V go to ``caches``.

        Parameters
        ----------
        tokens : int64 [n]
            Token ids of the batch (one per query of the step, plus any padding rows).
        positions : int64 [n]
            Sequence position of each token (its RoPE angle): tokens before it on its path.
        slots : int64 [n]
            Cache slot of each token, where its K and V are written in every layer.
        caches : LayerCaches
            ``config.layers`` layers, this model's dtype and device.
        attention : callable, optional
            ``attention(q, k_cache, v_cache, plan, out=out) -> out`` with q, out
            ``[n, q_heads, head_dim]`` and one layer's caches; None skips attention (zeros).
        plan : optional
            Passed through to ``attention`` (the step's plan of that method).

        Returns
        -------
        logits : [n, vocab]
        """
        c = self.config
        n = tokens.shape[0]
        x = self.embed[tokens]
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        cos = angles.cos().to(self.dtype)[:, None, :]  # [n, 1, head_dim / 2]
        sin = angles.sin().to(self.dtype)[:, None, :]
        attended = torch.zeros((n, c.q_heads, c.head_dim), dtype=self.dtype, device=self.device)
        split = [c.q_heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.attn_norm, c.norm_eps)
            q, k, v = F.linear(h, layer.qkv).split(split, -1)
            q = _rope(q.view(n, c.q_heads, c.head_dim), cos, sin)
            k = _rope(k.view(n, c.kv_heads, c.head_dim), cos, sin)
            caches.write(i, slots, k, v.view(n, c.kv_heads, c.head_dim))
            if attention is not None:
                attention(q, *caches.layer(i), plan, out=attended)
            x = x + F.linear(attended.view(n, -1), layer.out)
            h = _rms_norm(x, layer.mlp_norm, c.norm_eps)
            gate, up = F.linear(h, layer.gate_up).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
        return F.linear(_rms_norm(x, self.norm, c.norm_eps), self.lm_head)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, back to x's dtype. x [n, hidden]"""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half form. x [n, heads, head_dim]; cos, sin [n, 1, head_dim / 2]"""
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
