"""Test-session settings that must be in place before torch is imported."""

import os

# Idle OpenMP threads wait passively instead of spinning, so that tests sharing two cores do not
# take the CPU from each other's working threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run, so a test run (and CI) passes or fails the
# same way each time. HYPOTHESIS_PROFILE=explore draws new random examples, to search for more.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
