"""``--init-from``: start a run from the weights of a run of any method.

The source's model.safetensors holds the state dict of the model its method prepared: a peft wrapper
(``base_model.model.`` prefix, ``base_layer`` + ``lora_A/B`` (+ ``lora_magnitude_vector`` for DoRA)), GradNormLoRP
layers (frozen W0 in ``weight``, ``lora_I``, ``lora_J``, ``magnitude``), VeLoRA buffers, or plain weights (full,
GaLore, FLoRA). It is turned into the bare model's state dict, the way the source's method merges:

    LoRA          W = W0 + (B @ A) * s                 s = lora_alpha / r (peft's merge)
    DoRA          W = m * V / ||V||_row,  V = W0 + (B @ A) * s
    GradNormLoRP  W = m * V / ||V||_row,  V = W0 + s * I @ J,  s = gradnorm_alpha / r (merge_gradnorm_lorp)

and loaded into the bare model before the target method prepares it; after that, v of every VeLoRA layer of the
target with the same layer and shape in the source is restored (so it is not re-initialised). The optimizer
state and the step count are left: the new run starts its own schedule. One line says what was taken and left.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from velora.core.persistence import PEFT_PREFIX, VELORA_BUFFERS, _restore_layer, read_tensors
from velora.methods.options import MethodOptions

__all__ = ["InitSource", "read_init_source", "load_init_weights", "restore_init_velora"]



@dataclass
class InitSource:
    """A source run's weights as the bare model's state dict, plus its VeLoRA buffers by layer."""

    path: str
    method: str  # "lora run", or "saved model" for a folder that is not a velora run
    step: int | None
    base: dict[str, torch.Tensor]
    velora: dict[str, dict[str, torch.Tensor]]
    merged: dict[str, int] = field(default_factory=dict)  # "LoRA" / "DoRA" / "GradNormLoRP" -> layers merged
    loaded: int = 0
    unused: list[str] = field(default_factory=list)


# ---- reading the source run -----------------------------------------------------------------------------


def _run_config(path: Path) -> dict:
    """The source run's config.json (TrainConfig) when ``path`` is a run or one of its checkpoints, else {}."""
    for folder in (path, path.parent.parent):
        config = folder / "config.json"
        if config.exists():
            data = json.loads(config.read_text())
            if "method" in data:  # a transformers config.json is not a run's
                return data
    return {}


def source_tokenizer(source) -> Path | None:
    """The tokenizer.json a ``velora train`` run (or one of its checkpoint folders) was trained with, else None."""
    path = Path(source)
    for folder in (path, path.parent.parent):
        if (folder / "tokenizer.json").is_file() and "method" in _run_config(folder):
            return folder / "tokenizer.json"
    return None


def check_same_tokenizer(source, tokenizer) -> None:
    """Refuse to start from a run whose token ids mean other strings: its embeddings and head are indexed by its
    own tokenizer, so a tokenizer retrained on other --data would silently scramble them."""
    from velora.training.tokenizer import load_tokenizer

    saved = source_tokenizer(source)
    if saved is None:
        return
    if load_tokenizer(str(saved)).identity() != tokenizer.identity():
        raise ValueError(f"--init-from {source}: that run's token ids come from {saved}, and this run's tokenizer "
                         f"({tokenizer.name}) maps ids to other strings; pass --tokenizer {saved} (the default when "
                         "--tokenizer is not given)")


def _step_of(path: Path) -> int | None:
    latest = path / "checkpoints" / "latest"
    name = latest.read_text().strip() if latest.exists() else path.name
    return int(name.split("-")[-1]) if name.startswith("step-") and name.split("-")[-1].isdigit() else None


