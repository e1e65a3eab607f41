"""Optimizer-state compression: FLoRA momentum and accumulation, GaLore projection, GradNormLoRP.

Every optimizer here keeps its state as tensors only (step counters, seeds, projectors), so
``torch.load(state_path, weights_only=True)`` works, and resume is bitwise exact on CPU.
"""

from velora.optim._common import optimizer_state_bytes
from velora.optim.accumulate import CompressedGradAccumulator
from velora.optim.flora import Flora
from velora.optim.galore import GaLoreAdamW
from velora.optim.gradnorm import gradnorm_lorp_optimizer
from velora.optim.projections import (
    compression_plan,
    derive_seed,
    projectable_parameters,
    random_projection,
    split_param_groups,
    svd_projector,
)
from velora.optim.quant import dequantize_blockwise, quantize_blockwise

__all__ = [
    "Flora",
    "CompressedGradAccumulator",
    "GaLoreAdamW",
    "gradnorm_lorp_optimizer",
    "optimizer_state_bytes",
    "random_projection",
    "derive_seed",
    "compression_plan",
    "svd_projector",
    "projectable_parameters",
    "split_param_groups",
    "quantize_blockwise",
    "dequantize_blockwise",
]
