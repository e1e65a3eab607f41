"""Model surgery: `apply_velora` / `remove_velora`.

A targeted layer keeps its identity, parameters and state_dict keys; its class is swapped for a
subclass whose training forward routes through the VeLoRA autograd function, and two buffers are
added: ``velora_v`` (M, r) and ``velora_initialised`` (a bool scalar, so a reloaded model does not
re-initialise v). ``remove_velora`` swaps the class back and drops the buffers.

Full-weight mode wraps the targeted ``nn.Linear`` / GPT-2 ``Conv1D`` itself; adapter mode wraps the
``lora_A`` linears of peft LoRA/DoRA layers and leaves the frozen base layer untouched.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from velora.core import directions as estimates
from velora.core.config import VeLoRAConfig
from velora.core.functional import VeLoRALinearFunction
from velora.core.layer_support import autocast_cast, in_checkpoint_recompute, projection_problem
from velora.core.lora_fused import fuse, protect_4bit_base, restore_4bit_base, unfuse
from velora.core.subtoken import compute_dtype, num_groups


class VeLoRAMixin:
    """Forward override shared by the wrapped layer types. Subclasses define ``_velora_weight``."""

    velora_config: VeLoRAConfig
    velora_sub_token_size: int
    _velora_ready: bool
    _velora_checked: bool = False  # False: validate v once at the next training forward
    _velora_base_class: type

    # ---- layout of the wrapped layer ------------------------------------------------------------
    def _velora_weight(self) -> torch.Tensor:  # (O, D)
        raise NotImplementedError

    def _velora_in_features(self) -> int:
        return self._velora_weight().shape[1]

    # ---- forward ---------------------------------------------------------------------------------
    def _velora_active(self, x: torch.Tensor) -> bool:
        if not (self.training and torch.is_grad_enabled() and self.weight.requires_grad):
            return False
        # peft DoRA builds B·A by passing an identity matrix through lora_A: a probe, not an activation, and it
        # must neither initialise v nor move the EMA (its output is only used detached)
        return not (self.__dict__.get("_velora_dora_probe", False) and _is_identity(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._velora_active(x):
            return super().forward(x)  # eval / no_grad / frozen weight: the plain layer, no overhead
        self._velora_prepare(x)
        weight, bias = self._velora_weight(), self.bias
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # cast as autocast casts a linear's arguments, outside the Function, so grads flow to fp32 params
            dtype = torch.get_autocast_dtype(device_type)
            x, weight, bias = (autocast_cast(t, dtype) for t in (x, weight, bias))
            with torch.autocast(device_type, enabled=False):
                return VeLoRALinearFunction.apply(x, weight, bias, self.velora_v, self.velora_config.scale,
                                                  self.velora_config.coefficient_format())
        return VeLoRALinearFunction.apply(x, weight, bias, self.velora_v, self.velora_config.scale,
                                          self.velora_config.coefficient_format())

    def _velora_prepare(self, x: torch.Tensor) -> None:
        """Before a training forward: build v from the first batch, take one EMA step, or re-estimate v when due."""
        if not self._velora_checked:
            self._velora_check_state()
        # a recompute re-runs a forward that already took its step; only an EMA or counted v needs to know (the
        # check walks autograd's hook stack, so the paper's fixed v skips it on every forward)
        stateful = self.velora_config.init == "ema" or "velora_step" in self._buffers
        recompute = stateful and in_checkpoint_recompute()
        if not self._velora_ready:
            if "_velora_expected_state" in self.__dict__:  # its saved v was expected (velora.core.persistence)
                from velora.core.persistence import refuse_fresh_init

                refuse_fresh_init(self)
            self._velora_initialise(x)
        elif self.velora_config.init == "ema" and not recompute:
            self._velora_ema_update(x)
        elif self._velora_reestimate_due() and not recompute:
            self._velora_initialise(x)  # out of place, from this batch, synchronised as the first one was
        if "velora_step" in self._buffers and not recompute:
            self._velora_forwards += 1
            self.velora_step.add_(1)  # a host-side mirror decides when it is due: no device sync per forward

    def _velora_reestimate_due(self) -> bool:
        every = self.velora_config.reestimate_every
        return every is not None and self._velora_forwards > 0 and self._velora_forwards % every == 0

    # ---- v -------------------------------------------------------------------------------------
    @property
    def velora_ready(self) -> bool:
        """True once v is set (from data, a seed, given directions or a loaded checkpoint)."""
        return self._velora_ready

    def set_velora_directions(self, directions: torch.Tensor) -> None:
        """Use ``directions`` (M, r), orthonormal columns, as v from now on and mark the layer initialised."""
        if directions.shape != self.velora_v.shape:  # v's shape is part of the checkpoint format
            raise ValueError(f"VeLoRA directions of shape {tuple(directions.shape)} for {self._velora_name!r} "
                             f"must be {tuple(self.velora_v.shape)}")
        # out of place: a pending backward keeps the tensor it saved
        self.velora_v = directions.to(device=self.velora_v.device, dtype=self.velora_v.dtype).contiguous()
        self.velora_initialised = torch.ones((), dtype=torch.bool, device=self.velora_initialised.device)
        self._velora_ready = True

    @torch.no_grad()
    def _velora_initialise(self, x: torch.Tensor) -> None:
        """v from this batch (velora.core.directions.from_batch), or the data-free directions; a batch with no
        sub-token on any rank leaves v as it is (the output needs no v; a later batch sets it)."""
        cfg, size = self.velora_config, self.velora_sub_token_size
        try:
            fixed = _fixed_directions(cfg, self.velora_v.shape, x.device, self._velora_name)
            estimate = None if fixed is not None else estimates.from_batch(x, cfg, size)
        except ValueError as err:  # e.g. NaN/Inf in the batch: say which layer
            raise ValueError(f"VeLoRA init of {self._velora_name!r}: {err}") from None
        if fixed is None and estimate is None:
            return
        directions, mean = (fixed, None) if fixed is not None else estimate
        if cfg.init == "ema" and mean is not None:
            self.velora_running_mean = mean.to(self.velora_running_mean)
        self.set_velora_directions(directions)

    @torch.no_grad()
    def _velora_ema_update(self, x: torch.Tensor) -> None:
        mean = estimates.ema_mean(x, self.velora_config, self.velora_sub_token_size)  # (M,) / (G, M)
        if mean is None:
            return  # a zero-token batch carries no statistics: the running mean does not decay
        if not torch.isfinite(mean).all():
            raise ValueError(f"VeLoRA ema update of {self._velora_name!r}: the batch holds NaN/Inf")
        decay = self.velora_config.ema_decay
        running = decay * self.velora_running_mean + (1 - decay) * mean.to(self.velora_running_mean)
        self.velora_running_mean = running
        self.velora_v = estimates.normalised_running_mean(running, self.velora_v).to(self.velora_v)

    # ---- state ---------------------------------------------------------------------------------
    def reset_velora_state(self) -> None:
        """Back to the state right after ``apply_velora``: v from the next training batch (or the seeded /
        given directions), running mean zero. Runs by itself after ``to_empty`` from the meta device."""
        device, dtype = self.velora_v.device, self.velora_v.dtype
        self.velora_v = torch.zeros(self.velora_v.shape, device=device, dtype=dtype)
        self.velora_initialised = torch.zeros((), dtype=torch.bool, device=device)
        if "velora_running_mean" in self._buffers:
            self.velora_running_mean = torch.zeros(self.velora_running_mean.shape, device=device, dtype=dtype)
        if "velora_step" in self._buffers:
            self.velora_step = torch.zeros((), dtype=torch.int64, device=device)
        self._velora_ready, self._velora_forwards = False, 0
        fixed = _fixed_directions(self.velora_config, self.velora_v.shape, device, self._velora_name)
        if fixed is not None:
            self.set_velora_directions(fixed)
        self._velora_checked = not self.velora_v.is_meta

    def reset_parameters(self) -> None:
        """The wrapped layer's own ``reset_parameters`` (if it has one), then ``reset_velora_state``."""
        base_reset = getattr(super(), "reset_parameters", None)
        if base_reset is not None:
            base_reset()
        self.reset_velora_state()

    def _apply(self, fn, recurse=True):
        # to_empty() from the meta device hands every buffer uninitialised memory: v and the flag are garbage
        was_meta = self.velora_v.is_meta
        module = super()._apply(fn, recurse)
        if was_meta and not self.velora_v.is_meta:
            self.reset_velora_state()
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "velora_initialised" in state_dict:  # a plain checkpoint (strict=False) leaves v as it was
            self._velora_ready = bool(self.velora_initialised)
            self._velora_checked = False  # v is validated once, at the next training forward

    def _velora_check_state(self) -> None:
        """Once after wrap / load / reset, not per step (a host sync): refuse a v that cannot be a projection."""
        name, v = self._velora_name, self.velora_v
        if v.is_meta:
            raise ValueError(f"VeLoRA layer {name!r} still has velora_v on the meta device; call "
                             "model.to_empty(device=...) (which resets VeLoRA state) before training")
        if self._velora_ready:
            problem = projection_problem(v)
            if problem is None and "velora_running_mean" in self._buffers \
                    and not torch.isfinite(self.velora_running_mean).all():
                problem = "a non-finite velora_running_mean"
            if problem is not None:
                raise ValueError(f"VeLoRA layer {name!r} is marked initialised but holds {problem}; load a "
                                 "checkpoint saved with VeLoRA, or call reset_velora_state() to rebuild v from data")
        if "velora_step" in self._buffers:  # the re-estimate counter, read once here (after wrap, load or reset)
            self._velora_forwards = int(self.velora_step)
        self._velora_checked = True

    def extra_repr(self) -> str:
        per_group = ", per_group" if self.velora_config.per_group_directions else ""
        return (f"{super().extra_repr()}, velora(sub_token_size={self.velora_sub_token_size}, "
                f"rank={self.velora_config.rank}, init={self.velora_config.init!r}{per_group})")


