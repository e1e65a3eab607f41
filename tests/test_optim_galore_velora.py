"""GaLore on VeLoRA-wrapped layers (``galore+velora``): a VeLoRA weight gradient is (Gᵀz) ⊗ v per M-chunk, so
its rows lie in span(v) per chunk (rank <= ceil(D/M)·r). The registry projects that side on at most that many
singular vectors; the cumulative update then stays in span(v) per chunk (reference: the projection on v)."""

from __future__ import annotations

import pytest
import torch

from velora.core.layers import velora_modules
from velora.methods.registry import MethodOptions, build_optimizer, prepare_model
from velora.training.models import build_config, build_model

torch.set_num_threads(1)


def _outside_span_v(delta: torch.Tensor, v: torch.Tensor, size: int) -> float:
    """Fraction of ||delta||² outside span(v) within each M-chunk of each row."""
    chunks = delta.double().view(delta.shape[0], -1, size)  # (O, D/M, M)
    inside = (chunks @ v.double()) @ v.double().T  # (O, D/M, M): v has orthonormal columns
    return float((chunks - inside).norm() ** 2 / chunks.norm() ** 2)


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":  # nn.Linear (O, D): VeLoRA on v_proj and down_proj
        return build_model(build_config("llama-tiny", vocab_size=256))
    transformers = pytest.importorskip("transformers")  # GPT-2 Conv1D (D, O): VeLoRA on mlp.c_proj
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=256, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _train_galore_velora(steps: int, kind: str = "llama"):
    options = MethodOptions.from_flat({"lr": 3e-3, "update_proj_gap": 3})
    model = prepare_model(_model(kind), "galore+velora", options)
    optimizer = build_optimizer(model, "galore+velora", options)
    layers = velora_modules(model)
    start = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, 256, (4, 64), generator=generator)  # (B, T)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, layers, start


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cumulative_update_of_velora_layers_stays_in_span_v_per_chunk(kind):
    model, optimizer, layers, start = _train_galore_velora(steps=7, kind=kind)  # projector refreshed at 0, 3, 6
    assert layers
    for name, layer in layers.items():
        delta = layer.weight.detach() - start[name]  # (O, D) for Linear, (D, O) for Conv1D
        delta = delta.T if kind == "gpt2" else delta  # (O, D)
        assert delta.norm() > 0, name
        outside = _outside_span_v(delta, layer.velora_v, layer.velora_sub_token_size)
        assert outside < 1e-8, (name, outside)


def test_velora_weights_get_their_gradients_side_and_rank():
    from velora.methods.galore.method import velora_gradient_subspaces

    model, optimizer, layers, _ = _train_galore_velora(steps=1)
    subspaces = velora_gradient_subspaces(model)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for name, layer in layers.items():
        out_features, in_features = layer.weight.shape
        possible = -(-in_features // layer.velora_sub_token_size) * layer.velora_config.rank
        assert subspaces[id(layer.weight)] == (min(possible, out_features), "right"), name
        group = group_of[id(layer.weight)]
        assert group["proj_type"] == "right" and group["rank"] <= possible, name
        projector = optimizer.state[layer.weight]["projector"]  # (D, rank): every column is in span(v) per chunk
        assert _outside_span_v(projector.T, layer.velora_v, layer.velora_sub_token_size) < 1e-10, name
    # unwrapped projected weights keep GaLore's default: a quarter of the smaller side, "std"
    plain = [p for p in model.parameters()
             if id(p) in group_of and id(p) not in subspaces and group_of[id(p)]["rank"] is not None]
    assert plain and all(group_of[id(p)]["proj_type"] == "std" and group_of[id(p)]["rank"] == min(p.shape) // 4
                         for p in plain)
