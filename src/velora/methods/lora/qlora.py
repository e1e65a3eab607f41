"""QLoRA preparation with bitsandbytes: the frozen base linears become NF4 ``Linear4bit`` layers (double
quantisation), then peft puts its own bnb LoRA layers on them (``registry``'s ``qlora`` method).

bitsandbytes >= 0.50 runs NF4 forward and backward on the CPU as well as on CUDA, so the same path trains
and is tested here. The layers are quantised on the device their weights already live on.

Checkpoints: a ``Linear4bit``'s state dict holds the packed weight plus its quantisation statistics
(``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.*``), which bitsandbytes
writes but does not read back into a layer that is already quantised. ``quantize_base_linears`` registers a
load hook on every layer it makes that rebuilds the weight from those entries, so a saved model loads
bitwise with a strict ``load_state_dict`` / ``safetensors.torch.load_model``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from velora.core.lora_fused import keep_4bit_training_layout

COMPUTE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INSTALL_HINT = 'pip install -e ".[qlora]" (or pip install "bitsandbytes>=0.50")'


def require_bitsandbytes():
    """The bitsandbytes module, or a one-line error saying what to install."""
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError(f"method 'qlora' needs bitsandbytes >= 0.50, which is not installed; {INSTALL_HINT}") \
            from None
    return bitsandbytes


def parse_compute_dtype(name: str, weight_dtype: torch.dtype) -> torch.dtype:
    """``auto`` -> the model's own weight dtype (float32 on a CPU run, bfloat16 with ``--dtype bfloat16``)."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"qlora_compute_dtype={name!r} is unknown; choose one of {list(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name] or weight_dtype


def _output_layer_ids(model: nn.Module) -> set[int]:
    """The LM head / classifier stays in full precision, as in QLoRA."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if get_output is not None else None
    return {id(head)} if head is not None else set()


def _to_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    bnb = require_bitsandbytes()
    device = linear.weight.device
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
    # Params4bit quantises when it is moved to a real device: (O, D) float -> (O·D/2, 1) uint8 + statistics
    weight = linear.weight.detach().to("cpu" if device.type == "meta" else device)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype).clone(), requires_grad=False)
    layer = layer.to(weight.device)
    keep_4bit_training_layout(layer)  # an evaluation must not repack (and round) the frozen base in place
    layer._register_load_state_dict_pre_hook(_load_quantized_weight, with_module=True)
    return layer


def _load_quantized_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Rebuild a Linear4bit's packed weight and statistics from a saved state dict (bitsandbytes only
    saves them). Consumes the statistics keys so a strict load sees no unexpected key."""
    bnb = require_bitsandbytes()
    stats_prefix = prefix + "weight."
    stats = {key[len(stats_prefix):]: state_dict.pop(key) for key in list(state_dict)
             if key.startswith(stats_prefix)}
    packed = state_dict.get(prefix + "weight")
    if not stats or packed is None:
        return  # nothing quantised to restore: the default loader reports what is missing
    device = module.weight.device
    module.weight = bnb.nn.Params4bit.from_prequantized(packed, stats, requires_grad=False, device=device,
                                                        module=module)
    # the packed weight stays in state_dict: the default loader then copies it onto itself and counts it loaded


def quantize_base_linears(model: nn.Module, compute_dtype: str = "auto") -> int:
    """Replace every ``nn.Linear`` of ``model`` except its output head by an NF4 ``Linear4bit`` (double
    quantisation, ``compute_dtype`` as given or the weight's own). Marks the model as loaded in 4 bit, which
    is how peft picks its bnb LoRA layers. Returns how many layers were quantised."""
    require_bitsandbytes()
    skip = _output_layer_ids(model)
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or id(child) in skip:
                continue
            dtype = parse_compute_dtype(compute_dtype, child.weight.dtype)
            setattr(parent, child_name, _to_linear4bit(child, dtype))
            count += 1
    if count == 0:
        raise ValueError(f"qlora found no nn.Linear to quantise in {type(model).__name__}; "
                         "use a transformers model with linear attention/MLP layers")
    model.is_loaded_in_4bit = True  # peft's signal to wrap Linear4bit with its bnb LoRA layer
    return count


def linear4bit_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes a quantised layer keeps on its device: ``weights`` (packed 4-bit codes, 8-bit absmax and the
    fp32 double-quantisation scales, what scales with O·D) and ``tables`` (the NF4 and absmax code books and
    the offset, a fixed ~1.1 KB per layer)."""
    state = module.weight.quant_state

    def nbytes(tensor) -> int:
        return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0

    weights = nbytes(module.weight) + nbytes(state.absmax)
    tables = nbytes(state.code)
    if state.nested:
        weights += nbytes(state.state2.absmax)
        tables += nbytes(state.state2.code) + nbytes(state.offset)
    return {"weights": weights, "tables": tables}
