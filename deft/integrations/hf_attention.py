"""The transformers side of DeFT: the ``"deft"`` attention function, the paged tree cache and the
architecture check.

A DeFT step is one forward of the model over every new token of the decoding tree, as a batch of
one sequence ``[1, n]`` in the tree's test-layout query order (node by ascending id, then
position), with explicit ``position_ids`` (a token's position is the number of tokens on its
path before it: prompt length + depth). In every layer:

1. ``DeftCache.update`` writes the new tokens' K and V into the layer's page pools, at the slots
   the step's `TreeCache` gave them (a node's tokens on its own pages, a shared prefix once);
2. `deft_attention` (registered in transformers' ``AttentionInterface`` as ``"deft"``) runs
   `deft.TreeAttention.run` over that layer's pools with the step's plan, shared by all layers.

The plan and the cache reach the attention function through the ``deft_step`` keyword, which
transformers passes from the model's ``forward`` down to the attention interface. A step whose
one node is a root holding only new tokens (the prompt) is a prefill: causal SDPA over the fresh
K and V, which are still written to the pages.

Tensor parallel: under a tensor-parallel model each rank's attention module sees its own query
and KV heads; the pools are sized from the first K/V they receive, so each rank holds its KV-head
shard, and the plan (the same tree, the same deterministic page allocation) is the same on every
rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from deft.cache import PagedKVCache, TreeCache

ATTENTION_NAME = "deft"
"""The name DeFT is registered under in transformers' ``AttentionInterface``."""

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "mistral": "MistralForCausalLM"}
"""Model types DeFT decodes (config.model_type -> class)."""

HEAD_DIMS = (16, 32, 64, 128, 256)  # deft.tree_attention.HEAD_DIMS, without importing Triton


class UnsupportedModelError(ValueError):
    """A model DeFT cannot decode; the message names what the model lacks."""


# ---------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelSpec:
    """What DeFT needs to know of a supported model."""

    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    sliding_window: int | None
    cache_keyword: str  # "cache" (transformers >= 5.2x) or "past_key_values"


def check_model(model) -> ModelSpec:
    """Check that DeFT can decode ``model``; raise UnsupportedModelError naming what is missing."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    missing = []
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        missing.append(f"a supported config.model_type (it is {model_type!r})")
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        missing.append("a decoder stack at model.model.layers")
    if getattr(decoder, "rotary_emb", None) is None:
        missing.append("rotary position embeddings (model.model.rotary_emb)")
    if getattr(config, "num_key_value_heads", None) is None:
        missing.append("grouped KV heads (config.num_key_value_heads)")
    if not getattr(model, "_supports_attention_backend", False):
        missing.append("attention dispatched through transformers' AttentionInterface")
    if not hasattr(model, "lm_head"):
        missing.append("a causal LM head (model.lm_head)")
    attention = getattr(layers[0], "self_attn", None) if layers else None
    for part in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling"):
        if layers and not hasattr(attention, part):
            missing.append(f"self_attn.{part} in every decoder layer")
    if missing:
        raise UnsupportedModelError(
            f"DeFT cannot decode {name}: it lacks " + "; ".join(missing)
            + f". Supported: {', '.join(SUPPORTED.values())}"
        )
    q_heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    if head_dim not in HEAD_DIMS:
        raise UnsupportedModelError(
            f"DeFT cannot decode {name}: its head_dim {head_dim} is not one the kernels take "
            f"({', '.join(map(str, HEAD_DIMS))})")
    windows = {getattr(layer.self_attn, "sliding_window", None) for layer in layers}
    if model_type == "mistral":
        windows.add(getattr(config, "sliding_window", None))
    windows.discard(None)
    forward_parameters = _forward_parameters(model)
    keyword = "cache" if "cache" in forward_parameters else "past_key_values"
    return ModelSpec(len(layers), q_heads, kv_heads, head_dim, config.vocab_size,
                     min(windows) if windows else None, keyword)


def _forward_parameters(model) -> set:
    import inspect

    try:
        return set(inspect.signature(type(model).forward).parameters)
    except (TypeError, ValueError):
        return set()


# ---------------------------------------------------------------------------- the cache
class DeftLayer(CacheLayerMixin):
    """One layer's K and V page pools ``[num_pages, page_size, kv_heads, head_dim]``.

    Allocated on the first K/V the layer sees (so a tensor-parallel rank holds its own KV-head
    shard); ``update`` writes the step's new tokens at ``owner.slots``.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "DeftCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states) -> None:
        shape = (self.owner.num_pages, self.owner.page_size, key_states.shape[1],
                 key_states.shape[3])
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(shape, dtype=value_states.dtype, device=value_states.device)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Write the step's new K/V ``[1, kv_heads, n, head_dim]`` into the pages; return them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self.owner.slots
        if slots is None or key_states.shape[0] != 1 or key_states.shape[2] != len(slots):
            raise RuntimeError(
                "DeftCache.update: a DeFT step feeds one sequence [1, n] of the step's new tokens "
                "through deft.integrations.transformers' TreeDecoder; got key states of shape "
                f"{list(key_states.shape)}")
        kv_heads, head_dim = self.keys.shape[2:]
        self.keys.view(-1, kv_heads, head_dim)[slots] = key_states[0].transpose(0, 1)
        self.values.view(-1, kv_heads, head_dim)[slots] = value_states[0].transpose(0, 1)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.owner.tokens_held

    def get_max_length(self) -> int:
        return self.owner.num_pages * self.owner.page_size

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.owner.tokens_held + query_length, 0

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("a DeftCache holds a tree, not a batch of beams")