def _split_key(key: str) -> tuple[str, str, str | None]:
    """(layer, tensor, adapter) of a source key, peft's prefix already removed:
    'm.q_proj.lora_A.default.weight' -> ('m.q_proj', 'lora_A', 'default');
    'm.q_proj.lora_A.default.velora_v' -> ('m.q_proj', 'velora_v', None) (v belongs to the layer's input);
    'm.q_proj.base_layer.weight' -> ('m.q_proj', 'weight', None); 'm.q_proj.lora_I' -> ('m.q_proj', 'lora_I', None)."""
    layer, _, tensor = key.replace(".base_layer.", ".").rpartition(".")
    if tensor in VELORA_BUFFERS:
        return (layer.rsplit(".lora_A.", 1)[0] if ".lora_A." in layer else layer), tensor, None
    parts = key.split(".")
    for index, part in enumerate(parts[:-2]):
        if part in ("lora_A", "lora_B", "lora_magnitude_vector"):
            return ".".join(parts[:index]), part, parts[index + 1]
    return layer, tensor, None


def _row_norm(direction: torch.Tensor) -> torch.Tensor:
    return direction.norm(p=2, dim=1).clamp_min(1e-12)  # (out,), as GradNormLoRPLinear._row_norm


def _merge_lora(weight, factors, alpha: float) -> tuple[torch.Tensor, str]:
    """W0 + (B @ A) * s for every adapter (peft's merge), then DoRA's magnitude/row-norm when present."""
    kind = "LoRA"
    for _name, parts in sorted(factors.items()):  # adapters in name order
        a, b = parts["lora_A"], parts["lora_B"]  # (r, in), (out, r)
        weight = weight + (b @ a) * (alpha / a.shape[0])  # (out, in)
        if "lora_magnitude_vector" in parts:  # DoRA: m * V / ||V||_row
            magnitude = parts["lora_magnitude_vector"]  # (out,)
            weight = weight * (magnitude / weight.norm(p=2, dim=1))[:, None]  # (out, in)
            kind = "DoRA"
    return weight, kind


def _merge_gradnorm(weight, parts, alpha: float) -> torch.Tensor:
    i, j, magnitude = parts["lora_I"], parts["lora_J"], parts["magnitude"]  # (out, r), (r, in), (out,)
    direction = weight + (alpha / i.shape[1]) * (i @ j)  # (out, in)
    return direction * (magnitude / _row_norm(direction))[:, None]  # (out, in)


def read_init_source(source, transposed: frozenset[str] = frozenset()) -> InitSource:
    """Read a run folder (its latest checkpoint), a checkpoint folder or a model folder into an ``InitSource``.
    ``transposed``: layers storing their weight as (in, out) (GPT-2 ``Conv1D``; peft's ``fan_in_fan_out``)."""
    path = Path(source)
    if not path.exists():
        raise ValueError(f"--init-from {str(path)!r} does not exist; pass a run folder or a checkpoint folder")
    tensors, where = read_tensors(path)
    run_config = _run_config(path)
    # the alphas the source trained with (its saved flat options over the method configs' defaults)
    saved_options = MethodOptions.from_flat(run_config.get("options", {}))
    method = f"{run_config['method']} run" if run_config else "saved model"
    plain: dict[str, torch.Tensor] = {}
    velora: dict[str, dict[str, torch.Tensor]] = {}
    lora: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    gradnorm: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stripped = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        layer, tensor, adapter = _split_key(stripped)
        if tensor in VELORA_BUFFERS:
            velora.setdefault(layer, {})[tensor] = value
        elif adapter is not None:
            lora.setdefault(layer, {}).setdefault(adapter, {})[tensor] = value
        elif tensor in ("lora_I", "lora_J", "magnitude"):
            gradnorm.setdefault(layer, {})[tensor] = value
        else:
            plain[stripped.replace(".base_layer.", ".")] = value
    if any(key.endswith((".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4")) for key in plain):
        raise ValueError(f"--init-from {where} holds 4-bit quantised weights (a qlora run); start from a run whose "
                         "base weights are not quantised")
    merged: dict[str, int] = {}
    for layer, factors in lora.items():
        alpha = float(saved_options.lora.alpha)
        weight = plain[f"{layer}.weight"]
        flip = layer in transposed  # merge in (out, in), store back as (in, out)
        merged_weight, kind = _merge_lora(weight.t() if flip else weight, factors, alpha)
        plain[f"{layer}.weight"] = merged_weight.t().contiguous() if flip else merged_weight
        merged[kind] = merged.get(kind, 0) + 1
    for layer, parts in list(gradnorm.items()):
        if "lora_I" not in parts:  # a parameter that happens to be named 'magnitude': a plain weight
            plain.update({f"{layer}.{tensor}": value for tensor, value in gradnorm.pop(layer).items()})
    for layer, parts in gradnorm.items():
        alpha = float(saved_options.gradnorm_lorp.alpha)
        plain[f"{layer}.weight"] = _merge_gradnorm(plain[f"{layer}.weight"], parts, alpha)
        merged["GradNormLoRP"] = merged.get("GradNormLoRP", 0) + 1
    return InitSource(path=str(path), method=method, step=_step_of(path), base=plain, velora=velora, merged=merged)


