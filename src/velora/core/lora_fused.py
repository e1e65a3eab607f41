"""One autograd node for a peft LoRA layer whose ``lora_A`` carries VeLoRA (adapter mode).

peft computes ``base(x) + lora_B(lora_A(dropout(x))) · s`` as separate nodes: the frozen base linear,
lora_A, lora_B, a scale and an add, and autograd sums the two input gradients. Each of the last three
is a full pass over a (T, O) or (T, D) tensor. Fused, the training forward is

    h   = x Aᵀ                          (T, r)   kept for grad_B
    out = x Wᵀ + b + s · h Bᵀ           (T, O)   one addmm on top of the base matmul
    z   = group(x) · V                  (T, D/M, k)   kept for grad_A, instead of x

and the backward, with G = ∂L/∂out (T, O):

    gh     = s · G B                    (T, r)
    grad_B = s · Gᵀ h                   (O, r)
    grad_A = (ghᵀ z) ⊗ V                (r, D)   factored, x̂ never formed (DESIGN.md §2)
    grad_x = G W + gh A                 (T, D)   one addmm on top of the base matmul
    grad_b = ΣG                         (O,)     only if the base bias trains

It saves exactly what the unfused path saves (z and h; parameters and v are not activations) and gives
the same numbers up to float rounding. The fused class takes this path only when it is the plain case
— training with grad enabled, one active unmerged adapter, vanilla LoRA (no DoRA or other variant),
no dropout, no lora_B bias, a frozen ``nn.Linear`` base, x in the base weight's dtype and an adapter in that
dtype or a wider one (peft's fp32 adapters on a bf16 base), autocast off, no user hooks on the parts it skips —
and otherwise runs peft's own forward unchanged.

QLoRA: peft's bitsandbytes ``lora.Linear4bit`` on a ``bnb.nn.Linear4bit`` base (NF4 or FP4, double quantisation or
not) is fused the same way when x is in the base's compute dtype. x Wᵀ runs through ``bnb.matmul_4bit`` and G W
dequantizes the 4-bit weight in backward, as bitsandbytes' own backward does; only the packed weight (a parameter)
is referenced, so the saved bytes are again z and h. ``VeLoRAConfig(fuse_lora=False)`` turns the fused classes off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_mod

from velora.core.functional import load_coefficients, refuse_double_backward, store_coefficients
from velora.core.observer import is_observer  # hooks the memory meter marks as watch-only
from velora.core.subtoken import _as, compress, factored_weight_grad

_FUSED_CLASSES: dict[type, type] = {}


class LoRAVeLoRAFunction(torch.autograd.Function):
    """x and the base's compute dtype agree; the adapter (A, B) may be wider, as peft keeps fp32 adapters on a
    bf16 base: then, like peft, the LoRA branch runs in the adapter dtype on x cast to it and its input gradient
    is cast back to x's dtype. Where the two branches are summed follows the peft layer being fused: a plain
    ``lora.Linear`` sums in the adapter dtype, the bnb ``Linear4bit`` one casts the LoRA branch to x's dtype first.
    With a ``quant_state`` the base weight is bitsandbytes' packed 4-bit tensor: its matmul runs through
    ``bnb.matmul_4bit`` and the input gradient dequantizes it again in backward, as bitsandbytes' own backward does
    (the dequantized weight is never kept)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, directions, scaling, velora_scale, quant_state=None,
                kept_as=None):
        # x: (..., D); weight: (O, D) frozen, or packed 4-bit; bias: (O,) or None; lora_a: (r, D); lora_b: (O, r)
        # directions: (M, k)
        tokens = x.reshape(-1, x.shape[-1])  # (T, D)
        adapter_tokens = _as(tokens, lora_a.dtype)  # (T, D), what peft's lora_A receives
        hidden = adapter_tokens.mm(lora_a.t())  # (T, r)
        out = _base_forward(tokens, weight, bias, quant_state)  # (T, O), x's dtype
        if quant_state is None or lora_a.dtype == out.dtype:
            out = _as(out, lora_a.dtype).addmm_(hidden, lora_b.t(), alpha=scaling)  # (T, O) += s · (T, r) @ (r, O)
        else:  # peft's 4-bit layer casts s · h Bᵀ to x's dtype and adds there
            out = out.add_(hidden.mm(lora_b.t()).mul_(scaling).to(out.dtype))  # (T, O)
        needs_x, needs_a, needs_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        z = compress(adapter_tokens, directions) if needs_a else None  # (T, G, k)
        kept = store_coefficients(ctx, z, kept_as)  # z, or its integer codes, per-token and per-column scales
        ctx.save_for_backward(*kept, hidden if needs_b else None, weight if needs_x else None,
                              lora_a if needs_x else None, lora_b if (needs_x or needs_a) else None,
                              directions if needs_a else None)
        ctx.x_shape, ctx.scaling, ctx.velora_scale = x.shape, float(scaling), float(velora_scale)
        ctx.has_bias, ctx.adapter_dtype, ctx.quant_state = bias is not None, lora_a.dtype, quant_state
        return _as(out, x.dtype).view(*x.shape[:-1], out.shape[-1])  # (..., O)

    @staticmethod
    def backward(ctx, grad_out):
        *kept, hidden, weight, lora_a, lora_b, directions = ctx.saved_tensors
        z = load_coefficients(ctx, kept)  # (T, G, k)
        needs_x, _, needs_bias, needs_a, needs_b = ctx.needs_input_grad[:5]
        grad = grad_out.reshape(-1, grad_out.shape[-1])  # (T, O), x's dtype
        adapter_grad = _as(grad, ctx.adapter_dtype)  # (T, O), cast once (a no-op when the dtypes agree)
        grad_x = grad_bias = grad_a = grad_b = None
        grad_hidden = adapter_grad.mm(lora_b).mul_(ctx.scaling) if (needs_x or needs_a) else None  # (T, r)
        # grad_x / grad_bias stay differentiable (exact); grad_A (from z) and grad_B (from the saved hidden, whose
        # dependence on x is not recorded) refuse double backward
        with torch.no_grad():
            if needs_b:
                grad_b = adapter_grad.t().mm(hidden).mul_(ctx.scaling)  # (O, r)
            if needs_a:
                grad_a = factored_weight_grad(grad_hidden, z, directions, ctx.x_shape[-1], ctx.velora_scale)  # (r, D)
        grad_a = refuse_double_backward(grad_a, grad_out, lora_b)
        grad_b = refuse_double_backward(grad_b, grad_out, lora_b)
        if needs_x:
            grad_x = _base_input_grad(grad, weight, ctx.quant_state)  # (T, D)
            if lora_a.dtype == grad_x.dtype:
                grad_x.addmm_(grad_hidden, lora_a)  # += (T, r) @ (r, D)
            else:  # the adapter's input gradient arrives in its own dtype and is cast, as in peft's graph
                grad_x.add_(grad_hidden.mm(lora_a).to(grad_x.dtype))
            grad_x = grad_x.view(ctx.x_shape)  # (..., D)
        if ctx.has_bias and needs_bias:
            grad_bias = grad.sum(0)  # (O,)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None, None, None


