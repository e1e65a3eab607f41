"""v survives every save format: save_pretrained -> from_pretrained -> apply_velora -> load_velora_state restores
it bitwise (plain transformers model, peft adapter with modules_to_save, several adapters, safetensors file,
state dict), the next training batch does not move it, and a model reloaded without its v does not quietly
start a new one."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from velora import (  # noqa: E402
    VeLoRAConfig,
    apply_velora,
    load_velora_state,
    remove_velora,
    require_velora_state,
    velora_modules,
)
from velora.core.layers import load_peft_velora_state  # noqa: E402

torch.set_num_threads(1)

VOCAB, SEQ = 64, 8
CONFIG = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
              num_hidden_layers=2, vocab_size=VOCAB, pad_token_id=0, num_labels=3)
# peft's ZeRO-3 shard check flags the 0-d velora_initialised under lora_A; the file is complete (docs/velora.md)
PEFT_SHAPE_WARNING = ".*LoRA tensor\\(s\\) have invalid shape"


def velora_config(**overrides) -> VeLoRAConfig:
    return VeLoRAConfig(**{"sub_token_size": 16, "target_modules": "paper", **overrides})


def causal_lm(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))


def classifier(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**CONFIG))


def batch(offset: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(offset))  # (B, T)
    return {"input_ids": ids, "labels": ids}


def class_batch(offset: int) -> dict[str, torch.Tensor]:
    return {"input_ids": batch(offset)["input_ids"], "labels": torch.tensor([0, 2])}


def train_steps(model, make_batch, steps: int, first: int = 0) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(first, first + steps):
        optimizer.zero_grad(set_to_none=True)
        model(**make_batch(step)).loss.backward()
        optimizer.step()


def v_of(model) -> dict[str, torch.Tensor]:
    return {name.removeprefix("base_model.model."): layer.velora_v.clone()
            for name, layer in velora_modules(model).items()}


def assert_same_v(restored, original) -> None:
    expected, got = v_of(original), v_of(restored)
    assert set(got) == set(expected) and expected
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert all(layer._velora_ready and bool(layer.velora_initialised) for layer in velora_modules(restored).values())


def save_peft(model, folder) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_SHAPE_WARNING)
        model.save_pretrained(folder)


# ---- plain transformers model --------------------------------------------------------------------------


def test_plain_model_save_pretrained_reload_restores_v_and_the_next_batch_keeps_it(tmp_path):
    model = apply_velora(causal_lm(), velora_config())
    train_steps(model, batch, 2)
    model.save_pretrained(tmp_path)

    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)  # drops velora_* as unexpected keys
    apply_velora(reloaded, velora_config())
    assert not any(layer._velora_ready for layer in velora_modules(reloaded).values())
    load_velora_state(reloaded, tmp_path)
    assert_same_v(reloaded, model)
    original, restored = model.state_dict(), reloaded.state_dict()
    assert set(original) == set(restored) and all(torch.equal(original[k], restored[k]) for k in original)

    # the next training batch: same gradients bitwise, and v (batch_average_once) does not move
    saved_v = v_of(reloaded)
    for m in (model, reloaded):
        m.train()  # from_pretrained returns the model in eval mode, where VeLoRA is off
        m.zero_grad(set_to_none=True)
        m(**batch(7)).loss.backward()
    expected = dict(model.named_parameters())
    for name, p in reloaded.named_parameters():
        assert torch.equal(p.grad, expected[name].grad), name
    train_steps(reloaded, batch, 1, first=8)
    assert all(torch.equal(v, saved_v[name]) for name, v in v_of(reloaded).items())


def test_safetensors_file_and_state_dict_sources(tmp_path):
    from safetensors.torch import save_model

    model = apply_velora(causal_lm(), velora_config())
    train_steps(model, batch, 1)
    save_model(model, str(tmp_path / "weights.safetensors"))
    for source in (tmp_path / "weights.safetensors", str(tmp_path / "weights.safetensors"), model.state_dict()):
        target = apply_velora(causal_lm(seed=1), velora_config())
        load_velora_state(target, source)
        assert_same_v(target, model)
    # a plain model's state loads into its peft wrapper (prefixes base_model.model. differ)
    wrapped = get_peft_model(causal_lm(seed=1), LoraConfig(r=4, target_modules=["q_proj"]))
    apply_velora(wrapped, velora_config(mode="full"))
    load_velora_state(wrapped, model.state_dict())
    assert_same_v(wrapped, model)


def test_ema_running_mean_is_restored(tmp_path):
    model = apply_velora(causal_lm(), velora_config(init="ema"))
    train_steps(model, batch, 2)
    target = apply_velora(causal_lm(seed=1), velora_config(init="ema"))
    load_velora_state(target, model.state_dict())
    for name, layer in velora_modules(model).items():
        other = velora_modules(target)[name]
        assert torch.equal(other.velora_running_mean, layer.velora_running_mean), name
        assert torch.equal(other.velora_v, layer.velora_v), name


# ---- peft adapters -----------------------------------------------------------------------------------------


def _peft_classifier():
    config = LoraConfig(r=4, target_modules=["v_proj", "down_proj", "q_proj"], modules_to_save=["score"],
                        task_type="SEQ_CLS", lora_dropout=0.0)
    return get_peft_model(classifier(), config)


@pytest.mark.parametrize("loader", ["load_velora_state", "load_peft_velora_state"])
def test_peft_adapter_with_modules_to_save_restores_v(tmp_path, loader):
    # load_peft_velora_state raised KeyError('base_model.model.score.weight') here before
    model = apply_velora(_peft_classifier(), velora_config())
    train_steps(model, class_batch, 2)
    save_peft(model, tmp_path)

    reloaded = PeftModel.from_pretrained(classifier(), tmp_path, is_trainable=True)
    apply_velora(reloaded, velora_config())
    (load_velora_state if loader == "load_velora_state" else load_peft_velora_state)(reloaded, str(tmp_path))
    assert_same_v(reloaded, model)
    original, restored = model.state_dict(), reloaded.state_dict()
    assert set(original) == set(restored) and all(torch.equal(original[k], restored[k]) for k in original)
    saved_v = v_of(reloaded)
    train_steps(reloaded, class_batch, 1, first=5)
    assert all(torch.equal(v, saved_v[name]) for name, v in v_of(reloaded).items())


def test_several_adapters_each_get_their_own_v(tmp_path):
    model = get_peft_model(causal_lm(), LoraConfig(r=4, target_modules=["v_proj", "down_proj"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj", "down_proj"]))
    apply_velora(model, velora_config())  # wraps lora_A of both adapters
    for adapter, first in (("default", 0), ("other", 3)):
        model.set_adapter(adapter)
        train_steps(model, batch, 1, first=first)
    v = v_of(model)
    assert not torch.equal(v["model.layers.0.self_attn.v_proj.lora_A.default"],
                           v["model.layers.0.self_attn.v_proj.lora_A.other"])
    save_peft(model, tmp_path)  # 'default' at the root, 'other' in tmp_path/other

    reloaded = PeftModel.from_pretrained(causal_lm(), tmp_path, is_trainable=True)
    reloaded.load_adapter(tmp_path / "other", adapter_name="other", is_trainable=True)
    apply_velora(reloaded, velora_config())
    with pytest.raises(ValueError, match=r"adapters \['default', 'other'\]; pass adapter_name="):
        load_velora_state(reloaded, tmp_path)
    load_velora_state(reloaded, tmp_path, adapter_name="default")
    load_velora_state(reloaded, tmp_path / "other", adapter_name="other")
    assert_same_v(reloaded, model)
    # the whole model's state dict names the adapters: no adapter_name needed
    again = PeftModel.from_pretrained(causal_lm(), tmp_path, is_trainable=True)
    again.load_adapter(tmp_path / "other", adapter_name="other", is_trainable=True)
    load_velora_state(apply_velora(again, velora_config()), model.state_dict())
    assert_same_v(again, model)


# ---- errors ---------------------------------------------------------------------------------------------------


def test_errors_are_one_line_and_name_the_fix(tmp_path):
    plain = causal_lm()
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="holds no VeLoRA buffers") as err:
        load_velora_state(apply_velora(causal_lm(), velora_config()), tmp_path / "plain")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="has no VeLoRA layers; call apply_velora"):
        load_velora_state(causal_lm(), tmp_path / "plain")
    with pytest.raises(ValueError, match="does not exist"):
        load_velora_state(apply_velora(causal_lm(), velora_config()), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds none of"):
        load_velora_state(apply_velora(causal_lm(), velora_config()), tmp_path)

    saved = apply_velora(causal_lm(), velora_config())
    train_steps(saved, batch, 1)
    with pytest.raises(ValueError, match=r"has shape \(16, 1\).*\(32, 1\) here; apply_velora with the sub_token_size"):
        load_velora_state(apply_velora(causal_lm(), velora_config(sub_token_size=32)), saved.state_dict())
    with pytest.raises(ValueError, match="holds no VeLoRA state for .*other target_modules"):
        load_velora_state(apply_velora(causal_lm(), velora_config(target_modules="paper", rank=1)),
                          {k: v for k, v in saved.state_dict().items() if "down_proj" not in k})
    with pytest.raises(ValueError, match="layers this model does not wrap"):
        load_velora_state(apply_velora(causal_lm(), velora_config(target_modules=["v_proj"])), saved.state_dict())
    partial = apply_velora(causal_lm(), velora_config())
    load_velora_state(partial, {k: v for k, v in saved.state_dict().items() if "down_proj" not in k}, strict=False)
    ready = {name: layer._velora_ready for name, layer in velora_modules(partial).items()}
    assert ready == {name: "v_proj" in name for name in ready}


# ---- a reloaded model without its v does not quietly start a new one ------------------------------------------


def test_reload_without_restoring_v_warns_and_require_velora_state_refuses(tmp_path):
    model = apply_velora(causal_lm(), velora_config())
    train_steps(model, batch, 1)
    model.save_pretrained(tmp_path)

    forgot = apply_velora(transformers.LlamaForCausalLM.from_pretrained(tmp_path), velora_config())
    with pytest.warns(UserWarning, match=f"{tmp_path} holds its saved v; call velora.load_velora_state"):
        train_steps(forgot, batch, 1, first=3)

    strict = require_velora_state(apply_velora(transformers.LlamaForCausalLM.from_pretrained(tmp_path),
                                               velora_config()))
    for _ in range(2):  # keeps refusing: no batch trains on a new v
        with pytest.raises(ValueError, match="its saved v was required; call velora.load_velora_state"):
            train_steps(strict, batch, 1)
    assert not any(layer._velora_ready for layer in velora_modules(strict).values())
    load_velora_state(strict, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # restored: no warning, no error, and v stays the saved one
        train_steps(strict, batch, 1, first=3)
    assert_same_v(strict, model)

    fresh = require_velora_state(apply_velora(causal_lm(), velora_config()))
    require_velora_state(fresh, False)  # released: a new v from the first batch, silently, as asked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(fresh, batch, 1)
    assert all(layer._velora_ready for layer in velora_modules(fresh).values())
    remove_velora(fresh)


def test_a_plain_reload_of_a_model_saved_without_velora_does_not_warn(tmp_path):
    causal_lm().save_pretrained(tmp_path)
    model = apply_velora(transformers.LlamaForCausalLM.from_pretrained(tmp_path), velora_config())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, batch, 1)


# ---- HF Trainer: resume_from_checkpoint restores v of a peft model too ------------------------------------------


def test_trainer_resume_restores_v_of_lora_velora(tmp_path):
    """Plain models: tests/test_hf_trainer.py. Here peft: the Trainer reloads the adapter with load_adapter, which
    keeps the lora_A.velora_* keys because VeLoRATrainer applied VeLoRA before the checkpoint is read."""
    from safetensors.torch import load_file

    from velora.integrations.hf import VeLoRATrainer

    ids = torch.randint(1, VOCAB, (16, SEQ), generator=torch.Generator().manual_seed(0))  # (N, T)
    dataset = [{"input_ids": row, "labels": row} for row in ids]

    def trainer(out, steps):
        args = transformers.TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-2, save_steps=2,
            save_strategy="steps", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=1)
        return VeLoRATrainer(model=causal_lm(), args=args, train_dataset=dataset, method="lora+velora",
                             method_options={"lora_rank": 4, "velora": velora_config()})

    first = trainer(tmp_path / "a", steps=2)
    first.train()
    saved = load_file(str(tmp_path / "a" / "checkpoint-2" / "adapter_model.safetensors"))
    resumed = trainer(tmp_path / "b", steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    layers = velora_modules(resumed.model)
    assert len(layers) == 4
    for name, layer in layers.items():
        assert torch.equal(layer.velora_v, saved[name.replace(".lora_A.default", ".lora_A") + ".velora_v"]), name
    assert_same_v(resumed.model, first.model)