# ---- loading into the target ---------------------------------------------------------------------------------


def _tied(model: nn.Module, missing: list[str], loaded: set[str]) -> list[str]:
    """Missing keys that share storage with a loaded one (tied embeddings): not really missing."""
    state = model.state_dict()
    loaded_pointers = {state[key].data_ptr() for key in loaded if key in state}
    return [key for key in missing if state[key].data_ptr() in loaded_pointers]


def load_init_weights(model: nn.Module, source) -> InitSource:
    """Load the source run's (merged) base weights into the bare ``model`` (before the method prepares it)."""
    transposed = frozenset(name for name, module in model.named_modules() if type(module).__name__ == "Conv1D")
    init = read_init_source(source, transposed)
    state = model.state_dict()
    shared = [key for key in state if key in init.base]
    for key in shared:
        if init.base[key].shape != state[key].shape:
            raise ValueError(f"--init-from {init.path}: {key} has shape {tuple(init.base[key].shape)} there but "
                             f"{tuple(state[key].shape)} in this model; use the --model the source run trained")
    missing = sorted(set(state) - set(shared))
    missing = sorted(set(missing) - set(_tied(model, missing, set(shared))))
    if missing:
        raise ValueError(f"--init-from {init.path} has no weights for {missing[:3]} (+{max(len(missing) - 3, 0)} "
                         "more); it was trained on another --model")
    model.load_state_dict({key: init.base[key] for key in shared}, strict=False)
    init.loaded = len(shared)
    init.unused = sorted(set(init.base) - set(shared))
    return init


def _base_layer_name(name: str) -> str:
    name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    return name.rsplit(".lora_A", 1)[0] if ".lora_A." in name else name


def restore_init_velora(model: nn.Module, init: InitSource) -> str:
    """After the target method prepared ``model``: restore v where the target wraps the same layer with the same
    shape; returns the one-line summary of what was taken from the source and what was left."""
    from velora.core.layers import velora_modules

    targets = velora_modules(model)
    restored = 0
    for name, layer in targets.items():
        buffers = init.velora.get(_base_layer_name(name), {})
        saved_v = buffers.get("velora_v")
        if saved_v is not None and saved_v.shape == layer.velora_v.shape and \
                ("velora_running_mean" in buffers or "velora_running_mean" not in layer._buffers):
            _restore_layer(name, layer, buffers, init.path, counter=False)  # re-estimates count anew, as steps do
            restored += 1
    merged = ", ".join(f"{count} with {kind} merged" for kind, count in sorted(init.merged.items()))
    took = f"{init.loaded} base tensors" + (f" ({merged})" if merged else "")
    if init.velora or targets:
        took += f", v of {restored}/{len(targets)} VeLoRA layers"
    left = ["the optimizer state", "the step count"]
    if len(init.velora) > restored:
        left.append(f"v of {len(init.velora) - restored} layers (not wrapped alike here)")
    if init.unused:
        left.append(f"{len(init.unused)} tensors this model does not have ({', '.join(init.unused[:2])}...)")
    step = f", step {init.step}" if init.step is not None else ""
    return f"--init-from {init.path} ({init.method}{step}): took {took}; left {', '.join(left)}"
