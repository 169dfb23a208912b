"""Hypothesis profiles of the property-based tests (``--hypothesis-profile=NAME``).

- ``default`` (CI): a few dozen examples per property, no deadline (the float64
  oracle's time varies with the number of segments drawn).
- ``deep``: 10,000 examples per property, for a release or a kernel change; the
  op property runs every backend on each example, so that is 10,000 per backend.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

SLOW_DATA = [HealthCheck.too_slow, HealthCheck.data_too_large]


def register_profiles() -> None:
    settings.register_profile(
        "default", max_examples=40, deadline=None, print_blob=True, suppress_health_check=SLOW_DATA
    )
    settings.register_profile(
        "deep", max_examples=10_000, deadline=None, print_blob=True, suppress_health_check=SLOW_DATA
    )
    settings.load_profile("default")
