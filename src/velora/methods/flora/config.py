"""``FloraConfig``: the options of the flora method (velora.optim.Flora) and of FLoRA compressed gradient
accumulation (velora.optim.CompressedGradAccumulator)."""

from __future__ import annotations

from dataclasses import dataclass

from velora.methods.common import ConfigBase, check_bool, check_int, option

_PROJECTION_KINDS = {"orthonormal": True, "gaussian": False}


@dataclass
class FloraConfig(ConfigBase):
    """rank: projection rank (None: ``default_rank`` of the projectable matrices). kappa: momentum resampling
    interval. accumulation: compressed gradient accumulation across the accumulation steps. orthogonal:
    orthonormal accumulation rows (less noise) or the paper's Gaussian. project: the side of each matrix
    projected, "smaller" (the FLoRA code, less noise) or "larger". momentum ("update" = the authors' package, default |
    "gradient" = Alg. 2), exact_current, momentum_orthogonal, momentum_residual: Flora's momentum options
    (docs/optim.md; the defaults are the best measured, Alg. 2 is gradient / no exact current / Gaussian / no
    residual). eps1: the Adafactor base's floor (None: Flora's default, 1e-15)."""

    section = "flora"  # options.flora
    prefix = "flora"
    rank: int | None = option(None, "FLoRA projection rank (default: a quarter of the smallest side of the "
                              "attention/MLP matrices)", kind=int)
    kappa: int = option(1000, "FLoRA momentum resampling interval kappa (default 1000)")
    accumulation: bool = option(False, "FLoRA compressed gradient accumulation across --accumulation-steps "
                                "(rank --flora-rank)")
    orthogonal: bool = option(True, "rows of FLoRA's accumulation projection: orthonormal (default: less noise at "
                              "the same memory) or gaussian (the paper's)", flag="--flora-projection",
                              choices=_PROJECTION_KINDS)
    project: str = option("smaller", "side of each matrix FLoRA projects: smaller (default, as the FLoRA "
                          "reference code: less noise) or larger (less memory, more noise)")
    momentum: str = option("update", "what FLoRA's momentum averages: update (default, the authors' package: the "
                           "preconditioned update) or gradient (Alg. 2)")
    exact_current: bool = option(True, "keep FLoRA's current step exact, compress only the history (default, the "
                                 "authors' code; --no-flora-exact-current: Alg. 2)")
    momentum_orthogonal: bool = option(True, "orthonormal rows for FLoRA's momentum projection (default: less noise "
                                       "at the same memory; --no-flora-momentum-orthogonal: Gaussian, Alg. 2)")
    momentum_residual: bool = option(False, "FLoRA's momentum outside its projection's row space: the current "
                                     "gradient/update itself (needs orthonormal momentum rows; our departure from "
                                     "Alg. 2)")
    eps1: float | None = option(None, "floor of the Adafactor base's second-moment estimate (default: Flora's "
                                "1e-15, the FLoRA authors' v_hat floor 1e-30; 1.19e-7 = torch Adafactor's rule "
                                "for float32 weights)", kind=float)

    def __post_init__(self) -> None:
        check_int("flora_rank", self.rank, optional=True)
        check_int("flora_kappa", self.kappa)
        for name in ("accumulation", "orthogonal", "exact_current", "momentum_orthogonal", "momentum_residual"):
            check_bool(f"flora_{name}", getattr(self, name))
        from velora.optim.projections import check_project_side

        check_project_side(self.project)
        if self.eps1 is not None and not (isinstance(self.eps1, (int, float)) and self.eps1 > 0):
            raise ValueError(f"flora_eps1={self.eps1!r} must be a positive number (or None for Flora's default 1e-15)")
        if self.momentum not in ("gradient", "update"):
            raise ValueError(f"flora_momentum={self.momentum!r} is not 'gradient' (Alg. 2) or 'update' "
                             "(the FLoRA authors' package)")

    def rank_for(self, matrices) -> int:
        """The rank: ``rank``, or by default a quarter of the smallest side among ``matrices``, which are the
        projectable (attention/MLP) matrices — the ones FLoRA compresses — never embeddings or the head."""
        if self.rank is not None:
            return self.rank
        sides = [min(p.shape) for p in matrices if p.dim() == 2]
        if not sides:
            raise ValueError("FLoRA found no attention/MLP matrices to project; set flora_rank or pick another method")
        return max(1, min(sides) // 4)
