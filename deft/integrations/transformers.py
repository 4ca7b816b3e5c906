"""DeFT inside Hugging Face transformers (Llama, Qwen2, Mistral; transformers 5.x).

Importing this module registers DeFT in transformers' ``AttentionInterface`` as ``"deft"``.
The drivers switch a model to it for their own forwards only (and back), so the same model
object still runs eager or SDPA elsewhere::

    from deft.integrations.transformers import sample_tree, verify_token_tree, TreeDecoder

    out = sample_tree(model, input_ids, width=8, max_new_tokens=64, temperature=0.8, top_p=0.95)
    out.sequences            # 8 lists of token ids, decoded together over the shared prompt
    deft.save_tree(out.tree, "tree.json")   # the last step's tree, for deft-cli estimate-io

    dec = TreeDecoder(model, max_tokens=4096, max_queries=32)      # tree of thought by hand
    dec.prefill(input_ids)
    a, b = dec.expand(0, [[11, 12, 13], [21, 22]])   # two thoughts, one DeFT step
    dec.prune(b)                                      # b's pages go back to the pool

    v = verify_token_tree(model, input_ids, [[0], [1], [0, 0]], [5, 9, 7])
    v.accepted_path, v.tokens                        # accepted draft tokens + the bonus token

See docs/transformers.md.
"""

from deft.integrations.hf_attention import (
    ATTENTION_NAME,
    SUPPORTED,
    DeftCache,
    DeftStep,
    ModelSpec,
    UnsupportedModelError,
    check_model,
    deft_attention,
    register,
)
from deft.integrations.hf_decoder import TreeDecoder, tensor_parallel_group
from deft.integrations.hf_driver import (
    TreeSample,
    Verification,
    draft_token_list,
    expand,
    generate,
    prune,
    sample_logits,
    sample_tree,
    save_tree,
    verify_token_tree,
)

__all__ = [
    "ATTENTION_NAME",
    "SUPPORTED",
    "DeftCache",
    "DeftStep",
    "ModelSpec",
    "TreeDecoder",
    "TreeSample",
    "UnsupportedModelError",
    "Verification",
    "check_model",
    "deft_attention",
    "draft_token_list",
    "expand",
    "generate",
    "prune",
    "register",
    "sample_logits",
    "sample_tree",
    "save_tree",
    "tensor_parallel_group",
    "verify_token_tree",
]
