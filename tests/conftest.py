"""Shared test set-up: Hypothesis profiles and markers.

Profiles (choose with HYPOTHESIS_PROFILE=dev|ci|nightly; CI sets `ci`):
- dev: fast local runs;
- ci: derandomised, the default of `bash .ci/run` (a few thousand examples overall);
- nightly: many more examples, for long local fuzzing.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile(
    "ci",
    settings(settings.get_profile("ci"), max_examples=300, deadline=None,
             suppress_health_check=[HealthCheck.too_slow]),
)
settings.register_profile(
    "nightly",
    max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
