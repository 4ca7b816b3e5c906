"""Pure-PyTorch reference implementations of every Table 1 strategy: the oracle."""

from reference.plan import STRATEGIES, Plan, build_plan

__all__ = ["STRATEGIES", "Plan", "build_plan"]