class DeftCache(Cache):
    """A transformers `Cache` keeping every layer's K/V in pages of one `deft.cache.TreeCache`.

    All layers share one page table: a token's slot (``page * page_size + offset``) is its row in
    every layer's pools. A node's tokens sit on its own pages, so a shared prefix is stored once
    and a pruned branch's pages go back to the free list.

    Parameters
    ----------
    layers : int
    num_pages, page_size : int
    """

    def __init__(self, layers: int, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        super().__init__(layers=[DeftLayer(self) for _ in range(layers)])
        # The page allocator: pages are accounted once for all layers; its own K/V storage is
        # a byte per slot (the layers hold the real pools).
        self.allocator = PagedKVCache(num_pages, page_size, 1, 1, dtype=torch.uint8)
        self.tree_cache = TreeCache(self.allocator)
        self.slots = None  # int64 [n] on the model's device: this step's new tokens' slots

    @property
    def tokens_held(self) -> int:
        return sum(self.tree_cache.tokens(node) for node in self.tree_cache)

    @property
    def pages_held(self) -> int:
        return self.num_pages - self.allocator.num_free

    def layer(self, i: int) -> tuple:
        """K and V pools of layer ``i``: two ``[num_pages, page_size, kv_heads, head_dim]``."""
        layer = self.layers[i]
        return layer.keys, layer.values

    def kv_bytes(self) -> int:
        """Bytes of K and V held on this rank: pages in use x every layer's page size."""
        layer = self.layers[0]
        if not layer.is_initialized:
            return 0
        per_page = sum(2 * l.keys[0].numel() * l.keys.element_size() for l in self.layers)
        return self.pages_held * per_page

    def kv_bytes_allocated(self) -> int:
        """Bytes of the K and V pools of every layer (held pages and free ones)."""
        return sum(2 * l.keys.numel() * l.keys.element_size() for l in self.layers
                   if l.is_initialized)


# ---------------------------------------------------------------------------- attention
@dataclass
class DeftStep:
    """What the ``"deft"`` attention function needs during one forward (``deft_step=``)."""

    cache: DeftCache
    attention: object  # deft.TreeAttention
    plan: object  # deft.tree_attention.TreePlan; None for a prefill (causal SDPA)


def deft_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   **kwargs):
    """transformers attention interface: ``query [1, q_heads, n, d]`` -> ``[1, n, q_heads, d]``.

    Decode steps run `deft.TreeAttention.run` over the layer's pages with the step's plan;
    a prefill step (``plan is None``) runs causal SDPA over the fresh ``key``/``value``.
    """
    step = kwargs.get("deft_step")
    if not isinstance(step, DeftStep):
        raise RuntimeError(
            "the 'deft' attention runs inside deft.integrations.transformers' drivers "
            "(TreeDecoder, sample_tree, verify_token_tree), which pass deft_step= to the model")
    if dropout:
        raise ValueError("the 'deft' attention is for inference: dropout must be 0 (model.eval())")
    if step.plan is None:
        groups = query.shape[1] // key.shape[1]
        out = F.scaled_dot_product_attention(
            query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1),
            is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    q = query[0].transpose(0, 1).contiguous()  # [n, q_heads, d], test-layout query order
    k_cache, v_cache = step.cache.layer(module.layer_idx)
    out = step.attention.run(q, k_cache, v_cache, step.plan, sm_scale=scaling)
    return out.unsqueeze(0), None


def register() -> str:
    """Register `deft_attention` as ``"deft"`` in transformers' AttentionInterface (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, deft_attention)
    return ATTENTION_NAME


register()


def visible_tokens_limit(spec: ModelSpec, path_tokens: np.ndarray) -> None:
    """Refuse a step whose longest path (prefill included) exceeds the model's sliding window:
    DeFT attends every token of a path, the model only its last ``sliding_window``."""
    if spec.sliding_window is not None and len(path_tokens) and \
            int(path_tokens.max()) > spec.sliding_window:
        raise ValueError(
            f"a path of {int(path_tokens.max())} tokens exceeds the model's sliding window of "
            f"{spec.sliding_window}: DeFT attends every token of a path")
