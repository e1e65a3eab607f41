"""One training loop every method plugs into (through ``velora.methods.registry``).

    config -> corpus + tokenizer -> model (preset or pretrained) -> registry.prepare_model / build_optimizer
           -> steps (micro-batches, optional FLoRA compressed accumulation, clipping, cosine schedule)
           -> CSV / TensorBoard log, atomic checkpoints -> validation ppl + measured memory -> result dict

Resuming is bitwise identical on CPU: the batch order is a pure function of the step (see
``velora.training.data.TokenBlocks``), the learning rate is a pure function of the step, and a checkpoint holds
the model (safetensors, VeLoRA buffers included), the optimizer state, the accumulator state and the
torch RNG state.

Checkpoints are written into a temporary folder that is renamed into place, and only then does the
``latest`` pointer file change (itself written to a temp file and renamed): a crash at any moment
leaves the previous checkpoint complete and pointed to.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from velora.integrations.distributed import (
    init_from_env,
    is_distributed,
    is_main_process,
    main_process_first,
    mean_across_ranks,
    rank_batch_index,
    shutdown,
    sync_context,
    world_size,
    wrap_ddp,
)
from velora.methods.registry import MethodOptions, build_optimizer, parse_method, prepare_model
from velora.training.config import TrainConfig, lr_factor, perplexity
from velora.training.data import Corpus, TokenBlocks, cached_token_stream, load_corpus, load_tokenizer
from velora.training.device import resolve_device
from velora.training.guards import DivergenceRule, check_memory_fits, check_model_spec
from velora.training.resume import (
    check_not_finished,
    check_resume_arguments,
    check_same_data,
    checkpoint_step,
    read_json,
    record_run,
    saved_tokenizer,
)
from velora.training.runfiles import (
    RunFolderError,
    ensure_folder,
    open_for_append,
    read_latest_pointer,
    refuse_symlink,
    remove_quietly,
    remove_stale_temporaries,
    why,
    write_atomic,
)

CHECKPOINT_VERSION = 1
LOG_COLUMNS = ("step", "loss", "ppl", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/Inf; the last good checkpoint is kept."""


# ---- data + model ----------------------------------------------------------------------------------


@dataclass
class RunData:
    corpus: Corpus
    tokenizer: Any
    train: TokenBlocks
    validation: TokenBlocks


def load_data(config: TrainConfig, cache_dir: Path | None = None, run_folder: Path | None = None,
              allow_data_change: bool = False) -> RunData:
    """Corpus, tokenizer and token streams. With ``run_folder`` (a resume) the run's saved tokenizer is used
    and changed text is refused unless ``allow_data_change`` (see ``velora.training.resume``)."""
    corpus = load_corpus(config.data, config.val_fraction, config.max_train_chars, config.max_val_chars)
    if not corpus.train or not corpus.validation:
        raise ValueError(f"--data {config.data!r} gave an empty train or validation split; add more text")
    tokenizer = None
    if run_folder is not None:
        check_same_data(run_folder, corpus.fingerprint, allow_data_change)
        tokenizer = saved_tokenizer(run_folder)
    if tokenizer is None:
        tokenizer_spec = config.model if config.tokenizer == "model" else config.tokenizer
        tokenizer = load_tokenizer(tokenizer_spec, corpus, config.vocab_size, config.bpe_train_chars, cache_dir)
    train_ids = cached_token_stream(tokenizer, corpus, "train", cache_dir)  # (N_train,)
    val_ids = cached_token_stream(tokenizer, corpus, "validation", cache_dir)  # (N_val,)
    return RunData(corpus, tokenizer, TokenBlocks(train_ids, config.seq_len, seed=config.seed),
                   TokenBlocks(val_ids, config.seq_len, shuffle=False))


def _is_pretrained_dir(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").exists() and any(
        (p / name).exists() for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))


