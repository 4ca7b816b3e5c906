"""Hypothesis profiles: `ci` (derandomized, bounded) in CI, `dev` (deeper) for local runs.

Select with HYPOTHESIS_PROFILE=ci|dev; CI sets `ci`, the default is `dev` locally.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