def _is_identity(x: torch.Tensor) -> bool:
    if x.dim() != 2 or x.shape[0] != x.shape[1] or x.requires_grad:
        return False
    return bool((x.diagonal() == 1).all()) and int(torch.count_nonzero(x)) == x.shape[0]


class VeLoRALinear(VeLoRAMixin, nn.Linear):
    _velora_fusable = True  # as a peft lora_A, its parent may run the fused LoRA path (velora.core.lora_fused)

    def _velora_weight(self) -> torch.Tensor:
        return self.weight  # (O, D)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers not installed: nothing to wrap
        return None
    return Conv1D


class _Conv1DWeight:
    def _velora_weight(self) -> torch.Tensor:
        return self.weight.t()  # Conv1D stores (D, O); the function wants (O, D)


_WRAPPED_CLASSES: dict[type, type] = {}


def register_layer_type(base_class: type, layout: type, name: str | None = None) -> type:
    """Let ``apply_velora`` wrap layers of ``base_class`` (a layer type defined outside core, e.g. a method's
    reparameterised linear). ``layout`` is a mixin that tells VeLoRA what the layer computes, overriding the
    VeLoRAMixin hooks: ``_velora_weight()`` -> the (O, D) weight the forward multiplies its input by (may be built
    from parameters), ``_velora_in_features()`` -> D, and ``_velora_active(x)`` -> whether this call trains (so z
    is kept). Returns the wrapper class, named ``name`` (default ``VeLoRA<base>``) in ``layout``'s module: bind it
    there under that name so pickle finds it. Registering the same base twice returns the first wrapper."""
    if base_class not in _WRAPPED_CLASSES:
        name = name or f"VeLoRA{base_class.__name__}"
        _WRAPPED_CLASSES[base_class] = type(name, (layout, VeLoRAMixin, base_class), {"__module__": layout.__module__})
    return _WRAPPED_CLASSES[base_class]


