"""``GradNormLoRPMethodConfig``: the options of the gradnormlorp method — the reparameterisation
(``model.GradNormLoRPConfig``: rank, alpha) and its projected-gradient optimizer."""

from __future__ import annotations

from dataclasses import dataclass

from velora.methods.common import ConfigBase, check_int, check_number, option


@dataclass
class GradNormLoRPMethodConfig(ConfigBase):
    """rank, alpha: the LoRA factors I (out, r), J (r, in) and their scale alpha / r. proj_rank,
    update_proj_gap, scale: GaLore-style projection of the factor gradients (rank, SVD refresh, scale)."""

    section = "gradnorm_lorp"  # options.gradnorm_lorp
    prefix = "gradnorm"
    rank: int = option(8, "GradNormLoRP LoRA rank (default 8)")
    alpha: float = option(16.0, "GradNormLoRP LoRA alpha (default 16)")
    proj_rank: int = option(4, "GradNormLoRP gradient projection rank (default 4)")
    update_proj_gap: int = option(250, "GradNormLoRP SVD refresh interval (default 250)")
    scale: float = option(0.25, "GradNormLoRP projected update scale (default 0.25)")

    def __post_init__(self) -> None:
        check_int("gradnorm_rank", self.rank)
        check_number("gradnorm_alpha", self.alpha)
        check_int("gradnorm_proj_rank", self.proj_rank)
        check_int("gradnorm_update_proj_gap", self.update_proj_gap)
        check_number("gradnorm_scale", self.scale)

    def model_config(self):
        from velora.methods.gradnorm_lorp.model import GradNormLoRPConfig

        return GradNormLoRPConfig(rank=self.rank, alpha=self.alpha)