def _base_forward(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, quant_state) -> torch.Tensor:
    """The frozen base layer's output x Wᵀ + b (T, O), from a float weight or a bitsandbytes 4-bit one."""
    if quant_state is None:
        return F.linear(tokens, weight, bias)  # (T, O)
    import bitsandbytes as bnb

    return bnb.matmul_4bit(tokens, weight, quant_state=quant_state, bias=bias)  # (T, O); no graph: grad is off here


def _base_input_grad(grad: torch.Tensor, weight: torch.Tensor, quant_state) -> torch.Tensor:
    """G W (T, D): for a 4-bit weight, dequantized here and dropped right after (never saved for backward)."""
    if quant_state is None:
        return grad.mm(weight)  # (T, O) @ (O, D)
    from bitsandbytes.functional import dequantize_4bit

    return grad.mm(dequantize_4bit(weight, quant_state).to(grad.dtype))  # (T, O) @ (O, D)


def _hooked(module: nn.Module) -> bool:
    if "forward" in module.__dict__ or getattr(module, "_hf_hook", None) is not None:  # e.g. accelerate offload
        return True
    hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    return not all(is_observer(hook) for hook in hooks)


def _global_hooks() -> bool:
    hooks = list(module_mod._global_forward_hooks.values()) + list(module_mod._global_forward_pre_hooks.values())
    return not all(is_observer(hook) for hook in hooks)