def build_base_model(config: TrainConfig, vocab_size: int) -> nn.Module:
    """A preset / config.json built with random init, or a pretrained model via ``from_pretrained``."""
    from velora.training.models import PRESETS, build_config, build_model

    dtype = getattr(torch, config.dtype)
    if config.model in PRESETS or config.model.endswith(".json") or (
            Path(config.model).is_dir() and not _is_pretrained_dir(config.model)):
        overrides: dict[str, Any] = {"vocab_size": vocab_size}
        model_config = build_config(config.model, **overrides)
        if getattr(model_config, "max_position_embeddings", config.seq_len) < config.seq_len:
            model_config.max_position_embeddings = config.seq_len
        return build_model(model_config, dtype=None if dtype == torch.float32 else dtype)
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
    except (OSError, ValueError) as err:  # transformers' unknown-model_type message lists every type: cut it
        raise ValueError(f"--model {config.model!r} is not a preset, config.json or loadable model "
                         f"({str(err).splitlines()[0][:200]}); pass a preset or a local model directory") from None
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise ValueError(f"--model {config.model!r} has {model.get_input_embeddings().num_embeddings} embeddings "
                         f"but the tokenizer has {vocab_size} ids; use --tokenizer model")
    model.train()
    return model


# ---- checkpoints -----------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_model(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(path))  # handles tied weights


def _write_training_state(state: dict[str, Any], path: Path) -> None:
    torch.save(state, path)


def _write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text)  # no-follow temporary, fsync, rename (velora.training.runfiles)


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer, accumulator=None,
                    keep_last: int = 1) -> Path:
    """Write ``checkpoints/step-XXXXXXX`` atomically and point ``checkpoints/latest`` at it."""
    root = ensure_folder(Path(out_dir) / "checkpoints")
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingDiverged(f"refusing to checkpoint step {step}: {name} holds NaN/Inf")
    final = root / f"step-{step:07d}"
    refuse_symlink(final)
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    state = {
        "version": CHECKPOINT_VERSION,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "accumulator": accumulator.state_dict() if accumulator is not None else None,
    }
    try:
        _write_checkpoint_folder(tmp, model, state)
        if final.exists():
            shutil.rmtree(final)  # re-saving a step: the pointer may still name it, so point away first
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as err:
        remove_quietly(tmp)  # also on KeyboardInterrupt: no temporary is left behind
        if isinstance(err, _WRITE_FAILURES):
            raise _checkpoint_write_error(root, step, err) from None
        raise
    _write_text_atomic(root / "latest", final.name)
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[:-keep_last] if keep_last > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_failures() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, RuntimeError, SafetensorError)  # torch.save reports a full disk as a RuntimeError


_WRITE_FAILURES = _write_failures()


def _checkpoint_write_error(root: Path, step: int, err: BaseException) -> RunFolderError:
    previous = read_latest_pointer(root)
    kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
    if isinstance(err, OSError):
        reason = why(err)
    else:  # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos ..."
        free_mib = shutil.disk_usage(root).free / 2**20
        reason = (f"{type(err).__name__}: {str(err).splitlines()[0][:100]}; {free_mib:.1f} MiB left on the device, "
                  "probably full: free space (or choose another --out), then --resume")
    return RunFolderError(f"cannot write checkpoint step {step} into {root} ({reason}); {kept}")


