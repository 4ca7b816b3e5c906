"""Tree decoding drivers over a `TreeDecoder`: sampling (`sample_logits`, `generate`,
`sample_tree`), tree of thought (`expand`, `prune`) and speculative verification of a token tree
(`verify_token_tree`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

import deft
from deft.integrations.hf_decoder import TreeDecoder, _token_list
from deft.tree import Tree


# ---------------------------------------------------------------------------- sampling
def sample_logits(logits, *, temperature: float = 1.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None):
    """Token ids sampled from rows of logits ``[n, vocab]`` -> int64 ``[n]``.

    ``temperature == 0`` is greedy (argmax); otherwise softmax(logits / temperature), restricted
    to the smallest set of tokens whose probability reaches ``top_p``, sampled with
    ``generator``.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, "
                         f"{top_p}")
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs[before >= top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _agree(tokens: torch.Tensor, decoder: "TreeDecoder", group="auto") -> torch.Tensor:
    """The ranks of a tensor-parallel model decode one tree, so they must sample alike: every
    rank takes the group's first rank's tokens. ``group``: "auto" (the model's tensor-parallel
    group, none for a model that is not), a process group, None (the default group) or False."""
    import torch.distributed as dist

    if group == "auto":
        group = decoder.tp_group if decoder.tp_group is not None else False
    if group is False or not (dist.is_available() and dist.is_initialized()):
        return tokens
    if dist.get_world_size(group) > 1:
        source = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast(tokens, source, group=group)
    return tokens


@dataclass
class TreeSample:
    """The result of `sample_tree`.

    Attributes
    ----------
    sequences : list of list of int
        The generated token ids of each branch (prompt excluded), ``max_new_tokens`` each
        unless the branch met ``eos_token_id`` (kept as its last token).
    nodes : list of int
        The tree node of each branch (it holds all of the branch's tokens).
    tree : deft.Tree
        The tree after the run: the prompt and every branch's tokens, a query on each branch's
        last token (``deft.save_tree`` writes it for ``deft-cli estimate-io``).
    trees : list of deft.Tree
        The tree of every DeFT step.
    step_logits : list of dict
        With ``return_logits``: per generated token ``i``, ``{branch: logits [vocab]}`` that
        token ``i`` was sampled from (``i == 0``: the prompt's logits).
    kv_bytes : int
        Bytes of K and V the tree holds at the end (this rank; the most it held).
    decoder : TreeDecoder
    """

    sequences: list
    nodes: list
    tree: Tree | None
    trees: list
    step_logits: list = field(default_factory=list)
    kv_bytes: int = 0
    decoder: TreeDecoder | None = None


def generate(decoder: TreeDecoder, nodes, max_new_tokens: int, *, temperature: float = 1.0,
             top_p: float = 1.0, generator: torch.Generator | None = None, eos_token_id=None,
             group="auto", step_logits: list | None = None) -> dict:
    """Continue live leaves ``nodes`` by up to ``max_new_tokens`` tokens each, together.

    Every step samples one token per active node from its logits (`sample_logits`) and feeds
    them all in one DeFT step, so afterwards each node's logits follow its last token. A node
    that samples ``eos_token_id`` (int or list) stops after feeding it. With ``step_logits`` (a
    list), each step appends ``{node: logits it sampled from}``.

    Returns ``{node: new token ids}``.
    """
    eos = set() if eos_token_id is None else set(np.atleast_1d(eos_token_id).tolist())
    new = {v: [] for v in nodes}
    active = list(nodes)
    for _ in range(max_new_tokens):
        if not active:
            break
        rows = torch.stack([decoder.logits[v] for v in active])
        tokens = _agree(sample_logits(rows, temperature=temperature, top_p=top_p,
                                      generator=generator), decoder, group).tolist()
        if step_logits is not None:
            step_logits.append({v: decoder.logits[v] for v in active})
        for v, t in zip(active, tokens):
            new[v].append(int(t))
        decoder.extend({v: [int(t)] for v, t in zip(active, tokens)})
        active = [v for v in active if new[v][-1] not in eos]
    return new


def sample_tree(model, input_ids, width: int, max_new_tokens: int, *, temperature: float = 1.0,
                top_p: float = 1.0, seed: int = 0, eos_token_id=None, return_logits=False,
                group="auto", decoder: TreeDecoder | None = None,
                **decoder_options) -> TreeSample:
    """Sample ``width`` continuations of one prompt, decoded together over the shared prompt.

    The prompt is prefilled once (node 0); each branch draws its first token from the prompt's
    logits and every next one from its own (``temperature``/``top_p``, ``temperature=0``
    greedy), all from one generator seeded with ``seed``; every step after the prefill is one
    DeFT step over all active branches. A branch that samples ``eos_token_id`` stops. A
    tensor-parallel model's ranks all take the tokens of its group's first rank (``group``: see
    `_agree`). Options for the `TreeDecoder` (``page_size``, ``strategy``, ...) pass through.
    """
    prompt = _token_list(input_ids)
    if width < 1 or max_new_tokens < 1:
        raise ValueError("width and max_new_tokens must be positive")
    if decoder is None:
        decoder_options.setdefault("max_tokens", len(prompt) + width * max_new_tokens)
        decoder_options.setdefault("max_queries", width)
        decoder = TreeDecoder(model, **decoder_options)
    eos = set() if eos_token_id is None else set(np.atleast_1d(eos_token_id).tolist())
    generator = torch.Generator(decoder.device).manual_seed(seed)
    decoder.prefill(prompt)
    first = _agree(sample_logits(decoder.logits[0].expand(width, -1), temperature=temperature,
                                 top_p=top_p, generator=generator), decoder, group).tolist()
    steps = [{b: decoder.logits[0] for b in range(width)}] if return_logits else None
    sequences = [[int(t)] for t in first]
    nodes = decoder.expand(0, [[t] for t in first])
    active = [b for b in range(width) if first[b] not in eos]
    if max_new_tokens > 1 and active:
        logged = [] if return_logits else None
        branch = {nodes[b]: b for b in active}
        new = generate(decoder, [nodes[b] for b in active], max_new_tokens - 1,
                       temperature=temperature, top_p=top_p, generator=generator,
                       eos_token_id=eos_token_id, group=group, step_logits=logged)
        for v, tokens in new.items():
            sequences[branch[v]].extend(tokens)
        if return_logits:
            steps.extend({branch[v]: row for v, row in s.items()} for s in logged)
    tree = decoder.tree()
    peak = decoder.kv_bytes()
    return TreeSample(sequences, nodes, tree, list(decoder.trees), steps or [], peak, decoder)


# ---------------------------------------------------------------------------- tree of thought
def expand(decoder: TreeDecoder, parent, continuations) -> list:
    """`TreeDecoder.expand`: children of ``parent`` holding ``continuations``, fed in one step."""
    return decoder.expand(parent, continuations)


def prune(decoder: TreeDecoder, node) -> None:
    """`TreeDecoder.prune`: end ``node``'s subtree and free the pages no live node needs."""
    decoder.prune(node)


# ---------------------------------------------------------------------------- speculative
@dataclass
class Verification:
    """The result of `verify_token_tree`.

    Attributes
    ----------
    accepted : list of int
        Indices into ``tree_paths`` of the accepted draft tokens, from depth 1 down.
    accepted_path : list of int
        ``tree_paths[accepted[-1]]`` (empty when no draft token was accepted).
    tokens : list of int
        The accepted draft tokens, then the model's next token after them (the bonus token).
    logits : tensor [len(tree_paths), vocab]
        The model's logits after each draft token (``tree_paths`` order).
    root_logits : tensor [vocab]
        The logits after the prompt (what the depth-1 draft tokens are checked against).
    tree : deft.Tree
        The verification step's tree (prompt node, one node per draft token).
    nodes : list of int
        The tree node of each draft token.
    """

    accepted: list
    accepted_path: list
    tokens: list
    logits: torch.Tensor
    root_logits: torch.Tensor
    tree: Tree
    nodes: list


def draft_token_list(tree_paths, draft_tokens) -> list:
    """One token per path: ``draft_tokens`` is either that list, or per-depth candidates
    ``[depth][choice]`` (Medusa heads' top-k) read as ``draft_tokens[len(p) - 1][p[-1]]``."""
    draft = list(draft_tokens)
    if draft and isinstance(draft[0], (list, tuple)) or (
            isinstance(draft_tokens, torch.Tensor) and draft_tokens.dim() == 2):
        return [int(draft[len(p) - 1][p[-1]]) for p in tree_paths]
    if len(draft) != len(tree_paths):
        raise ValueError(f"draft_tokens has {len(draft)} tokens for {len(tree_paths)} paths")
    return [int(t) for t in draft]


def verify_token_tree(model, input_ids, tree_paths, draft_tokens, *,
                      decoder: TreeDecoder | None = None, prune_rejected=True,
                      **decoder_options) -> Verification:
    """One speculative verification of a token tree (greedy acceptance).

    ``tree_paths`` names the draft tree's nodes Medusa-style (``[[0], [1], [0, 0], ...]``: a
    node's path of choice indices; every prefix of a path is a path). The prompt is prefilled,
    then every draft token is fed in one DeFT step, each on its own node under its parent's.
    Starting after the prompt, a draft child is accepted while it is the model's argmax; the
    model's argmax after the last accepted token is the bonus token.

    With ``decoder`` (a `TreeDecoder` that already holds the prompt and one live leaf, as in a
    verification loop) the draft tree goes under that leaf and ``input_ids`` is ignored;
    ``prune_rejected`` frees the rejected drafts' pages, leaving the accepted ones as a chain.
    """
    paths = [tuple(int(i) for i in p) for p in tree_paths]
    if len(set(paths)) != len(paths) or any(not p for p in paths):
        raise ValueError("tree_paths must be distinct non-empty paths")
    known = set(paths)
    for p in paths:
        if len(p) > 1 and p[:-1] not in known:
            raise ValueError(f"tree path {list(p)}: its parent path {list(p[:-1])} is missing")
    tokens = draft_token_list(paths, draft_tokens)
    if decoder is None:
        prompt = _token_list(input_ids)
        decoder_options.setdefault("max_tokens", len(prompt) + len(paths))
        decoder_options.setdefault("max_queries", len(paths))
        decoder = TreeDecoder(model, **decoder_options)
        decoder.prefill(prompt)
        base = 0
    else:
        leaves = decoder.leaves()
        if len(leaves) != 1:
            raise ValueError("decoder must hold one live leaf to verify a draft tree under")
        base = leaves[0]
    root_logits = decoder.logits[base]
    order = sorted(range(len(paths)), key=lambda i: (len(paths[i]), paths[i]))
    node_of = {(): base}
    for i in order:  # parents get their node ids before their children
        node_of[paths[i]] = decoder._add_node(node_of[paths[i][:-1]])
    nodes = [node_of[p] for p in paths]
    decoder._feed({nodes[i]: [tokens[i]] for i in range(len(paths))})
    logits = torch.stack([decoder.logits[v] for v in nodes])
    child = {}
    for i, p in enumerate(paths):
        child.setdefault(p[:-1], []).append(i)
    accepted, current, prediction = [], (), int(root_logits.argmax())
    while True:
        match = [i for i in child.get(current, []) if tokens[i] == prediction]
        if not match:
            break
        i = min(match, key=lambda j: paths[j])
        accepted.append(i)
        current = paths[i]
        prediction = int(logits[i].argmax())
    tree = decoder.trees[-1]
    if prune_rejected:
        keep = {nodes[i] for i in accepted}
        for i in order[::-1]:
            if nodes[i] not in keep and nodes[i] in decoder.parent:
                decoder.prune(nodes[i])
    return Verification(accepted, list(paths[accepted[-1]]) if accepted else [],
                        [tokens[i] for i in accepted] + [prediction], logits, root_logits,
                        tree, nodes)


def save_tree(result, path) -> None:
    """Write the tree of a `TreeSample` or `Verification` (``deft-cli estimate-io`` reads it)."""
    deft.save_tree(result.tree, path)