class FusedLoRAMixin:
    """Forward for a peft ``lora.Linear`` that fuses the plain training case (see the module docstring)."""

    _velora_fused_base_class: type

    def _velora_fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The adapter the fused path runs, or None when peft's own forward must run."""
        if args or kwargs or not (self.training and torch.is_grad_enabled()):
            return None
        if self.disable_adapters or self.merged:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        adapter = active[0]
        if adapter in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(adapter, False):
            return None
        lora_a, lora_b, base = self.lora_A[adapter], self.lora_B[adapter], self.base_layer
        dropout = self.lora_dropout[adapter]
        if not (getattr(lora_a, "_velora_fusable", False) and lora_a.velora_config.fuse_lora
                and lora_a._velora_active(x)):
            return None
        if type(lora_b) is not nn.Linear or lora_b.bias is not None or lora_a.bias is not None:
            return None
        if not (isinstance(dropout, nn.Identity) or (type(dropout) is nn.Dropout and dropout.p == 0)):
            return None
        dtype, adapter_dtype = x.dtype, lora_a.weight.dtype
        if not x.is_floating_point() or lora_b.weight.dtype != adapter_dtype or not self._velora_base_fusable(dtype):
            return None
        if adapter_dtype != dtype and (torch.promote_types(dtype, adapter_dtype) != adapter_dtype
                                       or not getattr(self, "cast_input_dtype_enabled", True)):
            return None  # a narrower adapter, or peft told not to cast x: peft's own forward
        if torch.is_autocast_enabled(x.device.type):
            return None
        if any(_hooked(m) for m in (base, lora_a, lora_b, dropout)) or _global_hooks():
            return None
        return adapter

    def _velora_base_fusable(self, dtype: torch.dtype) -> bool:
        """A frozen ``nn.Linear`` base whose weight (and bias) are in x's dtype."""
        base = self.base_layer
        if type(base) is not nn.Linear or base.weight.requires_grad or base.weight.dtype != dtype:
            return False
        return base.bias is None or base.bias.dtype == dtype

    def _velora_base_inputs(self) -> tuple:
        """(weight, bias, quant_state) of the base layer for ``LoRAVeLoRAFunction``."""
        return self.base_layer.weight, self.base_layer.bias, None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._velora_fused_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        lora_a = self.lora_A[adapter]
        lora_a._velora_prepare(x)  # first-batch init / EMA step, exactly as the unfused lora_A would
        weight, bias, quant_state = self._velora_base_inputs()
        return LoRAVeLoRAFunction.apply(x, weight, bias, lora_a.weight, self.lora_B[adapter].weight,
                                        lora_a.velora_v, self.scaling[adapter], lora_a.velora_config.scale,
                                        quant_state, lora_a.velora_config.coefficient_format())


class Fused4bitLoRAMixin(FusedLoRAMixin):
    """The same for peft's bitsandbytes ``lora.Linear4bit`` (QLoRA): the base is a ``bnb.nn.Linear4bit``."""

    def _velora_base_fusable(self, dtype: torch.dtype) -> bool:
        """A 4-bit (NF4 or FP4) ``Linear4bit`` computing in x's dtype, its weight in bitsandbytes' training layout."""
        import bitsandbytes as bnb

        base = self.base_layer
        if type(base) is not bnb.nn.Linear4bit or base.weight.requires_grad or not base.compute_type_is_set:
            return False  # an unset compute dtype is chosen by the base's own first forward
        state = getattr(base.weight, "quant_state", None)
        if state is None or state.quant_type not in ("nf4", "fp4") or getattr(state, "packing_format_for_cpu", False):
            return False  # lost state (peft's path restores it) or the CPU inference layout bitsandbytes packs in eval
        if base.compute_dtype != dtype:
            return False
        return base.bias is None or base.bias.dtype == dtype  # bitsandbytes would recast a mismatched bias in place

    def _velora_base_inputs(self) -> tuple:
        base = self.base_layer
        return base.weight, base.bias, base.weight.quant_state