def _write_checkpoint_folder(tmp: Path, model: nn.Module, state: dict[str, Any]) -> None:
    """Model and training state into a fresh temporary folder, fsynced (the caller renames it into place)."""
    remove_quietly(tmp)
    tmp.mkdir()
    _write_model(model, tmp / "model.safetensors")
    _write_training_state(state, tmp / "training_state.pt")
    for file in tmp.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The step folder ``checkpoints/latest`` names (validated: a step folder inside checkpoints/), or None."""
    root = Path(out_dir) / "checkpoints"
    pointer = root / "latest"
    path = read_latest_pointer(root)
    if path is None:
        return None
    if not (path / "model.safetensors").exists() or not (path / "training_state.pt").exists():
        raise ValueError(f"checkpoint {path} named by {pointer} is incomplete; delete {pointer.parent} to restart")
    return path


def _unreadable(path: Path, err: Exception) -> ValueError:
    """One line naming a corrupt checkpoint file and the checkpoints one could use instead."""
    step_folder = path.parent
    others = sorted(p.name for p in step_folder.parent.glob("step-*") if p.is_dir() and p != step_folder)
    instead = (f"resume from an earlier one ({', '.join(others[-3:])}: write its name into "
               f"{step_folder.parent / 'latest'})" if others else
               "no earlier checkpoint is kept (keep_last): start over, or restore the file")
    detail = (str(err).splitlines() or [type(err).__name__])[0][:120]
    return ValueError(f"checkpoint file {path} is truncated or corrupt ({type(err).__name__}: {detail}); {instead}")


def check_readable_safetensors(path: Path) -> None:
    """One line naming ``path`` when it is missing, truncated or not a safetensors file (reads the header only;
    any loader of a checkpoint's model.safetensors should call this first)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as fh:  # a torn or foreign file fails here
            fh.keys()
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise FileNotFoundError(f"{path} does not exist; pass a velora run or checkpoint folder") from None
        raise _unreadable(path, err) from None


def load_model_weights(model: nn.Module, checkpoint: Path) -> None:
    from safetensors.torch import load_model

    path = Path(checkpoint) / "model.safetensors"
    check_readable_safetensors(path)
    load_model(model, str(path))


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    import pickle

    path = Path(checkpoint) / "training_state.pt"
    try:
        # on the CPU first: optimizer.load_state_dict and the accumulator move state to their parameters' device,
        # so a run saved on a GPU resumes on any device
        return torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise _unreadable(path, err) from None


# ---- memory ----------------------------------------------------------------------------------------


def measure_memory(model: nn.Module, method: str, options: MethodOptions, batch: torch.Tensor) -> dict[str, Any]:
    """Saved-activation bytes of one training forward and the peak of a training step, measured on a deep
    copy (the run's own model, optimizer and RNG are untouched)."""
    rng = torch.get_rng_state()
    floor = torch.cuda.memory_allocated(batch.device) if batch.is_cuda else 0  # the run's own model and state
    model_copy = copy.deepcopy(model)
    model_copy.train()
    optimizer = build_optimizer(model_copy, method, options)

    def step_fn():
        loss = model_copy(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        from velora.memory import SavedActivationMeter, measure_step_peak
    except ImportError:
        SavedActivationMeter = measure_step_peak = None  # noqa: N806
    report: dict[str, Any]
    if SavedActivationMeter is not None and batch.is_cuda:
        with SavedActivationMeter(model_copy) as meter:
            loss = model_copy(input_ids=batch, labels=batch).loss
        activation_bytes = int(meter.total_bytes)
        del loss
        report = {"activation_bytes": activation_bytes, **_cuda_step_peak(step_fn, batch.device, floor)}
    elif SavedActivationMeter is not None:
        with SavedActivationMeter(model_copy) as meter:
            loss = model_copy(input_ids=batch, labels=batch).loss
        activation_bytes = int(meter.total_bytes)
        del loss
        peak = measure_step_peak(model_copy, optimizer, step_fn, steps=2)
        report = {"activation_bytes": activation_bytes, "peak_bytes": int(peak.peak_bytes),
                  "peak_breakdown": {k: int(v) for k, v in peak.breakdown.items()}, "memory_source": "velora.memory"}
    else:
        report = _fallback_memory(model_copy, optimizer, batch, step_fn)
    torch.set_rng_state(rng)
    return report


def _cuda_step_peak(step_fn, device: torch.device, floor: int) -> dict[str, Any]:
    """torch.cuda.max_memory_allocated over the second of two steps (the first creates the optimizer state),
    minus ``floor``, what was allocated before the copy was made (the run's own model and optimizer stay
    resident meanwhile): the copy's parameters, gradients, optimizer state, activations and temporaries."""
    step_fn()  # warm-up: optimizer state, VeLoRA directions, cuBLAS workspace
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step_fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - floor
    return {"peak_bytes": int(peak), "peak_breakdown": {"cuda_max_memory_allocated": int(peak)},
            "memory_source": "torch.cuda.max_memory_allocated (second step, minus what the run held before)"}


def _fallback_memory(model, optimizer, batch, step_fn) -> dict[str, Any]:
    """Used only while velora.memory is unavailable: unique saved bytes (storage-deduplicated, parameters
    and buffers excluded) + parameter/gradient/optimizer-state bytes. No temporaries."""
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch).loss
    activation_bytes = sum(seen.values())
    del loss
    step_fn()
    step_fn()
    trainable = [p for p in model.parameters() if p.requires_grad]
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor))
    breakdown = {"parameters": parameters, "gradients": gradients, "optimizer_state": state_bytes,
                 "activations": activation_bytes, "temporaries": 0}
    return {"activation_bytes": activation_bytes, "peak_bytes": sum(breakdown.values()), "peak_breakdown": breakdown,
            "memory_source": "fallback (saved_tensors_hooks + state sizes)"}


