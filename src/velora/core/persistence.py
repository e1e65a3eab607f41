"""VeLoRA's v from any saved form: ``load_velora_state(model, source)``.

v and its "initialised" flag are buffers of the wrapped layers (``velora_v`` (M, r) or (G, M, r) per group,
``velora_initialised``, ``velora_running_mean`` for ``init="ema"``, the ``velora_step`` counter for
``reestimate_every``), so they are written by every save path: ``save_pretrained`` of a
transformers model, peft's adapter ``save_pretrained`` (it keeps every key under ``lora_``), safetensors
``save_model`` (our run checkpoints) and ``state_dict()``. What does not restore them is ``from_pretrained``:
the fresh model has no VeLoRA layers yet, so transformers reports the keys as unexpected and peft drops them.
``load_velora_state`` is the one way back, after ``apply_velora`` with the same layout.

So that a reloaded model does not quietly start a new v:

- ``apply_velora`` on a model that ``from_pretrained`` loaded from a folder holding VeLoRA state marks its
  layers (``flag_saved_state``): if a training forward is about to initialise v there, it warns, naming the
  folder and the call that restores it;
- ``require_velora_state(model)`` turns that into an error for every layer whose v is not loaded yet: call it
  when you mean to resume, and a forgotten or failed restore stops the first batch instead of training on.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_velora_state", "read_tensors", "require_velora_state", "flag_saved_state", "VELORA_BUFFERS"]

VELORA_BUFFERS = ("velora_v", "velora_initialised", "velora_running_mean", "velora_step")
PEFT_PREFIX = "base_model.model."
# files a folder may hold its weights in, in the order they are tried
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# ---- reading tensors from any saved form ------------------------------------------------------------


def _is_velora_key(key: str) -> bool:
    return key.rpartition(".")[2] in VELORA_BUFFERS


def _weights_file(folder: Path) -> Path | None:
    """The weights file of a peft adapter folder, a transformers model folder, a run or a checkpoint folder."""
    if (folder / "checkpoints" / "latest").exists():  # a velora run folder: its latest checkpoint
        folder = folder / "checkpoints" / (folder / "checkpoints" / "latest").read_text().strip()
    for name in ADAPTER_FILES + MODEL_FILES:
        if (folder / name).exists():
            return folder / name
    return None


def _read_file(path: Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    if path.name.endswith(".index.json"):  # sharded: open only the shards holding wanted keys
        weight_map = json.loads(path.read_text())["weight_map"]
        shards = sorted({shard for key, shard in weight_map.items() if keep(key)})
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(_read_file(path.parent / shard, keep))
        return out
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys() if keep(key)}
        except (SafetensorError, OSError) as err:  # truncated / foreign file: name it, no raw traceback
            if isinstance(err, FileNotFoundError):
                raise
            raise ValueError(f"{path} is truncated or corrupt ({str(err).splitlines()[0][:120]}); "
                             "pass an earlier checkpoint folder (checkpoints/step-*) or re-save the model") from None
    if path.suffix in (".bin", ".pt", ".pth"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict of tensors")
        return {key: value for key, value in state.items() if keep(key)}
    raise ValueError(f"{str(path)!r} is not a .safetensors, .bin or .pt weights file")


def read_tensors(source, keep: Callable[[str], bool] = lambda key: True) -> tuple[dict[str, torch.Tensor], str]:
    """``(tensors whose key passes keep, the file they came from)`` for a state dict, a weights file
    (.safetensors / .bin / .pt / sharded index), or a folder: a peft adapter, a transformers model
    (``save_pretrained``), a velora run (its latest checkpoint) or checkpoint folder."""
    if isinstance(source, Mapping):
        return {key: value for key, value in source.items() if keep(key)}, "the given state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be a folder, a weights file or a state dict, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        found = _weights_file(path)
        if found is None:
            raise ValueError(f"{str(path)!r} holds none of {ADAPTER_FILES + MODEL_FILES}; pass a save_pretrained "
                             "folder, a peft adapter folder, a run folder or a weights file")
        path = found
    elif not path.exists():
        raise ValueError(f"{str(path)!r} does not exist; pass a save_pretrained folder, a weights file or a state dict")
    return _read_file(path, keep), str(path)


# ---- matching saved layers to the model's wrapped layers ---------------------------------------------


def _strip_wrappers(name: str) -> str:
    """A layer name without peft's ``base_model.model.`` and DDP's ``module.`` prefixes."""
    changed = True
    while changed:
        changed = False
        for prefix in (PEFT_PREFIX, "module."):
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def _adapter_of(name: str) -> str | None:
    """'...q_proj.lora_A.default' -> 'default' (None for a layer outside peft's lora_A)."""
    head, _, adapter = name.rpartition(".")
    return adapter if head.endswith(".lora_A") or head == "lora_A" else None


def _saved_layers(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Saved layer name (wrappers stripped) -> {buffer name: tensor}."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        layer, _, buffer = key.rpartition(".")
        layers.setdefault(_strip_wrappers(layer), {})[buffer] = value
    return layers


def _find_saved(name: str, saved: dict[str, dict]) -> str | None:
    """The saved layer holding ``name``'s buffers: same name, the name without its adapter (peft adapter
    files drop it), or the one saved name that ends with it (or it with the saved name) on a dot boundary."""
    plain = _strip_wrappers(name)
    candidates = [plain]
    if _adapter_of(plain) is not None:
        candidates.append(plain.rpartition(".")[0])
    for candidate in candidates:
        if candidate in saved:
            return candidate
    suffixes = [key for key in saved for candidate in candidates
                if key.endswith("." + candidate) or candidate.endswith("." + key)]
    return suffixes[0] if len(set(suffixes)) == 1 else None


def _target_layers(model: nn.Module, adapter_name: str | None) -> dict[str, nn.Module]:
    from velora.core.layers import velora_modules

    layers = velora_modules(model)
    if not layers:
        raise ValueError("the model has no VeLoRA layers; call apply_velora(model, config) with the config it was "
                         "saved with, then load_velora_state")
    if adapter_name is None:
        return layers
    chosen = {name: m for name, m in layers.items() if _adapter_of(name) == adapter_name}
    if not chosen:
        adapters = sorted({a for a in map(_adapter_of, layers) if a is not None})
        raise ValueError(f"adapter_name={adapter_name!r} has no VeLoRA layers; adapters with VeLoRA: {adapters}")
    return chosen


def _check_adapter_free_is_unambiguous(layers: dict[str, nn.Module], saved: dict[str, dict],
                                       adapter_name: str | None, where: str) -> None:
    adapters = sorted({a for a in map(_adapter_of, layers) if a is not None})
    adapter_free = any(_adapter_of(key) is None and key.endswith(".lora_A") for key in saved)
    if adapter_name is None and adapter_free and len(adapters) > 1:
        raise ValueError(f"{where} is a peft adapter file (no adapter names in its keys) and the model has VeLoRA on "
                         f"adapters {adapters}; pass adapter_name= the adapter it was saved from")


# ---- restoring -------------------------------------------------------------------------------------------


def _restore_layer(name: str, layer: nn.Module, buffers: dict[str, torch.Tensor], where: str) -> None:
    for buffer in ("velora_v", "velora_initialised"):
        if buffer not in buffers:
            raise ValueError(f"{where} holds no {buffer} for {name!r} (only {sorted(buffers)}); the file is incomplete")
    needs_running_mean = "velora_running_mean" in layer._buffers
    if needs_running_mean and "velora_running_mean" not in buffers:
        raise ValueError(f"{name!r} uses init='ema' but {where} holds no velora_running_mean for it; apply_velora "
                         "with the config the model was saved with")
    if "velora_step" in layer._buffers and "velora_step" not in buffers:
        raise ValueError(f"{name!r} re-estimates v (reestimate_every) but {where} holds no velora_step for it, so "
                         "the next re-estimate would fall elsewhere; apply_velora with the config it was saved with")
    for buffer in VELORA_BUFFERS:
        if buffer not in layer._buffers or buffer not in buffers:
            continue
        current, saved = layer._buffers[buffer], buffers[buffer]
        if current.shape != saved.shape:
            raise ValueError(f"{buffer} of {name!r} has shape {tuple(saved.shape)} in {where} but "
                             f"{tuple(current.shape)} here; apply_velora with the sub_token_size/rank/"
                             "per_group_directions it was saved with")
        setattr(layer, buffer, saved.to(device=current.device, dtype=current.dtype).clone())  # (M, r) / () / (M,)
    layer._velora_ready = bool(layer.velora_initialised)
    layer._velora_checked = False  # validate v and read the re-estimate counter at the next training forward
    layer.__dict__.pop("_velora_expected_state", None)


def load_velora_state(model: nn.Module, source, adapter_name: str | None = None, strict: bool = True) -> nn.Module:
    """Restore v (and its "initialised" flag, and the EMA running mean) of every VeLoRA layer of ``model``.

    ``source``: a ``save_pretrained`` folder of a transformers model (``model.safetensors``, sharded or
    ``pytorch_model.bin``), a peft adapter folder (``adapter_model.safetensors``), a velora run / checkpoint
    folder, a weights file, or a state dict. Call it after ``apply_velora`` with the config the model was
    saved with. peft adapter files drop the adapter name from their keys: with VeLoRA on several adapters,
    pass ``adapter_name`` to say which one the file belongs to (only that adapter's layers are filled).
    Layer names are matched after removing peft's ``base_model.model.`` and DDP's ``module.`` prefixes, so a
    plain model's state loads into its peft wrapper and back. ``strict`` (default): every targeted VeLoRA layer
    must be found, and without ``adapter_name`` every saved layer must be used. Returns ``model``.
    """
    layers = _target_layers(model, adapter_name)
    tensors, where = read_tensors(source, _is_velora_key)
    if not tensors:
        raise ValueError(f"{where} holds no VeLoRA buffers (no '*.velora_v' keys): it was saved without VeLoRA "
                         "applied or after remove_velora, so there is no v to restore")
    saved = _saved_layers(tensors)
    _check_adapter_free_is_unambiguous(layers, saved, adapter_name, where)
    matches = {name: _find_saved(name, saved) for name in layers}
    missing = [name for name, key in matches.items() if key is None]
    unused = sorted(set(saved) - set(matches.values())) if adapter_name is None else []
    if strict and missing:
        raise ValueError(f"{where} holds no VeLoRA state for {missing[:3]} (+{max(len(missing) - 3, 0)} more); it "
                         "was saved with other target_modules, or pass strict=False to restore the layers it has")
    if strict and unused:
        raise ValueError(f"{where} holds VeLoRA state for layers this model does not wrap: {unused[:3]} "
                         f"(+{max(len(unused) - 3, 0)} more); apply_velora with the target_modules it was saved with")
    for name, key in matches.items():
        if key is not None:
            _restore_layer(name, layers[name], saved[key], where)
    return model


# ---- not silently starting a new v ---------------------------------------------------------------------


def require_velora_state(model: nn.Module, required: bool = True) -> nn.Module:
    """Make a training forward that would initialise v on any VeLoRA layer of ``model`` whose v is not loaded
    an error (``required=False`` undoes it, and drops the warning of ``flag_saved_state``). Call it after
    ``apply_velora`` when resuming: a model reloaded without its v then stops at the first batch instead of
    training on a new v. ``load_velora_state`` and loading a state dict with v clear it layer by layer."""
    from velora.core.layers import velora_modules

    layers = velora_modules(model)
    if not layers:
        raise ValueError("require_velora_state: the model has no VeLoRA layers; call apply_velora first")
    for layer in layers.values():
        if not required:
            layer.__dict__.pop("_velora_expected_state", None)
        elif not layer._velora_ready:
            source = (layer.__dict__.get("_velora_expected_state") or {}).get("source")
            layer._velora_expected_state = {"source": source, "error": True}
    return model


def flag_saved_state(model: nn.Module) -> None:
    """Called by ``apply_velora``: when ``model`` was loaded by ``from_pretrained`` from a local folder whose
    weights hold VeLoRA state, mark the layers it has v for, so initialising them from a batch warns."""
    from velora.core.layers import velora_modules

    folder = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not folder or not isinstance(folder, str) or not Path(folder).is_dir():
        return
    weights = _weights_file(Path(folder))
    if weights is None or not weights.name.startswith("model.safetensors"):
        return  # only safetensors: its header lists the keys without reading the weights (a .bin is one pickle)
    try:
        tensors, _ = read_tensors(weights, lambda key: key.endswith(".velora_v"))
    except (ValueError, OSError):
        return  # unreadable: nothing to compare with, and apply_velora must not fail over a warning
    saved = _saved_layers(tensors)
    for name, layer in velora_modules(model).items():
        if not layer._velora_ready and _find_saved(name, saved) is not None:
            layer.__dict__.setdefault("_velora_expected_state", {"source": folder, "error": False})


def refuse_fresh_init(layer: nn.Module) -> None:
    """Called by a VeLoRA layer about to initialise v from a batch while its saved v was expected."""
    expected = layer.__dict__.pop("_velora_expected_state", None)
    if expected is None:
        return
    source = expected["source"]
    restore = f"velora.load_velora_state(model, {source!r})" if source else "velora.load_velora_state(model, source)"
    message = (f"VeLoRA is about to initialise v of {layer._velora_name!r} from this batch, but "
               f"{'its saved v was required' if expected['error'] else f'{source} holds its saved v'}; call {restore} "
               "after apply_velora to continue with the saved v (or require_velora_state(model, False) to start anew)")
    if expected["error"]:
        layer._velora_expected_state = expected  # keep refusing until it is restored or released
        raise ValueError(message)
    warnings.warn(message, stacklevel=4)
