"""`deft-cli replay`: a whole decoding run step by step through the paged tree cache, timed per
method (the loop: `harness.replay.loop`; one step's three decode latencies:
`harness.replay.measure`; its result: `harness.replay.result`; step ranges merged:
`harness.replay.merge`; its tables beside the paper's numbers: `harness.replay.report`,
`harness.replay.paper`)."""

from harness.replay.loop import parse_step_range, replay, sample_steps
from harness.replay.merge import combine, merge
from harness.replay.report import markdown_tables, render
from harness.replay.result import FORMAT

__all__ = ["FORMAT", "combine", "markdown_tables", "merge", "parse_step_range", "render",
           "replay", "sample_steps"]
