"""The control row of issue 17: the layers VeLoRA compresses, frozen instead (DESIGN.md: "a tie proves little").

A VeLoRA row that ties its reference only shows that the compressed updates were good if freezing those same layers
(no update at all, everything else the same) does worse. ``freeze_compressed_layers`` is an ``on_model_ready`` hook
for ``train``: it sets ``requires_grad=False`` on every parameter of every layer VeLoRA wrapped (a full weight, or a
LoRA-A adapter in adapter mode). A frozen layer runs as its plain class (``VeLoRAMixin._velora_active``), so the
control keeps that layer's input like the reference does, and its weights stay bitwise as loaded.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from velora.core.layers import velora_modules


def freeze_compressed_layers(model: nn.Module) -> list[str]:
    """Freeze the parameters of every VeLoRA-wrapped layer of ``model``; returns their qualified names."""
    layers = velora_modules(model)
    if not layers:
        raise ValueError("freeze_compressed_layers: the model has no VeLoRA layers; run the control with the "
                         "+velora method of the row it controls")
    for layer in layers.values():
        for parameter in layer.parameters(recurse=False):
            parameter.requires_grad_(False)
    return list(layers)


def train_only_compressed_layers(model: nn.Module) -> list[str]:
    """The opposite setting: freeze every parameter *outside* the VeLoRA-wrapped layers, so every update the model
    gets comes through a compressed weight gradient (the frozen control then trains nothing). Returns the names of
    the parameters left trainable."""
    layers = velora_modules(model)
    if not layers:
        raise ValueError("train_only_compressed_layers: the model has no VeLoRA layers; use a +velora method")
    kept = {id(p) for layer in layers.values() for p in layer.parameters(recurse=False)}
    trainable = []
    for name, parameter in model.named_parameters():
        if id(parameter) in kept and parameter.requires_grad:
            trainable.append(name)
        else:
            parameter.requires_grad_(False)
    return trainable


def check_lr_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < float("inf"):
        raise ValueError(f"compressed lr scale {scale!r} must be a finite number >= 0 (1 = the run's lr)")


def scale_compressed_lr(model: nn.Module, optimizer, scale: float) -> list[str]:
    """Give the parameters of every VeLoRA-wrapped layer ``scale`` times the lr of the group they are in (an
    ``on_optimizer_ready`` hook for ``train``, before any step or restore): each param group is split in two, the
    compressed layers' half carrying ``lr`` and ``initial_lr`` times ``scale``, every other setting the group's, so
    the schedule keeps the ratio. Returns the qualified names of the rescaled parameters."""
    check_lr_scale(scale)
    layers = velora_modules(model)
    if not layers:
        raise ValueError("scale_compressed_lr: the model has no VeLoRA layers; use a +velora method")
    if optimizer.state:
        raise ValueError("scale_compressed_lr splits param groups: call it before the first step and before a "
                         "checkpoint is restored (train's on_optimizer_ready)")
    names = {id(p): f"{layer_name}.{name}" for layer_name, layer in layers.items()
             for name, p in layer.named_parameters(recurse=False)}
    groups, scaled = [], []
    for group in optimizer.param_groups:
        settings = {key: value for key, value in group.items() if key != "params"}
        inside = [p for p in group["params"] if id(p) in names]
        outside = [p for p in group["params"] if id(p) not in names]
        if outside:
            groups.append({**settings, "params": outside})
        if inside:
            lrs = {key: settings[key] * scale for key in ("lr", "initial_lr") if key in settings}
            groups.append({**settings, **lrs, "params": inside})
            scaled += [names[id(p)] for p in inside]
    if not scaled:
        raise ValueError("scale_compressed_lr: no VeLoRA-wrapped parameter is in the optimizer (frozen layers?)")
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)
    return scaled


def frozen_control(base, steps: int, label: str = "v+down frozen (control)", columns: dict | None = None,
                   targets: Any = "paper", **changes):
    """The fine-tuning benches' control Variant: their LoRA + VeLoRA config (M = D/32 on ``targets``) with the
    compressed LoRA-A weights frozen. Shared by `bench layers`, `init`, `subtoken` (one setting, one number)."""
    from velora.experiments import ablation

    velora = {"num_groups": 32, "pad": True, "target_modules": targets}
    config = ablation.finetune_config(base, "lora+velora", velora, steps=steps, **changes)
    return ablation.Variant(label, config, columns or {}, on_model_ready=freeze_compressed_layers)


def recovered_share(velora_ppl: float, control_ppl: float, reference_ppl: float) -> float | None:
    """Share of what exact training of the compressed layers gains over freezing them that VeLoRA keeps:
    1 = as good as exact, 0 = no better than frozen. None when freezing costs nothing (nothing to recover)."""
    gain = control_ppl - reference_ppl
    if abs(gain) < 1e-9 * max(1.0, abs(reference_ppl)):
        return None
    return (control_ppl - velora_ppl) / gain


def control_sentence(velora: dict[str, Any], control: dict[str, Any], reference: dict[str, Any],
                     reference_name: str) -> str:
    """One sentence reading a VeLoRA row against its frozen control and its uncompressed reference."""
    def gap(row):
        return 100 * (row["val_ppl"] / reference["val_ppl"] - 1)

    share = recovered_share(velora["val_ppl"], control["val_ppl"], reference["val_ppl"])
    text = (f"Control ({control['label']}): ppl {control['val_ppl']:.2f} ({gap(control):+.2f}% vs {reference_name}), "
            f"VeLoRA ({velora['label']}) {velora['val_ppl']:.2f} ({gap(velora):+.2f}%). ")
    if share is None:
        return text + "Freezing those layers costs nothing here, so VeLoRA's tie says nothing about its updates."
    if control["val_ppl"] < reference["val_ppl"]:
        return text + ("Freezing those layers does better than training them exactly here, so this setting cannot "
                       "tell good compressed updates from none.")
    return text + (f"VeLoRA keeps {100 * share:.0f}% of what training those layers exactly gains over freezing "
                   "them (100% = as good as exact, 0% = no better than frozen).")
