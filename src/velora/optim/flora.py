"""FLoRA momentum (Hao et al. 2024, Alg. 2) on an Adafactor or AdamW base.

For a 2-D parameter W (rows, cols) we work on the orientation G (k, p), p the projected side: by
default the smaller one (``project="smaller"``: p = min(rows, cols), k = max(rows, cols), as the FLoRA
reference code does; the decompressed momentum's noise grows like sqrt(p / r)), or the larger one
(``project="larger"``: k = min(rows, cols), a smaller state, more noise). G is the transpose when that
puts the projected side last. The first moment lives in a seeded random projection A (r, p),
regenerated from an int64 seed kept in the state:

    every step t:   M <- beta1 * M + (1 - beta1) * G @ A.T          # (k, r)
                    direction = M @ A                                # (k, p), decompressed momentum
    t % kappa == 0: A_new from seed(base_seed, param_index, t // kappa)
                    M <- M @ (A_old @ A_new.T)                       # carry over with the OLD matrix

The direction then goes through the base optimizer's second moment: Adafactor's factored second
moment (default; row (rows, 1) + column (1, cols) statistics, same update rule as
``torch.optim.Adafactor``) or Adam's full second moment with bias corrections (``base="adamw"``,
same update rule as ``torch.optim.AdamW``).

Momentum options (docs/optim.md, "FLoRA momentum options"). The defaults are the best measured choice on
``velora compare``'s setting (issue #16: update, current exact, orthonormal rows, eps1 = 1e-15); the paper's Alg. 2
read literally is one setting away: ``Flora.paper_alg2(...)`` / ``PAPER_ALG2``.
- ``momentum="update"`` (default; the authors' flora-opt package, and Optax's Adafactor): M averages the
  preconditioned update U = G / sqrt(v_hat) and the decompressed momentum is the step direction itself.
  ``momentum="gradient"`` (Alg. 2): M averages the raw gradient G; the decompressed momentum is then
  preconditioned by the base (divided by sqrt(v_hat)).
- ``exact_current=True`` (default, the authors' code): only the history is compressed,
  direction = beta1 * (M_old @ A_old) + (1 - beta1) * G exactly; M is then updated as above.
  ``exact_current=False`` (Alg. 2): the current G (or U) is compressed with the history, direction = M_new @ A.
- ``orthogonal=True`` (default): orthonormal rows scaled by sqrt(p / r) (E[A^T A] = I as the paper's Gaussian
  N(0, 1/r) rows, less noise at the same memory); ``False``: the paper's Gaussian rows.
- ``residual=True`` (ours, not in the paper; off by default): the direction's component outside the row space of
  the (orthonormal) rows Q is the current G (or U) itself, the inside one the compressed EMA; with exact_current
  on Adafactor, direction = G + beta1 * (M_old @ Q - (G @ Q.T) @ Q). Without it that component is missing (Alg. 2)
  or decays with (1 - beta1) (exact_current); GaLore-family work (Fira) also passes the residual through.

Which parameters keep full state: pass the model itself (``Flora(model, ...)``) and only the
attention/MLP matrices are candidates (``projections.projectable_parameters``: ``nn.Linear``/Conv1D
weights minus embeddings and the output head, which project across the vocabulary). A candidate is
compressed iff it is 2-D and ``rank < p`` (the (k, r) state is smaller than the (k, p) one;
``projections.compression_plan``); the rest (biases, norms, embeddings, head, matrices too small for
the rank to save memory) keep a full first moment. With a plain parameter list every 2-D tensor is a
candidate; a group may set ``compress=False``. (The reference code instead leaves matrices with
max/min side > 4 uncompressed to rule out embeddings; we exclude embeddings and the head by module
type, which also covers square-ish vocabularies, and compress every attention/MLP matrix.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

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
from velora.optim.projections import (
    check_project_side,
    compression_plan,
    derive_seed,
    orient,
    random_projection,
    saved_project_side,
    split_param_groups,
)
from velora.optim.sharded import ShardReducer, column_plan, is_sharded, local, local_plan

__all__ = ["Flora"]

_BASES = ("adafactor", "adamw")
_MOMENTUM_SOURCES = ("gradient", "update")
# what a state saved before these options existed was built with
_LEGACY_OPTIONS = {"momentum": "gradient", "exact_current": False, "residual": False}
# one setting away from the constructor: the FLoRA paper's Alg. 2 read literally, and the authors' package's choices
PAPER_ALG2 = {"momentum": "gradient", "exact_current": False, "orthogonal": False, "residual": False}
# eps1 = 1e-15: v_hat floored at 1e-30, as flora-opt adds 1e-30 to G^2 (torch's default clamps the row-statistic mean
# at float32 eps, which bites after gradient clipping: docs/optim.md "eps of the Adafactor base")
AUTHORS_CODE = {"momentum": "update", "exact_current": True, "orthogonal": False, "residual": False,
                "base": "adafactor", "eps1": 1e-15}


class Flora(TensorStateOptimizer):
    """FLoRA: first moment kept in a resampled random projection (k x r instead of n x m).

    Args:
        params: a model (recommended: compresses attention/MLP matrices only), parameters, or param
            groups (groups may override any keyword below, and set ``compress``).
        lr: learning rate (for ``base="adafactor"`` the step is min(lr, 1/sqrt(t)) * max(eps2, RMS(W)),
            as in ``torch.optim.Adafactor``).
        rank: projection rank r of the first moment.
        kappa: resample the projection every ``kappa`` steps (momentum carried over).
        beta1: first-moment decay; 0 disables momentum (pure Adafactor / RMSProp-like AdamW).
        base: "adafactor" (factored second moment) or "adamw" (full second moment, bias-corrected).
        seed: base seed; the projection of parameter i in cycle c is seeded by derive_seed(seed, i, c).
        eight_bit: keep the first moment block-wise 8-bit (``velora.optim.quant``).
        eps1: the Adafactor base's floor: v_hat >= eps1^2 and its row-statistic mean >= eps1 (default 1e-15: a v_hat
            floor of 1e-30, as the Adafactor paper and flora-opt; None: torch.optim.Adafactor's rule, the working
            precision's eps, which clamps clipped gradients' small statistics).
        orthogonal: orthonormal projection rows scaled by sqrt(p / r) (default; exact round trip when rank ==
            projected dim) or the paper's Gaussian N(0, 1/r) rows (False).
        project: which side of each matrix is projected: "smaller" (default, as the FLoRA reference code, less
            noise; state max(n, m) x r) or "larger" (state min(n, m) x r: less memory, more noise).
        force_compress: compress every 2-D parameter even when it saves no memory (for testing).
        momentum: what the compressed first moment averages: "update" (default; the authors' package: the base's
            preconditioned update G / sqrt(v_hat), as Optax's Adafactor momentum) or "gradient" (the paper's
            Alg. 2: the raw gradient, preconditioned after decompression).
        exact_current: keep the current step's gradient (or update) exact and compress only the history (default
            True, the authors' code), or pass it through A.T A too (False, Alg. 2 literally).
        residual: outside the orthonormal rows' span, step along the current gradient (or update) itself (our
            departure from Alg. 2; needs ``orthogonal=True``; default False).

    ``Flora.paper_alg2(...)`` (Alg. 2 literally) and ``Flora.authors_code(...)`` (flora-opt) build the two named
    settings.
    """

    def __init__(
        self,
        params,
        lr: float,
        rank: int,
        kappa: int = 1000,
        beta1: float = 0.9,
        base: str = "adafactor",
        seed: int = 0,
        *,
        beta2: float = 0.999,
        eps: float = 1e-8,
        beta2_decay: float = -0.8,
        eps1: float | None = 1e-15,
        eps2: float = 1e-3,
        clip_threshold: float = 1.0,
        weight_decay: float = 0.0,
        eight_bit: bool = False,
        orthogonal: bool = True,
        project: str = "smaller",
        force_compress: bool = False,
        momentum: str = "update",
        exact_current: bool = True,
        residual: bool = False,
    ):
        defaults = dict(
            lr=lr, rank=rank, kappa=kappa, beta1=beta1, base=base, seed=seed, beta2=beta2, eps=eps,
            beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, clip_threshold=clip_threshold,
            weight_decay=weight_decay, eight_bit=eight_bit, orthogonal=orthogonal, project=project,
            force_compress=force_compress, compress=True, momentum=momentum, exact_current=exact_current,
            residual=residual,
        )
        if isinstance(params, nn.Module):
            # a model: compress only attention/MLP matrices (see projections.projectable_parameters)
            params = split_param_groups(params, {}, {"compress": False})
        super().__init__(params, defaults)

    @classmethod
    def paper_alg2(cls, params, lr: float, rank: int, **kwargs) -> Flora:
        """The FLoRA paper's Alg. 2 read literally: EMA of the raw gradient, the current gradient compressed
        too, Gaussian rows N(0, 1/r), no residual (``PAPER_ALG2``; the defaults before issue #16). Other keywords as
        ``Flora``."""
        return cls(params, lr, rank, **_with_preset("paper_alg2", PAPER_ALG2, kwargs))

    @classmethod
    def authors_code(cls, params, lr: float, rank: int, **kwargs) -> Flora:
        """The choices of the FLoRA authors' package (flora-opt): Adafactor base with its v_hat floor (eps1=1e-15),
        EMA of the preconditioned update, the current update kept exact, Gaussian rows (``AUTHORS_CODE``). Other
        keywords as ``Flora``."""
        return cls(params, lr, rank, **_with_preset("authors_code", AUTHORS_CODE, kwargs))

    @staticmethod
    def _check_group(group: dict) -> None:
        check_group("Flora", group)
        check_positive("lr", group["lr"], float)
        check_positive("rank", group["rank"])
        check_positive("kappa", group["kappa"])
        check_unit_interval("beta1", group["beta1"])
        check_unit_interval("beta2", group["beta2"])
        if group["base"] not in _BASES:
            raise ValueError(f"base={group['base']!r} is not one of {_BASES}")
        check_project_side(group["project"])
        if group["momentum"] not in _MOMENTUM_SOURCES:
            raise ValueError(f"momentum={group['momentum']!r} is not one of {_MOMENTUM_SOURCES} (what the compressed "
                             "first moment averages: the raw gradient or the preconditioned update)")
        for key in ("exact_current", "residual"):
            if not isinstance(group[key], bool):
                raise ValueError(f"{key}={group[key]!r} must be True or False")
        if group["residual"] and not group["orthogonal"]:
            raise ValueError("residual=True needs orthogonal=True (the complement of a Gaussian projection's row space "
                             "is not I - A^T A); set orthogonal=True or residual=False")
        if group["beta2_decay"] >= 0:
            raise ValueError(f"beta2_decay={group['beta2_decay']} must be negative (Adafactor uses -0.8)")

    _IDENTITY_KEYS = ("base", "kappa", "rank")

    @staticmethod
    def _layout(group: dict) -> dict:
        keys = ("base", "rank", "compress", "force_compress", "eight_bit", "orthogonal", "exact_current")
        # "momentum" here is on/off; the option `momentum` (what is averaged) is checked in _adapt_saved
        return {"momentum": group["beta1"] > 0, **{key: group[key] for key in keys if key in group}}

    def _adapt_saved(self, state_dict: dict) -> dict:
        # torch would silently replace each group's options by the saved ones; a compressed momentum
        # only makes sense with the side it was built on, so a different side is an error
        saved_groups = []
        for index, (current, saved) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            saved_project = saved_project_side(saved.get("project"), current["project"], "Flora")
            saved = {**_LEGACY_OPTIONS, **saved, "project": saved_project}  # older states: Alg. 2 options
            for key in _LEGACY_OPTIONS:
                if saved[key] != current[key] and current["beta1"] > 0:
                    raise ValueError(f"Flora state_dict param group {index} was saved with {key}={saved[key]!r} but "
                                     f"this one has {key}={current[key]!r}; build it with {key}={saved[key]!r} or "
                                     "start from a fresh state")
            saved_groups.append(saved)
        return {**state_dict, "param_groups": saved_groups}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        param_index = -1  # global position of the parameter: part of its projection seed
        for group in self.param_groups:
            for param in group["params"]:
                param_index += 1
                if param.grad is None:
                    continue
                self._update(param, group, param_index)
        return loss

    # ------------------------------------------------------------------------------------------------

    def _init_state(self, state: dict, param: torch.Tensor, group: dict, plan, param_index: int) -> None:
        device, dtype = param.device, state_dtype(param.dtype)
        state["step"] = torch.tensor(0.0)
        if group["beta1"] > 0:
            if plan is not None:
                seed = derive_seed(group["seed"], param_index, 0)
                state["seed"] = torch.tensor(seed, dtype=torch.int64)
                init_moment(state, "momentum", (plan.kept_dim, plan.rank), device, group["eight_bit"], True, dtype)
            else:
                init_moment(state, "momentum", param.shape, device, group["eight_bit"], True, dtype)
        if group["base"] == "adafactor":
            if param.dim() >= 2:
                shape = param.shape
                state["row_var"] = torch.zeros(shape[:-1] + (1,), dtype=dtype, device=device)
                state["col_var"] = torch.zeros(shape[:-2] + (1, shape[-1]), dtype=dtype, device=device)
            else:
                state["variance"] = torch.zeros(param.shape, dtype=dtype, device=device)
        else:
            state["exp_avg_sq"] = torch.zeros(param.shape, dtype=dtype, device=device)

    def _momentum_direction(self, state, source, group, plan, steps_done: int, param_index: int) -> torch.Tensor:
        """Update the (compressed) first moment with ``source`` (the gradient or the preconditioned update) and
        return the decompressed momentum (with ``exact_current``: the decompressed history and ``source`` exact;
        with ``residual``: outside the projection's row space, ``source`` itself)."""
        beta1 = group["beta1"]
        if plan is None:
            momentum = read_moment(state, "momentum", source.dtype)  # same shape as the param
            momentum.lerp_(source, 1 - beta1)
            write_moment(state, "momentum", momentum, signed=True)
            return momentum
        oriented = orient(source, plan.transposed)  # (k, p)
        make = dict(n=plan.projected_dim, r=plan.rank, device=source.device, dtype=source.dtype,
                    orthogonal=group["orthogonal"])  # drawn in float32, used in the working precision
        projection = _momentum_projection(int(state["seed"]), make, group["residual"])  # (r, p)
        momentum = read_moment(state, "momentum", source.dtype)  # (k, r)
        direction, subspace = None, projection
        if group["exact_current"]:
            # the history, decompressed with the matrix it was stored in (before any transfer), plus the exact source
            direction = (momentum @ projection).lerp_(oriented, 1 - beta1)  # (k, p)
        kappa = group["kappa"]
        if steps_done > 0 and steps_done % kappa == 0:
            new_seed = derive_seed(group["seed"], param_index, steps_done // kappa)
            new_projection = _momentum_projection(new_seed, make, group["residual"])  # (r, p)
            # M A_old A_new^T, with A_old regenerated from the old seed *before* the seed is replaced
            momentum = momentum @ (projection @ new_projection.T)  # (k, r) @ (r, r)
            state["seed"].fill_(new_seed)
            projection = new_projection
        momentum.lerp_(oriented @ projection.T, 1 - beta1)  # (k, r)
        write_moment(state, "momentum", momentum, signed=True)
        if direction is None:
            direction, subspace = momentum @ projection, projection  # (k, p)
        if group["residual"]:
            # the complement of the momentum's row space gets the source with the weight an exact EMA's m_hat gives a
            # direction that does not decay: bias_correction1 (AdamW divides the step by it, Adafactor does not)
            weight = 1 - beta1 ** (steps_done + 1) if group["base"] == "adamw" else 1.0
            present = (1 - beta1) if group["exact_current"] else 0.0  # the complement's weight already in direction
            complement = oriented - (oriented @ subspace.T) @ subspace  # (k, p): source (I - Q^T Q)
            direction.add_(complement, alpha=weight - present)
        return orient(direction, plan.transposed)  # (n, m)

    def _update(self, param: torch.Tensor, group: dict, param_index: int) -> None:
        state = self.state[param]
        plan = self._plan(param, group, state)
        if not state:
            self._init_state(state, local(param), group, plan, param_index)
            if is_sharded(param) and plan is not None:
                state["projected_axis"] = torch.tensor(1, dtype=torch.int64)  # FSDP2: the columns, see optim.sharded
        elif group["beta1"] > 0 and (plan is not None) != ("seed" in state):
            raise ValueError(f"Flora state of a {tuple(param.shape)} parameter was built with another rank/compress "
                             "setting than its group has now; restore the original rank or start a fresh state")
        grad = local(working_grad(param))  # FSDP2: this rank's rows
        work = working_copy(local(param))
        steps_done = int(state["step"].item())
        state["step"] += 1
        adafactor = group["base"] == "adafactor"
        # the base's preconditioner 1 / sqrt(v_hat): Adafactor multiplies by it, AdamW divides by its inverse
        reducer = ShardReducer(param)  # whole-matrix statistics across FSDP2 shards (plain tensor: as before)
        scale = self._adafactor_inverse_root(grad, state, group, reducer) if adafactor else self._adamw_denominator(
            grad, state, group)
        preconditioned = None  # the base's update of the direction below, when already computed
        direction = grad
        if group["beta1"] > 0 and group["momentum"] == "update":
            source = grad * scale if adafactor else grad / scale  # U = G / sqrt(v_hat), (n, m)
            preconditioned = self._momentum_direction(state, source, group, plan, steps_done, param_index)
        elif group["beta1"] > 0:
            direction = self._momentum_direction(state, grad, group, plan, steps_done, param_index)
        if adafactor:
            update = preconditioned if preconditioned is not None else scale.mul_(direction)
            self._adafactor_apply(work, update, state, group, reducer)
        else:
            numerator, denom = (preconditioned, None) if preconditioned is not None else (direction, scale)
            self._adamw_apply(work, numerator, denom, state, group, reducer)
        store_back(local(param), work)

    @staticmethod
    def _plan(param: torch.Tensor, group: dict, state: dict):
        """The compression plan of ``param``, for this rank's rows; under FSDP2 (or for a state saved there) the
        columns are projected so each row shard compresses on its own (``optim.sharded``)."""
        if not group["compress"]:
            return None
        args = (param.shape, group["rank"], group["force_compress"], group["project"])
        if not (is_sharded(param) or "projected_axis" in state):
            return compression_plan(*args)
        return local_plan(column_plan(*args), local(param).shape[0])

    @staticmethod
    def _adamw_denominator(grad, state, group) -> torch.Tensor:
        # sqrt(v_hat) + eps, the exact operation order of torch.optim.AdamW (the first moment is ours, compressed)
        betas = (group["beta1"], group["beta2"])
        return adam_moments(None, state["exp_avg_sq"], grad, betas, group["eps"], state["step"].item())[0]

    @staticmethod
    def _adamw_apply(work, numerator, denom, state, group, reducer: ShardReducer) -> None:
        # W <- W (1 - lr wd) - lr / bc1 * numerator / denom (denom None: numerator is already preconditioned)
        lr, beta1 = group["lr"], group["beta1"]
        work.mul_(1 - lr * group["weight_decay"])
        step = state["step"].item()
        bias_correction1 = 1 - beta1**step if beta1 > 0 else 1.0
        step_size = lr / bias_correction1
        # Adafactor-style RMS clipping. Exact Adam never triggers it (|m_hat| <= sqrt(v_hat) when
        # beta1^2 <= beta2), but a decompressed random-projection momentum can exceed sqrt(v_hat)
        # by ~sqrt(p / r), which otherwise makes the AdamW base diverge at ordinary learning rates.
        ratio = numerator / denom if denom is not None else numerator
        ratio_rms = reducer.norm(ratio) / math.sqrt(reducer.numel) / bias_correction1
        clip = max(1.0, ratio_rms / group["clip_threshold"])
        if denom is None:
            work.add_(numerator, alpha=-step_size / clip)
        else:
            work.addcdiv_(numerator, denom, value=-step_size / clip)

    @staticmethod
    def _adafactor_inverse_root(grad, state, group, reducer: ShardReducer) -> torch.Tensor:
        # 1 / sqrt(v_hat) of torch.optim.Adafactor's factored second moment (a fresh tensor, safe to modify)
        # torch's default eps1 is the parameter's eps; ours is the working precision's (float32 for 16-bit params)
        eps1 = group["eps1"] if group["eps1"] is not None else torch.finfo(grad.dtype).eps
        one_minus_beta2_t = state["step"].item() ** group["beta2_decay"]
        if grad.dim() >= 2:
            row_var, col_var = state["row_var"], state["col_var"]
            row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))  # (..., n, 1)
            row_var.lerp_(row_mean, one_minus_beta2_t)
            col_mean = reducer.column_mean_square(grad)  # (..., 1, m), over every rank's rows
            col_var.lerp_(col_mean, one_minus_beta2_t)
            var_estimate = row_var @ col_var  # (..., n, m)
            var_estimate.div_(reducer.row_mean(row_var).clamp_(min=eps1))
        else:
            variance = state["variance"]
            variance.lerp_(grad * grad, one_minus_beta2_t)
            var_estimate = variance.clone()
        return var_estimate.clamp_(min=eps1 * eps1).rsqrt_()

    @staticmethod
    def _adafactor_apply(work, update, state, group, reducer: ShardReducer) -> None:
        # the update rule of torch.optim.Adafactor with ``update`` (the preconditioned direction) as its step
        lr = group["lr"]
        rho = min(lr, 1 / math.sqrt(state["step"].item()))
        alpha = max(group["eps2"], reducer.norm(work) / math.sqrt(reducer.numel)) * rho
        if group["weight_decay"] != 0:
            work.mul_(1 - lr * group["weight_decay"])
        denom = max(1.0, reducer.norm(update) / (math.sqrt(reducer.numel) * group["clip_threshold"]))
        work.add_(update, alpha=-alpha / denom)


def _momentum_projection(seed: int, make: dict, residual: bool) -> torch.Tensor:
    """The momentum projection (r, p): ``random_projection``'s rows, or for ``residual`` the orthonormal rows Q
    themselves (Q Q^T = I: Q^T Q is the projector onto their row space, so M Q is the subspace's exact EMA)."""
    projection = random_projection(seed, **make)  # (r, p)
    if residual:
        projection.mul_(math.sqrt(make["r"] / make["n"]))  # undo the sqrt(p / r) that makes E[A^T A] = I
    return projection


def _with_preset(name: str, preset: dict, kwargs: dict) -> dict:
    """``kwargs`` with the preset's options; a keyword that contradicts the preset is a one-line error."""
    clashes = [f"{key}={kwargs[key]!r}" for key in preset if key in kwargs and kwargs[key] != preset[key]]
    if clashes:
        raise ValueError(f"Flora.{name} fixes {preset}; drop {', '.join(clashes)} or build Flora(...) directly")
    return {**kwargs, **preset}
