"""``full``: every parameter trains with the standard optimizer. It has no options beyond
``OptimizerSettings`` (so no config of its own)."""

from __future__ import annotations

from torch import nn

from velora.methods.common import standard_optimizer, trainable_parameters
from velora.methods.options import MethodOptions
from velora.methods.registry import BaseMethod, keep_model, register


def all_parameters_optimizer(model: nn.Module, options: MethodOptions):
    """The standard optimizer over every trainable parameter (also the adapters' optimizer)."""
    return standard_optimizer(trainable_parameters(model), options.optim)


register(BaseMethod("full", "all parameters train", keep_model, all_parameters_optimizer))
