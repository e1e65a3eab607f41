"""Memory you can trust: what a forward pass keeps for backward, the peak of a whole training step by
category (real tensors or ``FakeTensorMode``), and a planner that predicts it for 7B-scale models."""

from velora.memory.meter import SavedActivationMeter
from velora.memory.nf4 import NF4Linear
from velora.memory.peak import CATEGORIES, PeakReport, StorageTracker, measure_step_peak
from velora.memory.planner import plan, training_setup

__all__ = [
    "CATEGORIES",
    "NF4Linear",
    "PeakReport",
    "SavedActivationMeter",
    "StorageTracker",
    "measure_step_peak",
    "plan",
    "training_setup",
]