def _peft_lora_classes() -> dict[type, tuple[str, type]]:
    """peft's LoRA layer classes the fused path knows: {class: (fused class name, mixin)}."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # peft not installed: no LoRA layers to fuse
        return {}
    classes = {Linear: ("VeLoRAFusedLoraLinear", FusedLoRAMixin)}
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes not installed: peft defines no 4-bit LoRA layer
        return classes
    classes[Linear4bit] = ("VeLoRAFusedLoraLinear4bit", Fused4bitLoRAMixin)
    return classes


def fused_class_for(cls: type) -> type | None:
    """The fused subclass of peft's ``lora.Linear`` or bnb ``lora.Linear4bit`` (exactly those classes, not their
    other quantised relatives)."""
    known = _peft_lora_classes()
    if cls not in known:
        return None
    if cls not in _FUSED_CLASSES:
        name, mixin = known[cls]
        _FUSED_CLASSES[cls] = type(name, (mixin, cls), {"__module__": __name__})
    return _FUSED_CLASSES[cls]


def __getattr__(name: str):
    # lets pickle find the fused classes, which are built on first use; dunder lookups (the import system asks for
    # ``__path__`` on every ``from velora.core.lora_fused import ...``) must not import peft
    if name.startswith("__"):
        raise AttributeError(f"module 'velora.core.lora_fused' has no attribute {name!r}")
    for cls, (fused_name, _) in _peft_lora_classes().items():
        if name == fused_name:
            return fused_class_for(cls)
    raise AttributeError(f"module 'velora.core.lora_fused' has no attribute {name!r}")


def fuse(layer: nn.Module) -> bool:
    """Swap a peft ``lora.Linear`` / bnb ``lora.Linear4bit`` to its fused class in place. False if the layer is of
    another kind."""
    if isinstance(layer, FusedLoRAMixin):
        return True
    fused = fused_class_for(type(layer))
    if fused is None:
        return False
    base_class = type(layer)
    layer.__class__ = fused
    layer._velora_fused_base_class = base_class
    return True


def keep_4bit_training_layout(layer: nn.Module) -> None:
    """Stop a bitsandbytes ``Linear4bit`` from repacking its weight for CPU inference (CPUs with AVX512-BF16, eval
    mode, no grad): the repack happens in place on the first such forward, rounds the block scales to bf16 and
    drops double quantisation, so an evaluation would change the frozen base that training continues from, and
    peft's merge and ``Params4bit.to()`` misread the packed layout (bitsandbytes issue 2078)."""
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


def protect_4bit_base(lora_layer: nn.Module) -> None:
    """``keep_4bit_training_layout`` on a peft LoRA layer's bitsandbytes base, remembering the base's setting for
    ``restore_4bit_base`` (``remove_velora``)."""
    base = getattr(lora_layer, "base_layer", None)
    if "support_avx512bf16_for_cpu" in getattr(base, "__dict__", {}) and \
            "_velora_base_cpu_packing" not in lora_layer.__dict__:
        lora_layer._velora_base_cpu_packing = base.support_avx512bf16_for_cpu
        keep_4bit_training_layout(base)


def restore_4bit_base(lora_layer: nn.Module) -> None:
    if "_velora_base_cpu_packing" in lora_layer.__dict__:
        lora_layer.base_layer.support_avx512bf16_for_cpu = lora_layer.__dict__.pop("_velora_base_cpu_packing")


def unfuse(layer: nn.Module) -> None:
    if isinstance(layer, FusedLoRAMixin):
        layer.__class__ = layer.__dict__.pop("_velora_fused_base_class")
