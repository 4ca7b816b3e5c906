"""DeFT: tree-structured decoding attention (Yao et al., ICLR 2025) as a research toolkit."""

from deft.tree import AttentionShape, Tree, TreeError
from deft.tree_format import load_tree, save_tree, tree_from_dict, tree_to_dict

__all__ = [
    "AttentionShape",
    "Tree",
    "TreeError",
    "load_tree",
    "save_tree",
    "tree_from_dict",
    "tree_to_dict",
]

# The GPU API loads Triton on first use, so `import deft` stays light on a CPU-only machine.
_LAZY = {
    "TreeAttention": ("deft.tree_attention", "TreeAttention"),
    "attention": ("deft.layout_attention", "attention"),
    "merge_states": ("deft.kernels.reduction", "merge_states"),
    "PageTable": ("deft.plan_buffers", "PageTable"),
    "paged_cache": ("deft.plan_buffers", "paged_cache"),
}
__all__ += list(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'deft' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
