"""The paper's own numbers for Tables 3 and 4 (Yao et al., "DeFT: Decoding with Flash
Tree-attention", ICLR 2025: one A100 80GB, Llama-3-8B), by column, and which column a replayed
run stands for."""

from __future__ import annotations

import re

COLUMNS = ("b20", "b30", "b50", "Sorting", "Document", "Keyword", "Set",
           "t32", "t64", "t128", "t256")
"""Few-shot prompting of width b, multi-step reasoning (GoT's sorting128, docmerge, keyword and
set128 Tree-of-Thoughts trees), speculative decoding with a token tree of t."""

DECODING = {
    "radix": (12.37, 14.08, 16.54, 104.79, 69.61, 11.25, 17.03, 54.66, 69.75, 108.56, 188.66),
    "deft_flatten": (9.98, 10.99, 12.48, 94.67, 66.95, 10.90, 16.10, 42.23, 46.60, 56.96, 84.27),
}
"""Table 3, decoding latency of the whole run (s)."""

DECODING_SPEEDUP = (1.24, 1.28, 1.33, 1.10, 1.03, 1.03, 1.05, 1.29, 1.50, 1.91, 2.23)
"""Table 3, DeFT-Flatten's decoding speedup over Radix Attention."""

UPPER_BOUND_SPEEDUP = (1.71, 2.08, 2.51, 1.96, 1.82, 1.70, 1.76, 1.89, 2.89, 3.34, 4.36)
"""Table 3, the decoding speedup over Radix Attention with no attention at all."""

ATTENTION = {
    "radix": (5.99, 7.30, 9.96, 39.37, 24.69, 3.11, 5.13, 25.73, 40.47, 76.10, 145.43),
    "deft_node": (10.59, 10.62, 10.85, 42.96, 33.29, 6.16, 9.58, 34.59, 34.41, 34.96, 41.78),
    "deft_node_chunk": (8.52, 9.69, 13.45, 49.63, 36.37, 4.77, 7.40, 14.54, 20.28, 32.57,
                        57.26),
    "deft_flatten": (3.47, 4.07, 5.87, 28.41, 21.45, 2.57, 3.83, 13.15, 16.79, 24.46, 40.56),
}
"""Table 4, attention latency of the whole run (s)."""

ATTENTION_SPEEDUP = (1.73, 1.63, 1.70, 1.39, 1.15, 1.21, 1.34, 1.96, 2.41, 3.11, 3.59)
"""Tables 3 and 4, DeFT-Flatten's attention speedup over Radix Attention."""

_REASONING = {"sorting": "Sorting", "docmerge": "Document", "keyword": "Keyword", "set": "Set"}


def column_of(run_name: str) -> str | None:
    """The paper's column a run stands for, from its name (`deft.workloads`), or None:
    ``fewshot_b20_...`` -> b20, ``reasoning_keywordToT_...`` -> Keyword,
    ``speculative_t64_...`` -> t64."""
    match = re.match(r"fewshot_b(\d+)_|speculative_t(\d+)_|reasoning_([a-z]+?)\d*ToT", run_name)
    if match is None:
        return None
    width, tree, reasoning = match.groups()
    column = f"b{width}" if width else f"t{tree}" if tree else _REASONING.get(reasoning)
    return column if column in COLUMNS else None


def paper(values: tuple, column: str) -> float:
    """A paper row's value in ``column``."""
    return values[COLUMNS.index(column)]
