"""The "paper" target preset (value + MLP down projections) on the real module trees of the installed
transformers: a tiny random-init model of every family the docs name, and exactly which layers get wrapped."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from velora import VeLoRAConfig, apply_velora, velora_modules  # noqa: E402

torch.set_num_threads(1)

HIDDEN, FFN, VOCAB = 32, 64, 64
DECODER = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=2, num_key_value_heads=2,
               num_hidden_layers=2, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ENCODER = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=2, num_hidden_layers=2,
               vocab_size=VOCAB, pad_token_id=0)


def _layers(template: str, layers: int = 2) -> set[str]:
    return {template.format(i=i) for i in range(layers)}


def _decoder(prefix: str, value: str | None, down: str) -> set[str]:
    names = _layers(f"{prefix}.{{i}}.{down}")
    return names | (_layers(f"{prefix}.{{i}}.{value}") if value else set())


# family -> (model class, config, the layers the preset must wrap: value + MLP down projection)
FAMILIES = {
    "llama": ("LlamaForCausalLM", lambda: transformers.LlamaConfig(**DECODER),
              _decoder("model.layers", "self_attn.v_proj", "mlp.down_proj")),
    "mistral": ("MistralForCausalLM", lambda: transformers.MistralConfig(**DECODER),
                _decoder("model.layers", "self_attn.v_proj", "mlp.down_proj")),
    "qwen2": ("Qwen2ForCausalLM", lambda: transformers.Qwen2Config(**DECODER),
              _decoder("model.layers", "self_attn.v_proj", "mlp.down_proj")),
    "gemma": ("GemmaForCausalLM", lambda: transformers.GemmaConfig(**DECODER, head_dim=16),
              _decoder("model.layers", "self_attn.v_proj", "mlp.down_proj")),
    # q, k, v fused into qkv_proj: the down projection only
    "phi3": ("Phi3ForCausalLM", lambda: transformers.Phi3Config(**DECODER),
             _decoder("model.layers", None, "mlp.down_proj")),
    "opt": ("OPTForCausalLM", lambda: transformers.OPTConfig(
        hidden_size=HIDDEN, ffn_dim=FFN, num_attention_heads=2, num_hidden_layers=2, vocab_size=VOCAB,
        word_embed_proj_dim=HIDDEN, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        _decoder("model.decoder.layers", "self_attn.v_proj", "fc2")),
    # q, k, v fused into the c_attn Conv1D: the down projection only
    "gpt2": ("GPT2LMHeadModel", lambda: transformers.GPT2Config(
        n_embd=HIDDEN, n_layer=2, n_head=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
        _decoder("transformer.h", None, "mlp.c_proj")),
    # q, k, v fused into query_key_value: the down projection only
    "gpt_neox": ("GPTNeoXForCausalLM", lambda: transformers.GPTNeoXConfig(**DECODER),
                 _decoder("gpt_neox.layers", None, "mlp.dense_4h_to_h")),
    "bert": ("BertForSequenceClassification", lambda: transformers.BertConfig(**ENCODER),
             _decoder("bert.encoder.layer", "attention.self.value", "output.dense")),
    "roberta": ("RobertaForSequenceClassification", lambda: transformers.RobertaConfig(**ENCODER),
                _decoder("roberta.encoder.layer", "attention.self.value", "output.dense")),
    "vit": ("ViTForImageClassification", lambda: transformers.ViTConfig(
        hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=2, num_hidden_layers=2, image_size=32,
        patch_size=16, num_labels=3), None),  # expected set depends on the transformers major version, below
    "t5": ("T5ForConditionalGeneration", lambda: transformers.T5Config(
        d_model=HIDDEN, d_ff=FFN, num_heads=2, num_layers=2, d_kv=16, vocab_size=VOCAB, decoder_start_token_id=0),
        _layers("encoder.block.{i}.layer.0.SelfAttention.v") | _layers("encoder.block.{i}.layer.1.DenseReluDense.wo")
        | _layers("decoder.block.{i}.layer.0.SelfAttention.v") | _layers("decoder.block.{i}.layer.1.EncDecAttention.v")
        | _layers("decoder.block.{i}.layer.2.DenseReluDense.wo")),
}


def _vit_expected() -> set[str]:
    if int(transformers.__version__.split(".")[0]) >= 5:
        return _decoder("vit.layers", "attention.v_proj", "mlp.fc2")
    return _decoder("vit.encoder.layer", "attention.attention.value", "output.dense")


def _build(family: str):
    class_name, make_config, expected = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(make_config())
    return model, (_vit_expected() if family == "vit" else expected)


def _inputs(family: str) -> dict[str, torch.Tensor]:
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 2])}
    ids = torch.randint(3, VOCAB, (2, 8))  # (B, T)
    if family in ("bert", "roberta"):
        return {"input_ids": ids, "labels": torch.tensor([0, 1])}
    if family == "t5":
        return {"input_ids": ids, "labels": ids.flip(1)}
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_paper_preset_wraps_exactly_value_and_down_projections(family):
    model, expected = _build(family)
    apply_velora(model, VeLoRAConfig(sub_token_size=16, target_modules="paper"))
    assert set(velora_modules(model)) == expected
    # and the wrapped model trains: every wrapped layer initialises v and its weight gets a gradient
    model.train()
    model(**_inputs(family)).loss.backward()
    for name, module in velora_modules(model).items():
        assert module._velora_ready and module.weight.grad is not None, name


def test_paper_preset_names_no_layer_of_an_unknown_tree_and_says_so():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
    with pytest.raises(ValueError, match=r"target_modules=\['paper'\] matched no layer.*linear layers here include"):
        apply_velora(model, VeLoRAConfig(sub_token_size=16))
