"""One training loop every method plugs into (through ``velora.methods.registry``). ``train`` reads top to bottom:

    prepare the run folder -> build data -> build the model on its device -> prepare the method (model, optimizer,
    optional FLoRA accumulator) -> restore a checkpoint -> steps (micro-batches, clipping, cosine schedule; log,
    evaluate and checkpoint on schedule) -> final evaluation -> measured memory -> summary (the result dict)

Resuming is bitwise identical on CPU: the batch order is a pure function of the step (see
``velora.training.data.TokenBlocks``), the learning rate is a pure function of the step, and a checkpoint
(``velora.training.checkpoint.Checkpointer``) holds the model, optimizer, accumulator and RNG state.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from velora.integrations import distributed, fsdp2
from velora.methods.registry import MethodOptions, build_optimizer, parse_method, prepare_model
from velora.training.checkpoint import (
    Checkpointer,
    latest_checkpoint,
    load_model_weights,
    load_training_state,
    save_checkpoint,
)
from velora.training.config import TrainConfig, lr_factor, perplexity
from velora.training.data import RunData, TokenBlocks, load_data
from velora.training.device import resolve_device
from velora.training.guards import (
    DivergenceRule,
    TrainingDiverged,
    after_divergence,
    check_memory_fits,
    check_model_spec,
    gradient_norm,
)
from velora.training.memory_columns import measure_memory
from velora.training.models import _is_pretrained_dir, build_base_model
from velora.training.resume import open_run_folder, record_start, removed_if_start_fails
from velora.training.run_log import Progress, RunLog, rss_mib
from velora.training.runfiles import write_atomic

# names callers import from here since before the loop was split into modules
__all__ = ["RunData", "TrainConfig", "TrainingDiverged", "_is_pretrained_dir", "build_base_model", "evaluate",
           "latest_checkpoint", "load_data", "load_model_weights", "load_training_state", "lr_factor",
           "public_result", "save_checkpoint", "train"]


# ---- what the steps share ---------------------------------------------------------------------------


@dataclass
class Run:
    """What the steps of one run share: its config and folder, the objects being trained, where it stands."""

    config: TrainConfig
    device: torch.device
    out: Path | None  # the run folder; None: nothing is written
    data: RunData
    model: nn.Module
    ddp_model: nn.Module | None  # the model itself in one process or under FSDP2, its DDP wrapper under torchrun
    optimizer: torch.optim.Optimizer
    accumulator: Any  # FLoRA's CompressedGradAccumulator, or None
    start_step: int
    last_step: int  # this invocation stops here (--stop-at-step); the schedule still runs to config.steps
    divergence: DivergenceRule
    run_log: RunLog | None = None  # process rank 0 with a run folder only
    fidelity_log: Any = None  # velora.core.fidelity.DiagnosisLog with --diagnose-every
    bar: Progress | None = None
    on_step: Callable[[dict[str, float]], None] | None = None
    trainable: list[nn.Parameter] = field(default_factory=list)
    rows: list[dict[str, float]] = field(default_factory=list)  # the logged rows, earlier ones of a resume first
    step_times: list[float] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)
    sharded: bool = False  # --parallel fsdp2: every rank takes part in checkpoints
    owns_process_group: bool = True  # train() joined the group, so it leaves it at the end

    @property
    def tokens_per_step(self) -> int:
        config = self.config
        return config.batch_size * config.accumulation_steps * config.seq_len * distributed.world_size()

    def writes_files(self) -> bool:
        return self.out is not None and distributed.is_main_process()

    def checkpoints_here(self) -> bool:
        """Process rank 0 writes a checkpoint; under FSDP2 every rank writes its shards."""
        return self.out is not None and (self.sharded or distributed.is_main_process())

    def first_batch(self) -> torch.Tensor:
        """Training batch 0 on the run's device (B, T): what the memory columns are measured on."""
        return self.data.train.batch(0, self.config.batch_size).to(self.device)


# ---- the run, top to bottom ------------------------------------------------------------------------