# ---- evaluation ------------------------------------------------------------------------------------


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


# ---- logging ---------------------------------------------------------------------------------------


class RunLog:
    """CSV log (always) and TensorBoard events (when tensorboard is installed)."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool = True) -> None:
        self.path = out_dir / "log.csv"
        refuse_symlink(self.path)
        rows = []
        if resume_step > 0 and self.path.exists():
            with open(self.path) as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.path, text.getvalue())  # drop rows past the resumed step
        self.rows = [{k: float(v) for k, v in r.items()} for r in rows]
        self._fh = open_for_append(self.path)  # O_NOFOLLOW: never appends through a symlink
        self._writer = csv.DictWriter(self._fh, LOG_COLUMNS)
        self._tb = None
        if tensorboard:
            refuse_symlink(out_dir / "tensorboard")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                self._tb = None

    def write(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        try:
            self._writer.writerow(row)
            self._fh.flush()
        except OSError as err:
            raise RunFolderError(f"cannot append to {self.path}: {why(err)}") from None
        if self._tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self._tb.add_scalar(f"train/{key}", row[key], int(row["step"]))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


class _Progress:
    """A rich progress bar on stderr (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, start: int, title: str) -> None:
        self._bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                             console=Console(stderr=True), transient=False)
        self._task = self._bar.add_task(title, total=total, completed=start, stats="")
        self._bar.start()

    def update(self, step: int, stats: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=stats)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _rss_mib() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:  # Windows
        return float("nan")


# ---- the loop --------------------------------------------------------------------------------------


def _gradient_norm(params: list[nn.Parameter], clip: float) -> float:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, clip))
    return float(torch.nn.utils.get_total_norm([p.grad for p in grads]))


def _open_run_folder(config: TrainConfig, out: Path, resume: bool, stop_at_step: int | None,
                     allow_lr_change: bool, allow_data_change: bool) -> tuple[Path | None, dict[str, Any]]:
    """Check the run folder (resume rules in ``velora.training.resume``), remove stale temporaries, write config.json.
    Returns the checkpoint to resume from (None for a fresh run) and the changes the flags allowed."""
    if resume and not out.is_dir():
        raise ValueError(f"--resume: {out} does not exist; pass the --out folder of the run to continue")
    ensure_folder(out)
    if is_main_process():
        remove_stale_temporaries(out)  # left by a run killed mid-write (or by a full disk)
    saved_config = out / "config.json"
    checkpoint, changes = None, {}
    if resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise ValueError(f"--resume: {out} has no checkpoint; run without --resume first")
        changes = check_resume_arguments(read_json(saved_config), config.to_dict(), saved_config, allow_lr_change,
                                         allow_data_change)
        check_not_finished(out, checkpoint_step(checkpoint), config.steps, stop_at_step)
    elif latest_checkpoint(out) is not None:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if is_main_process():
        _write_text_atomic(saved_config, json.dumps(config.to_dict(), indent=2))
    return checkpoint, changes


def _after_divergence(kept: Path | None, divergence: DivergenceRule, lr: float) -> str:
    """Where the run stands after a divergence, and what to do next."""
    rose = divergence.first_step_above
    if kept is not None and rose is not None and checkpoint_step(kept) >= rose - 1:
        # the weights after step rose - 1 already gave the loss above the ceiling
        return (f"the latest checkpoint {kept} holds weights from after the loss rose (step {rose}); start over "
                f"with a lower --lr (now {lr}) or more --warmup-steps")
    where = f"the last good checkpoint is {kept}" if kept else "no checkpoint was written"
    return (f"{where}. Lower --lr (now {lr}) or raise --warmup-steps, then "
            + ("continue with --resume --allow-lr-change (other arguments unchanged) or start over" if kept
               else "start over"))


