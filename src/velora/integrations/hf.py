"""Hugging Face Trainer integration.

Three entry points, from lightest to fullest:

- ``VeLoRACallback(config)``: add it to any ``Trainer(callbacks=[...])`` and VeLoRA is applied to the
  model when the Trainer is built (``on_init_end``), before any checkpoint is loaded, so a resumed run
  restores v from ``model.safetensors`` instead of re-initialising it.
- ``trainer_optimizer(model, args, method)``: a Flora / GaLoreAdamW / GradNormLoRP / AdamW optimizer
  built from the Trainer's own settings (learning_rate, weight_decay, adam_beta1/2, seed), for
  ``Trainer(optimizers=trainer_optimizer(...))``.
- ``VeLoRATrainer(model=..., args=..., method="flora+velora")``: a thin ``Trainer`` subclass doing both
  through ``velora.methods.registry`` (model surgery + optimizer), plus FLoRA compressed gradient accumulation
  driven by ``gradient_accumulation_steps`` (``method_options={"flora_accumulation": True}``), with the
  accumulator state saved in and restored from Trainer checkpoints.

Which Trainer settings are used (and never overridden by ``MethodOptions``): ``learning_rate`` -> lr,
``weight_decay``, ``(adam_beta1, adam_beta2)`` -> betas, ``gradient_accumulation_steps`` -> the
accumulation cycle, ``seed`` -> the FLoRA projection seeds. The scheduler, clipping, logging and
checkpointing are the Trainer's. Not used: ``optim`` / ``optim_args`` (the method decides the optimizer;
the ``optimizer`` option picks its base) and ``adam_epsilon`` (the optimizers' default eps;
``method_options={"eps": ...}`` sets one).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from velora.core.config import VeLoRAConfig
from velora.methods.registry import MethodOptions, build_optimizer, parse_method, prepare_model

__all__ = ["VeLoRACallback", "VeLoRATrainer", "method_options_from_args", "trainer_optimizer",
           "ACCUMULATOR_NAME", "COMM_HOOK_NAME"]

ACCUMULATOR_NAME = "velora_accumulator.pt"
COMM_HOOK_NAME = "velora_comm_hook.pt"
# MethodOptions fields the Trainer's own arguments decide (see the module docstring)
_FROM_TRAINING_ARGS = ("lr", "weight_decay", "betas", "accumulation_steps", "seed")


class VeLoRACallback(TrainerCallback):
    """Apply VeLoRA to the Trainer's model when the Trainer is created (idempotent).

    ``Trainer(model, args, callbacks=[VeLoRACallback(VeLoRAConfig(sub_token_size=32))])``. The wrapped
    layers keep their parameters, so an optimizer built before or after works unchanged; v and the
    "initialised" flag are buffers, saved in every checkpoint and restored on resume.
    """

    def __init__(self, config: VeLoRAConfig | None = None, filter_fn=None):
        self.config = config or VeLoRAConfig()
        if not isinstance(self.config, VeLoRAConfig):
            raise ValueError(f"VeLoRACallback needs a VeLoRAConfig, got {type(self.config).__name__}")
        self.filter_fn = filter_fn

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("VeLoRACallback: the Trainer has no model yet; pass model= to Trainer(...)")
        from velora.core.layers import apply_velora

        apply_velora(model, self.config, self.filter_fn)
        return control


def method_options_from_args(args, options: MethodOptions | dict[str, Any] | None = None) -> MethodOptions:
    """``MethodOptions`` whose lr / weight decay / betas / accumulation steps / seed come from
    ``TrainingArguments``. A dict may set any other flat option key (``flora_rank``, ``lora_alpha``, ``optimizer``,
    ``velora``: a VeLoRAConfig, ...; velora.methods.options.OPTION_KEYS); an unknown key is a one-line error."""
    trainer_values = dict(lr=args.learning_rate, weight_decay=args.weight_decay,
                          betas=(args.adam_beta1, args.adam_beta2),
                          accumulation_steps=args.gradient_accumulation_steps, seed=args.seed)
    if options is None or isinstance(options, dict):
        clashes = sorted(set(options or {}) & set(_FROM_TRAINING_ARGS))
        if clashes:
            raise ValueError(f"method options {clashes} come from TrainingArguments (learning_rate, weight_decay, "
                             "adam_beta1/2, gradient_accumulation_steps, seed); set them there instead")
        return MethodOptions.from_flat({**(options or {}), **trainer_values})
    if isinstance(options, MethodOptions):
        return MethodOptions.from_flat(trainer_values, base=options)
    raise ValueError(f"method_options must be a MethodOptions or a dict, got {type(options).__name__}")


def trainer_optimizer(model: nn.Module, args, method: str = "full",
                      method_options: MethodOptions | dict[str, Any] | None = None):
    """``(optimizer, None)`` for ``Trainer(optimizers=...)``: the method's optimizer (Flora for "flora",
    GaLoreAdamW for "galore", the GradNormLoRP optimizer for "gradnormlorp", AdamW/Adafactor otherwise)
    with the Trainer's learning rate, weight decay, betas and seed. The Trainer adds its usual scheduler.
    The model must already be prepared for the method (``velora.methods.registry.prepare_model``)."""
    options = method_options_from_args(args, method_options)
    return build_optimizer(model, parse_method(method), options), None


class VeLoRATrainer(Trainer):
    """``transformers.Trainer`` that trains with a ``velora.methods.registry`` method.

    ``VeLoRATrainer(model=model, args=args, train_dataset=ds, method="flora+velora",
    method_options={"flora_rank": 8, "flora_accumulation": True})`` prepares the model (VeLoRA,
    GradNormLoRP, LoRA, checkpointing, as the method says), builds the method's optimizer from the
    Trainer's settings, and with ``flora_accumulation`` keeps the ``gradient_accumulation_steps``
    micro-batch gradients of the projectable matrices in FLoRA's compressed (k × r) buffers. Every
    ``.grad`` is decompressed right after the last micro-batch's backward, so clipping, DDP (which
    all-reduces that decompressed gradient on the sync micro-batch) and the optimizer see a normal
    gradient. ``method_options`` must not set lr / weight decay / betas / accumulation / seed (they
    come from ``args``).

    ``comm_hook_rank=r`` (multi-process runs, e.g. ``torchrun``): all-reduce FLoRA-projected gradients of
    the attention/MLP matrices instead of full ones (``velora.integrations.distributed.flora_comm_hook``; seeds from
    ``args.seed``); with ``flora_accumulation`` the accumulated matrices are sent as the accumulator's own
    (k × flora_rank) sums instead, which is exact (no second projection). Its step counter is saved
    with each checkpoint. A single-process run with ``comm_hook_rank`` raises at the first step (there is
    nothing to communicate; nothing is silently ignored).
    """

    def __init__(self, model: nn.Module | None = None, args=None, *, method: str = "velora",
                 method_options: MethodOptions | dict[str, Any] | None = None, comm_hook_rank: int | None = None,
                 **kwargs):
        if model is None or args is None:
            raise ValueError("VeLoRATrainer needs model= and args= (a TrainingArguments)")
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise ValueError("VeLoRATrainer builds the optimizer from method=...; use a plain Trainer with "
                             "optimizers=trainer_optimizer(...) to bring your own")
        self.velora_method = parse_method(method)
        self.velora_options = method_options_from_args(args, method_options)
        # surgery before Trainer.__init__, so checkpoint keys (v, LoRA factors) match on resume
        model = prepare_model(model, self.velora_method, self.velora_options)
        super().__init__(model=model, args=args, **kwargs)
        self.velora_accumulator = None
        if self.velora_options.flora.accumulation:
            self.velora_accumulator = self._build_accumulator()
        if comm_hook_rank is not None and (isinstance(comm_hook_rank, bool) or not isinstance(comm_hook_rank, int)
                                           or comm_hook_rank < 1):
            raise ValueError(f"comm_hook_rank={comm_hook_rank!r} must be a positive integer (the projection rank)")
        self.velora_comm_hook_rank = comm_hook_rank
        self.velora_comm_state = None
        self._velora_comm_resume: dict[str, torch.Tensor] | None = None
        self._velora_resume_dir: str | None = None
        self.add_callback(_VeLoRAStateCallback(self))  # public Trainer extension point for save/resume

    # ---- optimizer ----------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            target = self.model if model is None else model
            self.optimizer = build_optimizer(target, self.velora_method, self.velora_options)
        return self.optimizer

    # ---- FLoRA compressed accumulation --------------------------------------------------------------
    def _build_accumulator(self):
        from velora.methods.flora.method import compressed_accumulator
        from velora.optim import projectable_parameters

        steps = self.args.gradient_accumulation_steps
        if steps < 2:
            raise ValueError(f"flora_accumulation needs gradient_accumulation_steps > 1 (got {steps}): with one "
                             "micro-batch there is nothing to accumulate and the projection only adds noise")
        if not projectable_parameters(self.model):
            raise ValueError("flora_accumulation found no projectable matrices (attention/MLP linears) to compress")
        return compressed_accumulator(self.model, self.velora_options, steps)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.velora_comm_hook_rank is not None and self.velora_comm_state is None:
            self._register_comm_hook(model)
        if self.velora_accumulator is not None:
            # the Trainer shortens the last cycle of an epoch when the batches do not divide evenly
            cycle = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            self.velora_accumulator.accumulation_steps = int(cycle)
        return super().training_step(model, inputs, num_items_in_batch)

    def _register_comm_hook(self, model) -> None:
        # `model` is what the Trainer trains: the DDP wrapper accelerate built (registered before 1st backward)
        from torch.nn.parallel import DistributedDataParallel

        from velora.integrations.distributed import register_flora_comm_hook

        if not isinstance(model, DistributedDataParallel):
            raise ValueError(f"comm_hook_rank={self.velora_comm_hook_rank} needs multi-process DDP training (e.g. "
                             f"torchrun --nproc_per_node 2), but the Trainer trains a {type(model).__name__}")
        # with compressed accumulation the hook sends the accumulator's own (k × r) sums (no second projection)
        self.velora_comm_state = register_flora_comm_hook(model, rank=self.velora_comm_hook_rank, seed=self.args.seed,
                                                          accumulator=self.velora_accumulator)
        if self._velora_comm_resume is not None:
            self.velora_comm_state.load_state_dict(self._velora_comm_resume)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """``Trainer.train``; the checkpoint it resumes from (``True``: the last one in ``output_dir``) is remembered
        so the accumulator and comm-hook states are restored from it when training begins."""
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # None: Trainer's own error
        self._velora_resume_dir = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save_velora_state(self, output_dir: str) -> None:
        """Write the comm-hook and accumulator states into the checkpoint folder (whole files or nothing)."""
        if self.velora_comm_state is not None:
            _save_atomically(self.velora_comm_state.state_dict(), os.path.join(output_dir, COMM_HOOK_NAME))
        if self.velora_accumulator is not None:
            state = self.velora_accumulator.state_dict()
            state["accumulation_steps"] = self.args.gradient_accumulation_steps  # not a shortened last cycle
            _save_atomically(state, os.path.join(output_dir, ACCUMULATOR_NAME))

    def _load_velora_state(self, checkpoint: str) -> None:
        if self.velora_comm_hook_rank is not None:
            path = os.path.join(checkpoint, COMM_HOOK_NAME)
            if os.path.exists(path):  # applied when the hook is registered at the first step
                self._velora_comm_resume = torch.load(path, map_location="cpu", weights_only=True)
        if self.velora_accumulator is None:
            return
        path = os.path.join(checkpoint, ACCUMULATOR_NAME)
        if not os.path.exists(path):
            raise ValueError(f"checkpoint {checkpoint!r} has no {ACCUMULATOR_NAME}; it was not written with "
                             "flora_accumulation, so resume it without flora_accumulation")
        self.velora_accumulator.accumulation_steps = self.args.gradient_accumulation_steps
        self.velora_accumulator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


class _VeLoRAStateCallback(TrainerCallback):
    """Saves ``VeLoRATrainer``'s accumulator and comm-hook states next to each checkpoint's optimizer and restores
    them when a resumed run begins (after the Trainer restored its own optimizer and zeroed the gradients)."""

    def __init__(self, trainer: VeLoRATrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        # the folder Trainer._save_checkpoint just wrote (outside a hyperparameter search); save_only_model
        # checkpoints hold no optimizer either, so they cannot be resumed and get no accumulator
        if args.should_save and not args.save_only_model:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self.trainer._save_velora_state(folder)
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        checkpoint = getattr(self.trainer, "_velora_resume_dir", None)
        if checkpoint is not None:
            self.trainer._load_velora_state(checkpoint)
        return control


def _save_atomically(state: dict, path: str) -> None:
    partial = path + ".partial"
    torch.save(state, partial)
    os.replace(partial, path)  # a crash mid-write leaves the previous file (or none), never half of one
