"""Small pieces shared by the optimizers: argument checks, fp32 working copies, moment storage."""

from __future__ import annotations

import torch

from velora.core.runtime import work_dtype
from velora.optim.quant import dequantize_blockwise, quantize_blockwise


def check_group(optimizer_name: str, group: dict) -> None:
    """One-line errors for a param group without params, with non-floating params, with DTensor (FSDP2) params
    sharded other than on dim 0 of a 1-D mesh (``optim.sharded.check_row_sharded``), or with 8-bit state
    (``eight_bit=True``) for an FSDP2 param, refused here rather than at the first checkpoint hours later."""
    from velora.optim.sharded import check_row_sharded, is_sharded

    params = group["params"]
    if len(params) == 0:
        raise ValueError(f"{optimizer_name}: a param group has no params; drop the empty group")
    for param in params:
        if not isinstance(param, torch.Tensor) or not param.is_floating_point():
            kind = param.dtype if isinstance(param, torch.Tensor) else type(param).__name__
            raise ValueError(f"{optimizer_name}: got a non-floating parameter ({kind}); "
                             "only floating-point tensors can be optimised")
        check_row_sharded(optimizer_name, param)
        if group.get("eight_bit") and is_sharded(param):
            raise ValueError(f"{optimizer_name}: eight_bit=True for a {tuple(param.shape)} FSDP2 parameter: 8-bit "
                             "blocks follow each rank's shard and cannot be checkpointed or resharded; use "
                             "eight_bit=False under FSDP2, or DDP")


def check_positive(name: str, value, kind=int) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
        kind is int and int(value) != value
    ):
        what = "a positive integer" if kind is int else "a positive number"
        raise ValueError(f"{name}={value!r} must be {what}")


def check_unit_interval(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} must be in [0, 1)")


def working_copy(param: torch.Tensor) -> torch.Tensor:
    """The tensor the update is computed on: a float32 copy of a 16-bit param, the param itself otherwise."""
    return param.detach().to(work_dtype(param.dtype))


def store_back(param: torch.Tensor, work: torch.Tensor) -> None:
    # working_copy made an fp32 copy only for 16-bit params; otherwise work aliases param (no data_ptr
    # comparison: fake tensors have no real pointers)
    if work.dtype != param.dtype:
        param.detach().copy_(work)  # rounds the fp32 result to the param dtype


def working_grad(param: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    grad = param.grad.detach()
    if grad.is_sparse:
        raise ValueError("sparse gradients are not supported; use dense embeddings (sparse=False)")
    grad = grad.to(work_dtype(grad.dtype))  # float32 for 16-bit gradients, itself otherwise
    return -grad if maximize else grad


def adam_moments(exp_avg: torch.Tensor | None, exp_avg_sq: torch.Tensor, grad: torch.Tensor, betas: tuple[float, float],
                 eps: float, step: float) -> tuple[torch.Tensor, float]:
    """Adam's moment update in place, in ``torch.optim.AdamW``'s single-tensor operation order (so an unprojected
    step is bitwise AdamW's). ``exp_avg`` None updates only the second moment (FLoRA keeps its first moment
    compressed). Returns (sqrt(v_hat) + eps, the first moment's bias correction 1 - beta1^step)."""
    beta1, beta2 = betas
    if exp_avg is not None:
        exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)  # same shape as grad
    return denom, 1 - beta1**step


# --- moments stored either as float32 or as block-wise 8-bit codes ----------------------------------

def init_moment(state: dict, name: str, shape, device, eight_bit: bool, signed: bool,
                dtype: torch.dtype = torch.float32) -> None:
    zeros = torch.zeros(shape, dtype=torch.float32 if eight_bit else dtype, device=device)
    if eight_bit:
        state[name + "_codes"], state[name + "_absmax"] = quantize_blockwise(zeros, signed)
    else:
        state[name] = zeros


