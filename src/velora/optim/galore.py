"""GaLore-style AdamW: Adam moments kept in a low-rank SVD subspace of each projected gradient.

A param group that sets ``rank`` is projected. For a 2-D gradient G (n, m) with projector P:

    "left"  (P: (n, r)):  R = P.T @ G  (r, m);   update = P @ adam(R)      (n, m)
    "right" (Q: (m, r)):  R = G @ Q    (n, r);   update = adam(R) @ Q.T    (n, m)
    "std": left when n < m, right otherwise (the GaLore convention: reduce the smaller side)

    param <- param * (1 - lr * weight_decay) - lr * scale * update,  adam(R) = m_hat / (sqrt(v_hat) + eps)

The projector is the top-r singular vectors of the current gradient, recomputed at steps
0, gap, 2*gap, ... and stored in the optimizer state as a float32 tensor (float64 for float64 parameters,
whose update and moments are float64 too). With
``reproject_moments=True`` the moments follow the subspace when it changes: with
T = P_new.T @ P_old (r, r), m <- T m and v <- (T*T) v (the variance of independent coordinates
under the change of basis); without it they are reused as if the basis had not changed (GaLore's
behaviour). Groups without ``rank`` are plain AdamW, with torch.optim.AdamW's operation order.
Under FSDP2 (``fully_shard``, Shard(0)) a refresh gathers the gradient's rows once and the projector is replicated;
between refreshes each rank projects its own rows (``optim.sharded_svd``).
"""

from __future__ import annotations

import torch

from velora.core.runtime import state_dtype
from velora.optim._common import (
    TensorStateOptimizer,
    adam_moments,
    check_group,
    check_positive,
    check_unit_interval,
    closure_loss,
    init_moment,
    read_moment,
    store_back,
    working_copy,
    working_grad,
    write_moment,
)
from velora.optim.sharded import local
from velora.optim.sharded_svd import project_left, projector_rows, sharded_svd_projector

__all__ = ["GaLoreAdamW"]

_PROJ_TYPES = ("std", "left", "right")


def projection_side(shape, proj_type: str) -> str:
    if proj_type == "std":
        return "left" if shape[0] < shape[1] else "right"
    return proj_type