def _restore_initial_lrs(optimizer, initial_lrs: list[float]) -> None:
    """``load_state_dict`` brings back the saved ``initial_lr``s; the schedule must use this run's --lr (equal
    unless --allow-lr-change let it change)."""
    for group, initial_lr in zip(optimizer.param_groups, initial_lrs):
        group["initial_lr"] = initial_lr


def train(config: TrainConfig, out_dir: str | Path | None = None, resume: bool = False, progress: bool = False,
          stop_at_step: int | None = None, measure: bool = True, cache_dir: Path | None = None,
          tensorboard: bool = True, log=None, on_model_ready=None, device: str | torch.device | None = "auto",
          allow_lr_change: bool = False, allow_data_change: bool = False, memory_check: bool = True,
          on_step=None, diagnose_every: int = 0) -> dict[str, Any]:
    """Train ``config`` and return the result dict (also written to ``out_dir/result.json``).

    ``stop_at_step`` ends this invocation early (after checkpointing) without changing the schedule;
    ``resume=True`` continues from ``out_dir``'s latest checkpoint with the run's saved tokenizer;
    ``allow_lr_change`` lets ``lr`` / ``warmup_steps`` differ on resume, ``allow_data_change`` lets the
    training text differ (both recorded in ``run.json``). ``memory_check`` refuses a run whose planned peak
    exceeds the available memory. Raises ``TrainingDiverged`` when the loss or gradient becomes NaN/Inf or
    the loss explodes (``velora.training.guards.DivergenceRule``; the last good checkpoint stays on disk).
    ``on_model_ready(model)`` is called once the model is prepared and restored (experiments use it to attach
    meters or hooks); ``on_step(row)`` after every optimizer step with the logged row (progress displays).
    ``device``: auto | cpu | cuda | cuda:N (velora.training.device); the model, batches and optimizer state live there.
    ``diagnose_every=N`` logs VeLoRA's gradient fidelity every N steps to ``diagnose.csv`` (velora.core.fidelity);
    it never changes the run's numbers.
    """
    say = log or (lambda message: print(message, file=sys.stderr))
    # torchrun: join the process group (gloo on CPU, nccl on GPUs); rank 0 alone logs and writes files,
    # rank r trains on batches r, N + r, ... of the single-process order (velora.integrations.distributed)
    device = resolve_device(device)
    init_from_env(backend="nccl" if device.type == "cuda" else "gloo")
    if not is_main_process():
        say = lambda message: None  # noqa: E731
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("--resume needs --out DIR (the run folder to continue)")
    if (allow_lr_change or allow_data_change) and not resume:
        raise ValueError("allow_lr_change / allow_data_change only apply with resume=True (--resume)")
    check_model_spec(config.model)
    checkpoint, changes = None, {}
    if out is not None:
        checkpoint, changes = _open_run_folder(config, out, resume, stop_at_step, allow_lr_change, allow_data_change)

    # data and model, seeded: an uninterrupted and a resumed run build exactly the same objects
    torch.manual_seed(config.seed)
    with main_process_first():  # rank 0 builds the tokenizer and token caches, the others then read them
        data = load_data(config, cache_dir, out if checkpoint is not None else None, allow_data_change)
    if memory_check:
        check_memory_fits(config, data.tokenizer.vocab_size, device, say)
        torch.manual_seed(config.seed)  # planning draws random numbers on fake tensors
    model = build_base_model(config, data.tokenizer.vocab_size).to(device)  # before qlora quantises on it
    init_source = None
    if config.init_from:  # a run of any method: its base weights, adapters merged (velora.training.init_from)
        from velora.training.init_from import check_same_tokenizer, load_init_weights

        check_same_tokenizer(config.init_from, data.tokenizer)
        init_source = load_init_weights(model, config.init_from)
    options = config.method_options()
    method = parse_method(config.method)
    model = prepare_model(model, method, options)
    if init_source is not None:
        from velora.training.init_from import restore_init_velora

        say(restore_init_velora(model, init_source))  # v where the target wraps the same layers; one line
    optimizer = build_optimizer(model, method, options)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    accumulator = None
    if options.flora.accumulation:
        from velora.methods.flora.method import compressed_accumulator
        from velora.optim.projections import projectable_parameters

        # attention/MLP matrices only: embeddings and the head accumulate plainly (a random projection
        # across the vocabulary smears their sparse gradients; FLoRA keeps them uncompressed too)
        params = projectable_parameters(model)
        if not params:
            raise ValueError(f"flora_accumulation: {config.model!r} has no trainable attention/MLP matrices to "
                             "compress; drop --flora-accumulation")
        accumulator = compressed_accumulator(params, options, config.accumulation_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]

    start_step = 0
    if checkpoint is not None:
        load_model_weights(model, checkpoint)
        state = load_training_state(checkpoint)
        initial_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        _restore_initial_lrs(optimizer, initial_lrs)
        if accumulator is not None:
            accumulator.load_state_dict(state["accumulator"])
        torch.set_rng_state(state["rng"])
        start_step = int(state["step"])
        say(f"resumed {out} at step {start_step}")
    if out is not None and is_main_process():
        write_atomic(out / "tokenizer.json", data.tokenizer.to_str())
        data_changed = checkpoint is not None and check_same_data(out, data.corpus.fingerprint, allow_data_change)
        record_run(out, start_step, data.corpus.fingerprint, data.tokenizer,
                   {**changes, **({"data_changed": True} if data_changed else {})})
    if on_model_ready is not None:
        on_model_ready(model)
    ddp_model = wrap_ddp(model, device)  # the model itself in one process; DDP gets device_ids on CUDA

    run_log = RunLog(out, start_step, tensorboard) if out is not None and is_main_process() else None
    rows: list[dict[str, float]] = list(run_log.rows) if run_log is not None else []
    from velora.core.fidelity import open_diagnosis_log

    fidelity_log = open_diagnosis_log(out, diagnose_every, config.method, start_step, run_log, is_main_process())
    last_step = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
    bar = _Progress(progress and is_main_process(), config.steps, start_step, f"{config.method}")  # rank 0 draws
    divergence = DivergenceRule(data.tokenizer.vocab_size)
    tokens_per_step = config.batch_size * config.accumulation_steps * config.seq_len * world_size()
    step_times: list[float] = []
    val_history: list[dict[str, float]] = []
    status = "completed" if last_step == config.steps else "stopped"
    model.train()
    try:
        for step in range(start_step, last_step):
            began = time.perf_counter()
            factor = lr_factor(step, config)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            step_loss = 0.0
            for micro in range(config.accumulation_steps):
                index = rank_batch_index(step * config.accumulation_steps + micro)
                batch = data.train.batch(index, config.batch_size).to(device, non_blocking=True)  # (B, T)
                with sync_context(ddp_model, last_micro_batch=micro == config.accumulation_steps - 1):
                    loss = ddp_model(input_ids=batch, labels=batch).loss
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(f"loss is {float(loss.detach())} at step {step + 1}")
                    (loss / config.accumulation_steps).backward()
                step_loss += float(loss.detach()) / config.accumulation_steps
            step_loss = mean_across_ranks(step_loss)  # logged: the mean over ranks
            exploded = divergence.train_loss(step + 1, step_loss)
            if exploded:
                raise TrainingDiverged(exploded)
            if fidelity_log is not None:  # on the side: the model, its grads and the RNG are left as they are
                fidelity_log.after_backward(step + 1, model, batch)
            grad_norm = _gradient_norm(trainable, config.grad_clip)
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(f"gradient norm is {grad_norm} at step {step + 1}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - began
            step_times.append(elapsed)
            row = {"step": step + 1, "loss": step_loss, "ppl": perplexity(step_loss),
                   "lr": config.lr * factor, "grad_norm": grad_norm, "tokens": (step + 1) * tokens_per_step,
                   "tokens_per_s": tokens_per_step / elapsed, "elapsed_s": sum(step_times)}
            rows.append(row)
            if run_log is not None:
                run_log.write(row)
            if on_step is not None:
                on_step(row)
            done = step + 1
            if config.eval_every and done % config.eval_every == 0 and done < config.steps:
                val_loss = evaluate(model, data.validation, config.batch_size, config.eval_batches)
                exploded = divergence.validation_loss(done, val_loss)
                if exploded:
                    raise TrainingDiverged(exploded)
                val_history.append({"step": done, "val_loss": val_loss, "val_ppl": perplexity(val_loss)})
                if run_log is not None:
                    run_log.scalar("val/ppl", perplexity(val_loss), done)
            if out is not None and config.save_every and done % config.save_every == 0 and done < last_step:
                if is_main_process() and divergence.steps_above == 0:  # no checkpoint while the loss explodes
                    save_checkpoint(out, done, model, optimizer, accumulator)
            bar.update(done, f"loss {step_loss:.3f} ppl {row['ppl']:.1f} {row['tokens_per_s']:.0f} tok/s "
                             f"rss {_rss_mib():.0f} MiB")
    except TrainingDiverged as err:
        bar.close()
        if run_log is not None:
            run_log.close()
        kept = latest_checkpoint(out) if out is not None else None
        raise TrainingDiverged(f"training stopped: {err}; {_after_divergence(kept, divergence, config.lr)}") from None
    bar.close()
    if out is not None and last_step > start_step and is_main_process():
        save_checkpoint(out, last_step, model, optimizer, accumulator)

    val_loss = evaluate(model, data.validation, config.batch_size, config.eval_batches)
    exploded = divergence.validation_loss(last_step, val_loss)
    if exploded:
        if run_log is not None:
            run_log.close()
        kept = latest_checkpoint(out) if out is not None else None
        raise TrainingDiverged(f"training stopped: {exploded}; the checkpoint {kept} holds these weights. Lower "
                               f"--lr (now {config.lr}) and start over" if kept else f"training stopped: {exploded}")
    if run_log is not None:
        run_log.scalar("val/ppl", perplexity(val_loss), last_step)
        run_log.close()
    memory: dict[str, Any] = {}
    if measure:
        memory = measure_memory(model, config.method, options, data.train.batch(0, config.batch_size).to(device))
    timed = step_times[1:] if len(step_times) > 1 else step_times  # the first step pays one-off costs
    result = {
        "status": status,
        "method": parse_method(config.method).name,
        "model": config.model,
        "steps": last_step,
        "tokens": last_step * tokens_per_step,
        "initial_loss": rows[0]["loss"] if rows else float("nan"),
        "final_loss": rows[-1]["loss"] if rows else float("nan"),
        "val_loss": val_loss,
        "val_ppl": perplexity(val_loss),
        "val_history": val_history + [{"step": last_step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)}],
        "activation_bytes": memory.get("activation_bytes"),
        "peak_bytes": memory.get("peak_bytes"),
        "peak_breakdown": memory.get("peak_breakdown"),
        "memory_source": memory.get("memory_source"),
        "tokens_per_s": (tokens_per_step * len(timed) / sum(timed)) if timed else None,
        "step_time_s": (sum(timed) / len(timed)) if timed else None,
        "step_time_median_s": sorted(timed)[len(timed) // 2] if timed else None,
        "accumulation_buffer_bytes": accumulator.buffer_bytes() if accumulator is not None else None,
        "naive_accumulation_bytes": accumulator.naive_buffer_bytes() if accumulator is not None else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "lr": config.lr,
        "data_fingerprint": data.corpus.fingerprint,
        "tokenizer": {"name": data.tokenizer.name, "vocab_size": data.tokenizer.vocab_size,
                      "identity": data.tokenizer.identity()},
        "train_tokens_available": data.train.n_tokens,
        "loss_curve": [[int(r["step"]), r["loss"]] for r in rows],
        "config": config.to_dict(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
    }
    if out is not None and is_main_process():
        _write_text_atomic(out / "result.json", json.dumps(result, indent=2))
    if is_distributed():
        del ddp_model
        shutdown()  # barrier, then leave the process group (see velora.integrations.distributed.shutdown)
    result["_tokenizer"] = data.tokenizer
    result["_model"] = model  # in-process callers (experiments) may inspect it; dropped from JSON output
    return result


def public_result(result: dict[str, Any]) -> dict[str, Any]:
    """The result without in-process objects (what ``--json`` prints)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