def read_moment(state: dict, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The moment in ``dtype``; unquantised storage is returned itself (updated in place)."""
    if name in state:
        return state[name]
    return dequantize_blockwise(state[name + "_codes"], state[name + "_absmax"]).to(dtype)


def write_moment(state: dict, name: str, value: torch.Tensor, signed: bool) -> None:
    if name in state:
        if value is not state[name]:
            state[name] = value
        return
    state[name + "_codes"], state[name + "_absmax"] = quantize_blockwise(value, signed)


def closure_loss(closure):
    """torch's closure convention: the loss re-evaluated with gradients enabled (``step`` runs under no_grad), or
    None without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Sum of the bytes of every tensor in ``optimizer.state`` (what checkpoints and memory hold)."""
    total = 0
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _saved_by(group: dict) -> str:
    """A guess, from a saved param group's keys, of the optimizer that saved it (for error messages)."""
    if "proj_type" in group:
        return "GaLoreAdamW (or gradnorm_lorp_optimizer)"
    if "kappa" in group and "base" in group:
        return "Flora"
    if "amsgrad" in group:
        return "torch.optim.Adam/AdamW"
    if "beta2_decay" in group:
        return "torch.optim.Adafactor"
    if "nesterov" in group:
        return "torch.optim.SGD"
    return "another optimizer"


class TensorStateOptimizer(torch.optim.Optimizer):
    """Base for our optimizers: ``load_state_dict`` checks the saved kind and keeps every state tensor's dtype.

    ``torch.optim.Optimizer.load_state_dict`` casts every non-"step" state tensor to the parameter's
    dtype; that would turn int64 seeds and int8/uint8 codes into floats and fp32 moments of a bf16
    parameter into bf16. We let torch validate and map the groups, then restore the saved tensors.
    It would also accept another optimizer's state and silently replace each group's options by the saved
    ones; we refuse a state whose groups lack ``_IDENTITY_KEYS`` (saved by another optimizer) or whose
    ``_layout`` (the options that decide what the state holds) differs from this optimizer's.
    """

    _IDENTITY_KEYS: tuple[str, ...] = ()

    @staticmethod
    def _check_group(group: dict) -> None:
        """One-line errors for a param group this optimizer cannot run (override per optimizer)."""

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, then ``_check_group``; a refused group leaves the optimizer as it was."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    @staticmethod
    def _layout(group: dict) -> dict:
        """Options of a group that decide the layout and meaning of its state (override per optimizer)."""
        return {}

    def _check_saved_kind(self, state_dict) -> None:
        name = type(self).__name__
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"{name}.load_state_dict needs an optimizer state_dict with 'state' and 'param_groups', "
                             f"got {keys}; pass optimizer.state_dict() of a {name}")
        for saved in groups:
            missing = [key for key in self._IDENTITY_KEYS if key not in saved]
            if missing:
                raise ValueError(f"this state_dict was saved by {_saved_by(saved)}, not {name} (its param groups "
                                 f"lack {missing}); load it into that optimizer or start {name} from a fresh state")
        for index, (current, saved) in enumerate(zip(self.param_groups, groups)):
            here, there = self._layout(current), self._layout(saved)
            differs = [f"{key}={there[key]!r} saved vs {here[key]!r} here" for key in here
                       if key in there and there[key] != here[key]]
            if differs:
                raise ValueError(f"{name} state_dict param group {index} was saved with other options: "
                                 f"{'; '.join(differs)}; build the optimizer with the saved options or start from a "
                                 "fresh state")

    def _adapt_saved(self, state_dict: dict) -> dict:
        """Hook for a subclass to translate an older saved format (after the kind check)."""
        return state_dict

    def state_dict(self) -> dict:
        """torch's state_dict; under FSDP2 each rank's rows are DTensors (``optim.sharded.shard_state``) so that
        ``torch.distributed.checkpoint`` saves and reshards them."""
        from velora.optim.sharded import shard_state

        saved = super().state_dict()
        params = [(p, group) for group in self.param_groups for p in group["params"]]
        saved["state"] = {index: shard_state(params[index][0], state, self._row_sharded_keys(*params[index]))
                          for index, state in saved["state"].items()}
        return saved

    def _row_sharded_keys(self, param: torch.Tensor, group: dict) -> tuple[str, ...]:
        """The state keys laid out along ``param``'s rows (sharded with it under FSDP2; override per optimizer)."""
        from velora.optim.sharded import ROW_SHARDED_KEYS

        return ROW_SHARDED_KEYS

    def load_state_dict(self, state_dict: dict) -> None:
        from velora.optim.sharded import local

        self._check_saved_kind(state_dict)
        state_dict = self._adapt_saved(state_dict)
        super().load_state_dict(state_dict)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        by_id = dict(zip(saved_ids, params))
        for pid, saved_state in state_dict["state"].items():
            param = by_id[pid]
            self.state[param] = {
                key: local(value).to(device=param.device).clone() if isinstance(value, torch.Tensor) else value
                for key, value in saved_state.items()
            }
