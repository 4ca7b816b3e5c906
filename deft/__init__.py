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
