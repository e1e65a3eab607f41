"""HF Trainer: VeLoRA + Flora (+ FLoRA compressed accumulation) on a tiny LLaMA, offline, on the CPU;
checkpoint, resume, and compare bitwise with the uninterrupted run."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Trainer, TrainingArguments  # noqa: E402

from velora import VeLoRAConfig, velora_modules  # noqa: E402
from velora.integrations.hf import ACCUMULATOR_NAME, VeLoRACallback, VeLoRATrainer, trainer_optimizer  # noqa: E402
from velora.training.models import build_config, build_model  # noqa: E402

SEQ, VOCAB = 16, 256
FLORA_OPTIONS = {"flora_rank": 4, "flora_kappa": 3, "flora_accumulation": True, "optimizer": "adamw"}


class TokenDataset(torch.utils.data.Dataset):
    """A fixed random token stream cut into (SEQ,) examples; labels = inputs (causal LM)."""

    def __init__(self, size: int = 24, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (size, SEQ), generator=generator)  # (N, T)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _model():
    torch.manual_seed(0)
    return build_model(build_config("llama-tiny", vocab_size=VOCAB))


def _args(out_dir, max_steps: int, accumulation: int = 2, **extra) -> TrainingArguments:
    settings = dict(output_dir=str(out_dir), per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
                    max_steps=max_steps, learning_rate=3e-3, warmup_steps=1, save_strategy="steps", save_steps=2,
                    logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**settings, **extra})


def _v(model) -> dict[str, torch.Tensor]:
    return {name: layer.velora_v.clone() for name, layer in velora_modules(model).items()}


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer = VeLoRATrainer(model=_model(), args=_args(out, max_steps=4), train_dataset=TokenDataset(),
                            method="flora+velora", method_options=FLORA_OPTIONS)
    trainer.train()
    return out, trainer


def test_trainer_trains_with_velora_flora_and_compressed_accumulation(uninterrupted):
    out, trainer = uninterrupted
    from velora.optim import CompressedGradAccumulator, Flora

    assert isinstance(trainer.optimizer.optimizer, Flora)
    assert isinstance(trainer.velora_accumulator, CompressedGradAccumulator)
    assert trainer.velora_accumulator.buffer_bytes() < trainer.velora_accumulator.naive_buffer_bytes() / 4
    assert trainer.velora_accumulator.cycle_complete
    assert int(trainer.velora_accumulator.cycles.max()) == 4  # one cycle per optimizer step
    layers = velora_modules(trainer.model)
    assert len(layers) == 4 and all(bool(layer.velora_initialised) for layer in layers.values())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.optimizer.optimizer.param_groups[0]["lr"] >= 0  # the Trainer's scheduler drives Flora
    for step in (2, 4):
        files = set(os.listdir(out / f"checkpoint-{step}"))
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", ACCUMULATOR_NAME} <= files
        torch.load(out / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)  # tensors only


def test_resumed_run_matches_uninterrupted_bitwise(uninterrupted, tmp_path):
    out, reference = uninterrupted
    # v as saved in checkpoint-2 (set by the first batch; a resume must not re-initialise it)
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    resumed = VeLoRATrainer(model=_model(), args=_args(tmp_path, max_steps=4), train_dataset=TokenDataset(),
                            method="flora+velora", method_options=FLORA_OPTIONS)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    for name, v in _v(resumed.model).items():
        assert torch.equal(v, saved[f"{name}.velora_v"]), name
        assert torch.equal(v, _v(reference.model)[name]), name
    expected = _params(reference.model)
    for name, value in _params(resumed.model).items():
        assert torch.equal(value, expected[name]), name
    # the resumed half really trained: parameters moved away from checkpoint-2
    assert any(not torch.equal(value, saved[name]) for name, value in _params(resumed.model).items()
               if name in saved)


def test_plain_trainer_with_callback_and_optimizer_factory(tmp_path):
    from velora.optim import GaLoreAdamW

    model = _model()
    args = _args(tmp_path, max_steps=2, accumulation=1, save_strategy="no")
    optimizers = trainer_optimizer(model, args, "galore", {"galore_rank": 4, "update_proj_gap": 1})
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), optimizers=optimizers,
                      callbacks=[VeLoRACallback(VeLoRAConfig(sub_token_size=32))])
    assert len(velora_modules(model)) == 4  # applied when the Trainer was built, before training
    before = _params(model)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, GaLoreAdamW)
    assert optimizers[0].param_groups[0]["lr"] <= 3e-3 and optimizers[0].defaults["lr"] == 3e-3
    assert all(bool(layer.velora_initialised) for layer in velora_modules(model).values())
    assert any(not torch.equal(p, before[n]) for n, p in _params(model).items())


def test_method_options_may_not_override_trainer_settings(tmp_path):
    with pytest.raises(ValueError, match="learning_rate"):
        VeLoRATrainer(model=_model(), args=_args(tmp_path, 1), method="flora", method_options={"lr": 1.0})


def test_compressed_accumulation_needs_accumulation_steps(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps > 1"):
        VeLoRATrainer(model=_model(), args=_args(tmp_path, 1, accumulation=1), train_dataset=TokenDataset(),
                      method="flora", method_options={"flora_accumulation": True, "optimizer": "adamw"})


def test_gradnormlorp_trainer_trains_factors_with_projected_optimizer(tmp_path):
    from velora.methods.gradnorm_lorp.model import gradnorm_lorp_modules
    from velora.optim import GaLoreAdamW

    trainer = VeLoRATrainer(model=_model(), args=_args(tmp_path, max_steps=2, accumulation=1, save_strategy="no"),
                            train_dataset=TokenDataset(), method="gradnormlorp",
                            method_options={"gradnorm_rank": 4, "gradnorm_proj_rank": 2})
    layers = gradnorm_lorp_modules(trainer.model)
    assert len(layers) == 14  # every attention/MLP linear of the 2 layers
    factors_before = {name: layer.lora_I.detach().clone() for name, layer in layers.items()}
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, GaLoreAdamW)
    assert [g["rank"] for g in trainer.optimizer.param_groups if g["rank"] is not None] == [2]
    assert all(not torch.equal(layer.lora_I, factors_before[name]) for name, layer in layers.items())


def test_comm_hook_in_a_single_process_run_is_an_error(tmp_path):
    trainer = VeLoRATrainer(model=_model(), args=_args(tmp_path, max_steps=1, accumulation=1, save_strategy="no"),
                            train_dataset=TokenDataset(), method="velora", comm_hook_rank=4)
    with pytest.raises(ValueError, match="multi-process DDP"):
        trainer.train()


def test_velora_trainer_overrides_no_private_trainer_method():
    # save/resume of the accumulator and comm-hook states go through a TrainerCallback and the public train();
    # a private Trainer method may be renamed in any transformers release
    from transformers import Trainer

    overridden = [name for name in vars(VeLoRATrainer) if name.startswith("_") and not name.startswith("__")
                  and hasattr(Trainer, name)]
    assert overridden == []
