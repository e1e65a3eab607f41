"""``GaLoreConfig``: the options of the galore method (velora.optim.GaLoreAdamW)."""

from __future__ import annotations

from dataclasses import dataclass

from velora.methods.common import ConfigBase, check_int, check_number, option


@dataclass
class GaLoreConfig(ConfigBase):
    """rank: projection rank (None: a quarter of the smaller side of each projected weight).
    update_proj_gap: steps between SVD refreshes of the subspace. scale: GaLore's update scale alpha."""

    section = "galore"  # options.galore
    prefix = "galore"
    rank: int | None = option(None, "GaLore rank (default: a quarter of each weight's smaller side)", kind=int)
    update_proj_gap: int = option(200, "GaLore subspace refresh interval (default 200)", key="update_proj_gap")
    scale: float = option(0.25, "GaLore update scale (default 0.25)")

    def __post_init__(self) -> None:
        check_int("galore_rank", self.rank, optional=True)
        check_int("update_proj_gap", self.update_proj_gap)
        check_number("galore_scale", self.scale)