def __getattr__(name: str):
    # lets pickle find the Conv1D wrapper, which is built on first use
    if name == "VeLoRAConv1D":
        conv1d = _conv1d_class()
        if conv1d is not None:
            return _wrapper_class_for(conv1d)
    raise AttributeError(f"module 'velora.core.layers' has no attribute {name!r}")


def _wrapper_class_for(cls: type) -> type | None:
    if cls is nn.Linear:
        return VeLoRALinear
    if cls in _WRAPPED_CLASSES:
        return _WRAPPED_CLASSES[cls]
    conv1d = _conv1d_class()
    if conv1d is not None and cls is conv1d:
        return register_layer_type(conv1d, _Conv1DWeight)
    return None


# ---- surgery -------------------------------------------------------------------------------------


def is_velora_module(module: nn.Module) -> bool:
    return isinstance(module, VeLoRAMixin)


def velora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> wrapped layer, in model order."""
    return {name: m for name, m in model.named_modules() if is_velora_module(m)}


def _is_lora_layer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and hasattr(module, "base_layer")


def _wrap(module: nn.Module, name: str, config: VeLoRAConfig) -> bool:
    """Turn ``module`` into its VeLoRA subclass in place. False if it already carries this config."""
    if is_velora_module(module):
        if module.velora_config == config:
            return False
        raise ValueError(f"{name!r} already has VeLoRA with a different config; call remove_velora(model) first")
    wrapper = _wrapper_class_for(type(module))
    if wrapper is None:
        raise ValueError(f"target {name!r} is a {type(module).__name__}, not an nn.Linear, transformers Conv1D, "
                         "registered layer type (register_layer_type) or peft LoRA layer; narrow target_modules to "
                         "its linear children")
    base_class = type(module)
    module.__class__ = wrapper
    try:
        size = config.sub_token_size_for(module._velora_in_features(), name)
        shape = (size, config.rank)  # (M, r), or (G, M, r) with one set of directions per group
        if config.per_group_directions:
            shape = (num_groups(module._velora_in_features(), size), *shape)
        fixed = _fixed_directions(config, shape, module.weight.device, name)
    except ValueError:
        module.__class__ = base_class  # a failed apply leaves the layer as it was
        raise
    weight = module.weight
    dtype = compute_dtype(weight.dtype) if weight.is_floating_point() else torch.float32
    module.velora_config = config
    module.velora_sub_token_size = size
    module._velora_base_class = base_class
    module._velora_name = name
    module._velora_ready = False
    module._velora_forwards = 0  # training forwards so far (mirrors velora_step when reestimate_every is set)
    module._velora_checked = False  # the first training forward validates v once
    module.register_buffer("velora_v", torch.zeros(shape, device=weight.device, dtype=dtype))
    module.register_buffer("velora_initialised", torch.zeros((), dtype=torch.bool, device=weight.device))
    if config.init == "ema":
        module.register_buffer("velora_running_mean", torch.zeros(shape[:-1], device=weight.device, dtype=dtype))
    if config.reestimate_every is not None:
        module.register_buffer("velora_step", torch.zeros((), dtype=torch.int64, device=weight.device))
    if fixed is not None:  # data-independent: set now so the directions exist before the first batch
        module.set_velora_directions(fixed)
    return True


def _fixed_directions(config: VeLoRAConfig, shape, device, name: str) -> torch.Tensor | None:
    """Directions of ``shape`` that need no data (a user tensor, or the seeded ``random`` init); None otherwise.
    Built on the CPU: a ``with torch.device("meta")`` block would catch them, and meta cannot check a norm."""
    if isinstance(config.init, torch.Tensor):
        return estimates.given_directions(config.init, torch.Size(shape), name).to(device)
    if config.init == "random":
        groups = shape[0] if len(shape) == 3 else None
        return estimates.seeded_directions(shape[-2], shape[-1], groups, config.seed).to(device)
    return None


def apply_velora(model: nn.Module, config: VeLoRAConfig | None = None, filter_fn=None) -> nn.Module:
    """Compress the saved inputs of the layers ``config.target_modules`` selects (in place).

    ``filter_fn(name, module) -> bool`` narrows the selection further. Returns ``model``.
    Applying the same config twice is a no-op; a different config on a wrapped layer is an error.
    """
    config = config or VeLoRAConfig()
    if not isinstance(config, VeLoRAConfig):
        raise ValueError(f"config must be a VeLoRAConfig, got {type(config).__name__}")
    candidates = list(model.named_modules())
    matched: list[tuple[str, nn.Module]] = []
    lora_layers: list[nn.Module] = []
    for name, module in candidates:
        if not name or not config.matches(name):
            continue
        if filter_fn is not None and not filter_fn(name, module):
            continue
        if _is_lora_layer(module) and ".lora_" not in name:
            if config.mode == "full":
                raise ValueError(f"{name!r} is a peft LoRA layer but mode='full'; use mode='adapter' (or 'auto') "
                                 "to compress the input of its lora_A")
            matched.extend(_lora_a_targets(name, module))
            lora_layers.append(module)
        elif config.mode == "adapter" and not is_velora_module(module):
            continue  # adapter mode only touches LoRA layers; plain matches are left alone on purpose
        else:
            matched.append((name, module))
    if not matched:
        linear_names = [n for n, m in candidates if isinstance(m, nn.Linear) or _wrapper_class_for(type(m))][:6]
        raise ValueError(f"target_modules={list(config.target_modules)} matched no layer "
                         f"(mode={config.mode!r}); linear layers here include {linear_names}")
    for name, module in matched:
        _wrap(module, name, config)
    for layer in lora_layers:
        protect_4bit_base(layer)  # a 4-bit base keeps its training layout through evaluations (lora_fused)
        if config.fuse_lora:
            fuse(layer)  # peft's forward still runs whenever the fused path does not apply
    _mark_dora_probes(model)
    from velora.core.persistence import flag_saved_state

    flag_saved_state(model)  # loaded from a folder that holds v: warn before a batch starts a new one
    return model


def _lora_a_targets(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    if len(module.lora_A) == 0:
        raise ValueError(f"peft LoRA layer {name!r} has no adapter; add one before apply_velora")
    out = []
    for adapter, lora_a in module.lora_A.items():
        if adapter in getattr(module, "lora_velora_embed", {}):
            raise ValueError(f"{name!r} adapter {adapter!r} already uses peft's own VeLoRA variant; "
                             "build the LoraConfig without velora_config to use velora-torch")
        dropout = module.lora_dropout[adapter] if adapter in getattr(module, "lora_dropout", {}) else None
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            warnings.warn(f"{name!r}: lora_dropout={dropout.p} keeps a full-size dropout mask for backward, "
                          "which VeLoRA cannot compress; set lora_dropout=0 for the full memory saving",
                          stacklevel=3)
        out.append((f"{name}.lora_A.{adapter}", lora_a))
    return out


def _mark_dora_probes(model: nn.Module) -> None:
    """Flag the lora_A layers of DoRA adapters, whose parent probes them with an identity matrix."""
    for module in model.modules():
        if not _is_lora_layer(module):
            continue
        for adapter, lora_a in module.lora_A.items():
            uses_dora = adapter in getattr(module, "lora_magnitude_vector", {}) or \
                getattr(module, "use_dora", {}).get(adapter, False)
            if uses_dora and is_velora_module(lora_a):
                lora_a._velora_dora_probe = True


def remove_velora(model: nn.Module) -> nn.Module:
    """Undo ``apply_velora``: original classes, original state_dict keys. Returns ``model``."""
    for module in model.modules():
        unfuse(module)
        restore_4bit_base(module)
    for module in velora_modules(model).values():
        for key in ("velora_v", "velora_initialised", "velora_running_mean", "velora_step"):
            if key in module._buffers:
                del module._buffers[key]
        base_class = module._velora_base_class
        for attr in ("velora_config", "velora_sub_token_size", "_velora_base_class", "_velora_name",
                     "_velora_ready", "_velora_checked", "_velora_dora_probe", "_velora_forwards"):
            module.__dict__.pop(attr, None)
        module.__class__ = base_class
    return model


# ---- peft adapters: v travels with the adapter ---------------------------------------------------------


def load_peft_velora_state(model: nn.Module, path: str, adapter_name: str = "default") -> nn.Module:
    """Load the VeLoRA buffers saved by peft's ``save_pretrained`` into an adapter that has VeLoRA applied.

    Kept for existing code: ``velora.load_velora_state(model, path, adapter_name=...)`` does the same for
    every save format (and peft models with ``modules_to_save``). Returns ``model``.
    """
    from velora.core.persistence import load_velora_state

    return load_velora_state(model, path, adapter_name=adapter_name)