def train(config: TrainConfig, out_dir: str | Path | None = None, resume: bool = False, progress: bool = False,
          stop_at_step: int | None = None, measure: bool = True, cache_dir: Path | None = None,
          tensorboard: bool = True, log=None, on_model_ready=None, device: str | torch.device | None = "auto",
          allow_lr_change: bool = False, allow_data_change: bool = False, memory_check: bool = True,
          on_step=None, diagnose_every: int = 0, parallel: str = "ddp",
          on_optimizer_ready=None) -> dict[str, Any]:
    """Train ``config`` and return the result dict (also written to ``out_dir/result.json``).

    ``stop_at_step`` ends this invocation early (after checkpointing) without changing the schedule;
    ``resume=True`` continues from ``out_dir``'s latest checkpoint with the run's saved tokenizer;
    ``allow_lr_change`` lets ``lr`` / ``warmup_steps`` differ on resume, ``allow_data_change`` lets the
    training text differ (both recorded in ``run.json``). ``memory_check`` refuses a run whose planned peak
    exceeds the available memory. Raises ``TrainingDiverged`` when the loss or gradient becomes NaN/Inf or
    the loss explodes (``velora.training.guards.DivergenceRule``; the last good checkpoint stays on disk).
    ``on_model_ready(model)`` is called once the model is prepared and restored (experiments use it to attach
    meters or hooks); ``on_step(row)`` after every optimizer step with the logged row (progress displays).
    ``on_optimizer_ready(model, optimizer)`` is called once the optimizer is built, before a checkpoint is restored
    into it (experiments use it to regroup parameters, e.g. ``velora.experiments.control.scale_compressed_lr``;
    the same hook must be passed on resume, as the checkpoint's param groups are those it made).
    ``device``: auto | cpu | cuda | cuda:N (velora.training.device); the model, batches and optimizer state live there.
    ``diagnose_every=N`` logs VeLoRA's gradient fidelity every N steps to ``diagnose.csv`` (velora.core.fidelity);
    it never changes the run's numbers. ``parallel``: "ddp" (default) or "fsdp2" under torchrun
    (velora.integrations.fsdp2: blocks sharded, checkpoints through DCP, no memory measurement).
    """
    owns_process_group = not distributed.is_distributed()
    device = _join_process_group(device)
    say = _main_process_logger(log)
    out = _run_folder_argument(out_dir, resume, allow_lr_change, allow_data_change)
    check_model_spec(config.model)
    options = config.method_options()
    sharded = fsdp2.check_parallel(parallel, parse_method(config.method), options, distributed.world_size(),
                                   diagnose_every)
    with removed_if_start_fails(out, resume, distributed.is_main_process()):  # no stub folder after a failed start
        checkpoint, changes = None, {}
        if out is not None:
            checkpoint, changes = open_run_folder(config, out, resume, stop_at_step, allow_lr_change,
                                                  allow_data_change, distributed.is_main_process())

        # data and model, seeded: an uninterrupted and a resumed run build exactly the same objects
        torch.manual_seed(config.seed)
        with distributed.main_process_first():  # rank 0 builds the tokenizer and token caches, the others read them
            data = load_data(config, cache_dir, out if checkpoint is not None else None, allow_data_change)
        if memory_check:
            check_memory_fits(config, data.tokenizer.vocab_size, device, say)
            torch.manual_seed(config.seed)  # planning draws random numbers on fake tensors
        model, init_source = build_model_on_device(config, data.tokenizer, device)
        model = prepare_method(model, config.method, options, init_source, say)
        if sharded:
            model = fsdp2.shard_model(model, device)
        optimizer, accumulator = build_optimizer_and_accumulator(model, config, options)
        if on_optimizer_ready is not None:
            on_optimizer_ready(model, optimizer)

        start_step = 0
        if checkpoint is not None:
            start_step = Checkpointer(out).restore(checkpoint, model, optimizer, accumulator)
            say(f"resumed {out} at step {start_step}")
        if out is not None and distributed.is_main_process():
            record_start(out, start_step, data.corpus, data.tokenizer, changes, checkpoint is not None,
                         allow_data_change)
        if on_model_ready is not None:
            on_model_ready(model)

        last_step = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
        run = Run(config, device, out, data, model, model if sharded else distributed.wrap_ddp(model, device),
                  optimizer, accumulator, start_step, last_step, DivergenceRule(data.tokenizer.vocab_size),
                  trainable=[p for p in model.parameters() if p.requires_grad], sharded=sharded,
                  owns_process_group=owns_process_group)
    open_reporters(run, progress, tensorboard, diagnose_every, on_step)
    run_steps(run)
    val_loss = final_evaluation(run)
    measure = measure and not sharded  # the meter traces one process's whole model
    memory = measure_memory(model, config.method, options, run.first_batch()) if measure else {}
    return finish(run, summarise(run, val_loss, memory))