class GaLoreAdamW(TensorStateOptimizer):
    """AdamW whose groups with ``rank`` keep Adam moments in a refreshed SVD subspace (GaLore).

    Group keys: ``rank`` (None = plain AdamW), ``update_proj_gap``, ``scale``, ``proj_type``
    ("std", "left", "right"), ``reproject_moments``, plus the usual lr/betas/eps/weight_decay.
    ``eight_bit=True`` stores both moments block-wise 8-bit.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        reproject_moments: bool = False,
        eight_bit: bool = False,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
            update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
            reproject_moments=reproject_moments, eight_bit=eight_bit,
        )
        super().__init__(params, defaults)

    _IDENTITY_KEYS = ("proj_type", "update_proj_gap")

    @staticmethod
    def _layout(group: dict) -> dict:
        return {key: group[key] for key in ("rank", "proj_type", "eight_bit") if key in group}

    @staticmethod
    def _check_group(group: dict) -> None:
        check_group("GaLoreAdamW", group)
        check_positive("lr", group["lr"], float)
        beta1, beta2 = group["betas"]
        check_unit_interval("betas[0]", beta1)
        check_unit_interval("betas[1]", beta2)
        if group["rank"] is None:
            return
        check_positive("rank", group["rank"])
        check_positive("update_proj_gap", group["update_proj_gap"])
        check_positive("scale", group["scale"], float)
        if group["proj_type"] not in _PROJ_TYPES:
            raise ValueError(f"proj_type={group['proj_type']!r} is not one of {_PROJ_TYPES}")
        for param in group["params"]:
            if param.dim() != 2:
                raise ValueError(f"GaLoreAdamW: a group with rank={group['rank']} holds a {param.dim()}-D "
                                 f"parameter of shape {tuple(param.shape)}; put non-matrices in a group "
                                 "without 'rank'")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if group["rank"] is None:
                    self._adamw_step(param, group)
                else:
                    self._projected_step(param, group)
        return loss

    # ------------------------------------------------------------------------------------------------

    def _adamw_step(self, param: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        eight_bit = group["eight_bit"]
        dtype = state_dtype(param.dtype)
        grad, work = local(working_grad(param)), working_copy(local(param))  # FSDP2: this rank's rows
        if not state:
            state["step"] = torch.tensor(0.0)
            init_moment(state, "exp_avg", work.shape, param.device, eight_bit, signed=True, dtype=dtype)
            init_moment(state, "exp_avg_sq", work.shape, param.device, eight_bit, signed=False, dtype=dtype)
        state["step"] += 1
        exp_avg, exp_avg_sq = read_moment(state, "exp_avg", dtype), read_moment(state, "exp_avg_sq", dtype)
        work.mul_(1 - group["lr"] * group["weight_decay"])
        denom, bias_correction1 = adam_moments(exp_avg, exp_avg_sq, grad, group["betas"], group["eps"],
                                               state["step"].item())
        work.addcdiv_(exp_avg, denom, value=-group["lr"] / bias_correction1)
        _write_moments(state, exp_avg, exp_avg_sq)
        store_back(local(param), work)

    def _projected_step(self, param: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        side = projection_side(param.shape, group["proj_type"])
        projection_rank = min(group["rank"], *param.shape)
        full_grad = working_grad(param)  # (n, m); FSDP2: a DTensor the refresh gathers
        grad, work = local(full_grad), working_copy(local(param))  # (n, m); FSDP2: (n_local, m)
        low_shape = (projection_rank, grad.shape[1]) if side == "left" else (grad.shape[0], projection_rank)
        eight_bit, dtype = group["eight_bit"], state_dtype(param.dtype)
        if not state:
            state["step"] = torch.tensor(0.0)
            init_moment(state, "exp_avg", low_shape, param.device, eight_bit, signed=True, dtype=dtype)
            init_moment(state, "exp_avg_sq", low_shape, param.device, eight_bit, signed=False, dtype=dtype)
        exp_avg, exp_avg_sq = read_moment(state, "exp_avg", dtype), read_moment(state, "exp_avg_sq", dtype)
        if int(state["step"].item()) % group["update_proj_gap"] == 0:
            exp_avg, exp_avg_sq = self._refresh(full_grad, state, group, side, projection_rank, exp_avg,
                                                exp_avg_sq)
        projector = state["projector"]  # (n, r) or (m, r), whole on every rank
        low_grad = project_left(projector, grad, param) if side == "left" else grad @ projector  # (r, m) or (n, r)
        state["step"] += 1
        work.mul_(1 - group["lr"] * group["weight_decay"])
        denom, bias_correction1 = adam_moments(exp_avg, exp_avg_sq, low_grad, group["betas"], group["eps"],
                                               state["step"].item())
        low_update = exp_avg / denom  # (r, m) or (n, r)
        if side == "left":
            update = projector_rows(projector, param) @ low_update  # (n, m); FSDP2: this rank's rows
        else:
            update = low_update @ projector.T  # (n, m)
        work.add_(update, alpha=-group["lr"] * group["scale"] / bias_correction1)
        _write_moments(state, exp_avg, exp_avg_sq)
        store_back(local(param), work)

    @staticmethod
    def _refresh(grad: torch.Tensor, state: dict, group: dict, side: str, projection_rank: int,
                 exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A new projector from the whole working gradient (gathered once under FSDP2, ``optim.sharded_svd``); with
        ``reproject_moments`` the moments are carried into the new basis."""
        new_projector = sharded_svd_projector(grad, projection_rank, side)  # (n, r) or (m, r)
        old_projector = state.get("projector")
        if group["reproject_moments"] and old_projector is not None:
            change = new_projector.T @ old_projector  # (r, r): old coordinates -> new coordinates
            if side == "left":  # moments (r, m): coordinates are rows
                exp_avg = change @ exp_avg
                exp_avg_sq = (change * change) @ exp_avg_sq
            else:  # moments (n, r): coordinates are columns
                exp_avg = exp_avg @ change.T
                exp_avg_sq = exp_avg_sq @ (change * change).T
        state["projector"] = new_projector
        return exp_avg, exp_avg_sq

    def _row_sharded_keys(self, param: torch.Tensor, group: dict) -> tuple[str, ...]:
        """Under FSDP2 the moments of a plain or "right"-projected matrix follow the weight's rows; a "left"
        projection's (r, m) moments and every projector are replicated."""
        if group["rank"] is not None and projection_side(param.shape, group["proj_type"]) == "left":
            return ()
        return ("exp_avg", "exp_avg_sq")


def _write_moments(state: dict, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
    write_moment(state, "exp_avg", exp_avg, signed=True)
    write_moment(state, "exp_avg_sq", exp_avg_sq, signed=False)
