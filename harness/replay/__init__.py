"""`deft-cli replay`: a whole decoding run step by step through the paged tree cache, timed per
method (the loop: `harness.replay.loop`; its result: `harness.replay.result`; its tables:
`harness.replay.report`)."""

from harness.replay.loop import replay, sample_steps
from harness.replay.report import markdown_tables, render
from harness.replay.result import FORMAT

__all__ = ["FORMAT", "markdown_tables", "render", "replay", "sample_steps"]