# ---- the steps -------------------------------------------------------------------------------------


def _join_process_group(device: str | torch.device | None) -> torch.device:
    """Resolve ``device`` and, under torchrun, join the process group (gloo on CPU, nccl on GPUs): process rank 0
    alone logs and writes files; rank r trains on batches r, N + r, ... of the single-process order
    (velora.integrations.distributed)."""
    device = resolve_device(device)
    distributed.init_from_env(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def _main_process_logger(log) -> Callable[[str], None]:
    if not distributed.is_main_process():
        return lambda message: None
    return log or (lambda message: print(message, file=sys.stderr))


def _run_folder_argument(out_dir: str | Path | None, resume: bool, allow_lr_change: bool,
                         allow_data_change: bool) -> Path | None:
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("--resume needs --out DIR (the run folder to continue)")
    if (allow_lr_change or allow_data_change) and not resume:
        raise ValueError("allow_lr_change / allow_data_change only apply with resume=True (--resume)")
    return out


def build_model_on_device(config: TrainConfig, tokenizer, device: torch.device) -> tuple[nn.Module, Any]:
    """The base model on ``device`` (before qlora quantises on it), with the weights of ``config.init_from``
    (a run of any method, adapters merged; velora.training.init_from) when given. Returns it and that source."""
    model = build_base_model(config, tokenizer.vocab_size).to(device)
    if not config.init_from:
        return model, None
    from velora.training.init_from import check_same_tokenizer, load_init_weights

    check_same_tokenizer(config.init_from, tokenizer)
    return model, load_init_weights(model, config.init_from)


def prepare_method(model: nn.Module, method_name: str, options: MethodOptions, init_source, say) -> nn.Module:
    """The registry's model preparation for ``method_name`` (adapters, VeLoRA layers, quantisation)."""
    model = prepare_model(model, parse_method(method_name), options)
    if init_source is not None:
        from velora.training.init_from import restore_init_velora

        say(restore_init_velora(model, init_source))  # v where the target wraps the same layers; one line
    return model


def build_optimizer_and_accumulator(model: nn.Module, config: TrainConfig, options: MethodOptions) -> tuple[Any, Any]:
    """The method's optimizer (each group remembers its ``initial_lr`` for the schedule) and, with
    ``flora_accumulation``, the compressed gradient accumulator."""
    optimizer = build_optimizer(model, parse_method(config.method), options)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    if not options.flora.accumulation:
        return optimizer, None
    from velora.methods.flora.method import compressed_accumulator
    from velora.optim.projections import projectable_parameters

    # attention/MLP matrices only: embeddings and the head accumulate plainly (a random projection
    # across the vocabulary smears their sparse gradients; FLoRA keeps them uncompressed too)
    params = projectable_parameters(model)
    if not params:
        raise ValueError(f"flora_accumulation: {config.model!r} has no trainable attention/MLP matrices to "
                         "compress; drop --flora-accumulation")
    return optimizer, compressed_accumulator(params, options, config.accumulation_steps)


def open_reporters(run: Run, progress: bool, tensorboard: bool, diagnose_every: int, on_step) -> None:
    """The CSV/TensorBoard log (earlier rows of a resume read back), the fidelity log and the progress bar;
    process rank 0 alone writes and draws."""
    main = distributed.is_main_process()
    run.run_log = RunLog(run.out, run.start_step, tensorboard) if run.writes_files() else None
    run.rows = list(run.run_log.rows) if run.run_log is not None else []
    from velora.core.fidelity import open_diagnosis_log

    run.fidelity_log = open_diagnosis_log(run.out, diagnose_every, run.config.method, run.start_step, run.run_log,
                                          main)
    run.bar = Progress(progress and main, run.config.steps, run.start_step, run.config.method)
    run.on_step = on_step


def run_steps(run: Run) -> None:
    """Steps ``start_step .. last_step``: train, log, evaluate and checkpoint on schedule. A divergence closes the
    logs and raises one line saying where the run stands and what to do."""
    run.model.train()
    try:
        for step in range(run.start_step, run.last_step):
            row = train_step(run, step)
            _report(run, row)
            _evaluate_on_schedule(run, step + 1)
            _checkpoint_on_schedule(run, step + 1)
            run.bar.update(step + 1, f"loss {row['loss']:.3f} ppl {row['ppl']:.1f} {row['tokens_per_s']:.0f} tok/s "
                                     f"rss {rss_mib():.0f} MiB")
    except TrainingDiverged as err:
        run.bar.close()
        if run.run_log is not None:
            run.run_log.close()
        kept = latest_checkpoint(run.out) if run.out is not None else None
        raise TrainingDiverged(f"training stopped: {err}; {after_divergence(kept, run.divergence, run.config.lr)}"
                               ) from None
    run.bar.close()
    if run.checkpoints_here() and run.last_step > run.start_step:
        Checkpointer(run.out).save(run.last_step, run.model, run.optimizer, run.accumulator)


def train_step(run: Run, step: int) -> dict[str, float]:
    """One optimizer step (0-based ``step``): the scheduled lr, the micro-batches, the divergence checks, clipping
    and the update. Returns the row ``log.csv`` gets."""
    config = run.config
    began = time.perf_counter()
    factor = lr_factor(step, config)
    for group in run.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    step_loss, batch = _forward_backward(run, step)
    step_loss = distributed.mean_across_ranks(step_loss)  # logged: the mean over process ranks
    exploded = run.divergence.train_loss(step + 1, step_loss)
    if exploded:
        raise TrainingDiverged(exploded)
    if run.fidelity_log is not None:  # on the side: the model, its grads and the RNG are left as they are
        run.fidelity_log.after_backward(step + 1, run.model, batch)
    grad_norm = gradient_norm(run.trainable, config.grad_clip)
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(f"gradient norm is {grad_norm} at step {step + 1}")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - began
    run.step_times.append(elapsed)
    return {"step": step + 1, "loss": step_loss, "ppl": perplexity(step_loss), "lr": config.lr * factor,
            "grad_norm": grad_norm, "tokens": (step + 1) * run.tokens_per_step,
            "tokens_per_s": run.tokens_per_step / elapsed, "elapsed_s": sum(run.step_times)}


def _forward_backward(run: Run, step: int) -> tuple[float, torch.Tensor]:
    """Forward and backward over the step's ``accumulation_steps`` micro-batches (DDP syncs on the last one).
    Returns the mean loss of this process and its last batch (B, T)."""
    config = run.config
    step_loss = 0.0
    for micro in range(config.accumulation_steps):
        index = distributed.rank_batch_index(step * config.accumulation_steps + micro)
        batch = run.data.train.batch(index, config.batch_size).to(run.device, non_blocking=True)  # (B, T)
        with distributed.sync_context(run.ddp_model, last_micro_batch=micro == config.accumulation_steps - 1):
            loss = run.ddp_model(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss is {float(loss.detach())} at step {step + 1}")
            (loss / config.accumulation_steps).backward()
        step_loss += float(loss.detach()) / config.accumulation_steps
    return step_loss, batch


@torch.no_grad()
def evaluate(model: nn.Module, validation: TokenBlocks, batch_size: int, max_batches: int) -> float:
    """Mean next-token cross-entropy over the first ``max_batches`` validation batches (0: all of them)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in validation.sequential_batches(batch_size, max_batches or None):
        batch = batch.to(device)  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        tokens = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * tokens
        count += tokens
    model.train(was_training)
    return total / count


def _report(run: Run, row: dict[str, float]) -> None:
    run.rows.append(row)
    if run.run_log is not None:
        run.run_log.write(row)
    if run.on_step is not None:
        run.on_step(row)


def _evaluate_on_schedule(run: Run, done: int) -> None:
    """Every ``eval_every`` steps before the last: the validation loss, checked against the divergence rule."""
    config = run.config
    if not (config.eval_every and done % config.eval_every == 0 and done < config.steps):
        return
    val_loss = evaluate(run.model, run.data.validation, config.batch_size, config.eval_batches)
    exploded = run.divergence.validation_loss(done, val_loss)
    if exploded:
        raise TrainingDiverged(exploded)
    run.val_history.append({"step": done, "val_loss": val_loss, "val_ppl": perplexity(val_loss)})
    if run.run_log is not None:
        run.run_log.scalar("val/ppl", perplexity(val_loss), done)


def _checkpoint_on_schedule(run: Run, done: int) -> None:
    """Every ``save_every`` steps before this invocation's last (which ``run_steps`` saves), on process rank 0,
    and never while the loss is above the divergence ceiling."""
    config = run.config
    if run.out is None or not config.save_every or done % config.save_every or done >= run.last_step:
        return
    if run.checkpoints_here() and run.divergence.steps_above == 0:
        Checkpointer(run.out).save(done, run.model, run.optimizer, run.accumulator)


def final_evaluation(run: Run) -> float:
    """The validation loss after the last step; a loss above the divergence ceiling stops the run in one line."""
    config = run.config
    val_loss = evaluate(run.model, run.data.validation, config.batch_size, config.eval_batches)
    exploded = run.divergence.validation_loss(run.last_step, val_loss)
    if exploded:
        if run.run_log is not None:
            run.run_log.close()
        kept = latest_checkpoint(run.out) if run.out is not None else None
        raise TrainingDiverged(f"training stopped: {exploded}; the checkpoint {kept} holds these weights. Lower "
                               f"--lr (now {config.lr}) and start over" if kept else f"training stopped: {exploded}")
    if run.run_log is not None:
        run.run_log.scalar("val/ppl", perplexity(val_loss), run.last_step)
        run.run_log.close()
    return val_loss


def summarise(run: Run, val_loss: float, memory: dict[str, Any]) -> dict[str, Any]:
    """The result dict: losses, validation, measured memory, throughput (the first step, which pays one-off
    costs, left out), sizes, the data and tokenizer identity, and the config."""
    config, rows, data, accumulator = run.config, run.rows, run.data, run.accumulator
    timed = run.step_times[1:] if len(run.step_times) > 1 else run.step_times
    final = {"step": run.last_step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)}
    return {
        "status": "completed" if run.last_step == config.steps else "stopped",
        "method": parse_method(config.method).name,
        "model": config.model,
        "steps": run.last_step,
        "tokens": run.last_step * run.tokens_per_step,
        "initial_loss": rows[0]["loss"] if rows else float("nan"),
        "final_loss": rows[-1]["loss"] if rows else float("nan"),
        "val_loss": val_loss,
        "val_ppl": perplexity(val_loss),
        "val_history": run.val_history + [final],
        "activation_bytes": memory.get("activation_bytes"),
        "peak_bytes": memory.get("peak_bytes"),
        "peak_breakdown": memory.get("peak_breakdown"),
        "memory_source": memory.get("memory_source"),
        "tokens_per_s": (run.tokens_per_step * len(timed) / sum(timed)) if timed else None,
        "step_time_s": (sum(timed) / len(timed)) if timed else None,
        "step_time_median_s": sorted(timed)[len(timed) // 2] if timed else None,
        "accumulation_buffer_bytes": accumulator.buffer_bytes() if accumulator is not None else None,
        "naive_accumulation_bytes": accumulator.naive_buffer_bytes() if accumulator is not None else None,
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in run.trainable),
        "lr": config.lr,
        "data_fingerprint": data.corpus.fingerprint,
        "tokenizer": {"name": data.tokenizer.name, "vocab_size": data.tokenizer.vocab_size,
                      "identity": data.tokenizer.identity()},
        "train_tokens_available": data.train.n_tokens,
        "loss_curve": [[int(r["step"]), r["loss"]] for r in rows],
        "config": config.to_dict(),
        "threads": torch.get_num_threads(),
        "device": str(run.device),
        "torch": torch.__version__,
    }


def finish(run: Run, result: dict[str, Any]) -> dict[str, Any]:
    """Write ``result.json``, leave the process group, and hand in-process callers the tokenizer and model."""
    if run.writes_files():
        write_atomic(run.out / "result.json", json.dumps(result, indent=2))
    if distributed.is_distributed() and run.owns_process_group:
        run.ddp_model = None  # DDP's wrapper goes before the group (velora.integrations.distributed.shutdown)
        distributed.shutdown()
    result["_tokenizer"] = run.data.tokenizer
    result["_model"] = run.model  # in-process callers (experiments) may inspect it; dropped from JSON output
    return result


def public_result(result: dict[str, Any]) -> dict[str, Any]:
    """The result without in-process objects (what ``--json`` prints)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
