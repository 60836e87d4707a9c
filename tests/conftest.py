"""Test-session settings that must be in place before torch is imported."""

import os

# Idle OpenMP threads wait passively instead of spinning, so that tests sharing two cores do not
# take the CPU from each other's working threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
