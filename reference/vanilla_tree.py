"""Vanilla tree attention: the whole forest as one dense masked attention, no split.

One partition = every query and every token of the forest (flattened order), computed like
Tree Attention-M (`reference.tree_attention_m`): score matrix and probabilities through memory,
dense byte mask, no partials, no reduction.

Traffic: KV read once, but mask and score bytes grow with all queries x all tokens (queries
of one tree against tokens of another included), and all the work is one program.
"""

from __future__ import annotations

from reference import tree_attention_m
from deft.plan import Plan, build_plan

NAME = "vanilla_tree"


def plan(tree, chunk_size=None, group_size=None, page_size=1) -> Plan:
    """One partition for the whole forest (chunk_size and group_size are refused)."""
    return build_plan(NAME, tree, chunk_size, group_size, page_size)


def attention(tree, q, k, v, plan, sm_scale=None):
    """Vanilla tree attention over `plan`: Tree Attention-M's computation on one partition."""
    return tree_attention_m.attention(tree, q, k, v, plan, sm_scale)
