"""``Checkpointer``: the ``checkpoints/`` folder of one run — atomic step folders, the ``latest`` pointer, and
reading a checkpoint back (one line naming a torn or corrupt file).

A checkpoint is written into a temporary folder that is fsynced and renamed into place, and only then does the
``latest`` pointer change (itself written to a temporary and renamed, ``velora.training.runfiles``): a crash at
any moment leaves the previous checkpoint complete and pointed to. It holds the model (safetensors, VeLoRA
buffers included), the optimizer state, the accumulator state and the torch RNG state.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from velora.training.guards import TrainingDiverged
from velora.training.runfiles import (
    RunFolderError,
    ensure_folder,
    fsync_files,
    read_latest_pointer,
    refuse_symlink,
    remove_quietly,
    temporary_step_folder,
    why,
    write_atomic,
)

CHECKPOINT_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"


def _write_failures() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, RuntimeError, SafetensorError)  # torch.save reports a full disk as a RuntimeError


_WRITE_FAILURES = _write_failures()


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


class Checkpointer:
    """Writes and reads ``out_dir/checkpoints/step-NNNNNNN`` folders; keeps the newest ``keep_last`` of them."""

    def __init__(self, out_dir: str | Path, keep_last: int = 1) -> None:
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        """The step folder ``checkpoints/latest`` names (validated: a complete step folder inside checkpoints/),
        or None without a pointer."""
        path = read_latest_pointer(self.root)
        if path is None:
            return None
        if not (path / MODEL_FILE).exists() or not (path / STATE_FILE).exists():
            raise ValueError(f"checkpoint {path} named by {self.root / 'latest'} is incomplete; delete "
                             f"{self.root} to restart")
        return path

    def save(self, step: int, model: nn.Module, optimizer, accumulator=None) -> Path:
        """Write ``step-XXXXXXX`` atomically, point ``latest`` at it, drop older folders past ``keep_last``. An FSDP2
        model is saved by every rank together (``velora.training.sharded_checkpoint``)."""
        from velora.integrations.fsdp2 import is_fsdp2

        if is_fsdp2(model):
            from velora.training.sharded_checkpoint import save_sharded

            return save_sharded(self, step, model, optimizer, accumulator, CHECKPOINT_VERSION)
        ensure_folder(self.root)
        _refuse_non_finite(model, step)
        final = self.root / f"step-{step:07d}"
        refuse_symlink(final)
        state = {
            "version": CHECKPOINT_VERSION,
            "step": step,
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "accumulator": accumulator.state_dict() if accumulator is not None else None,
        }
        self._write_step_folder(final, step, model, state)
        self._point_at(final)
        return final

    def _point_at(self, final: Path) -> None:
        write_atomic(self.root / "latest", final.name)  # no-follow temporary, fsync, rename
        self._drop_old(final)

    def publish(self, tmp: Path, final: Path, step: int) -> None:
        """A complete temporary step folder (written by every FSDP2 rank) fsynced, renamed into place, pointed at."""
        try:
            fsync_files(tmp)
            self._move_into_place(tmp, final)
        except _WRITE_FAILURES as err:
            raise self._write_error(step, err) from None
        self._point_at(final)

    def restore(self, checkpoint: Path, model: nn.Module, optimizer, accumulator=None) -> int:
        """Load ``checkpoint`` into the model, optimizer, accumulator and the torch RNG; returns its step. The
        optimizer keeps this run's ``initial_lr`` (equal unless --allow-lr-change let --lr change)."""
        from velora.integrations.fsdp2 import is_fsdp2
        from velora.training.sharded_checkpoint import is_sharded_checkpoint, restore_sharded

        if is_sharded_checkpoint(checkpoint) != is_fsdp2(model):
            saved, here = ("fsdp2", "ddp") if is_sharded_checkpoint(checkpoint) else ("ddp", "fsdp2")
            raise ValueError(f"checkpoint {checkpoint} was saved under --parallel {saved} but this run uses "
                             f"--parallel {here}; resume with --parallel {saved}")
        initial_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        if is_fsdp2(model):  # model, optimizer and accumulator through DCP, resharded to this world size
            state = restore_sharded(checkpoint, model, optimizer, accumulator)
        else:
            load_model_weights(model, checkpoint)
            state = load_training_state(checkpoint)
            optimizer.load_state_dict(state["optimizer"])  # brings back the saved initial_lr: put this run's back
            if accumulator is not None:
                accumulator.load_state_dict(state["accumulator"])
        for group, initial_lr in zip(optimizer.param_groups, initial_lrs):
            group["initial_lr"] = initial_lr
        torch.set_rng_state(state["rng"])
        return int(state["step"])

    def _write_step_folder(self, final: Path, step: int, model: nn.Module, state: dict[str, Any]) -> None:
        tmp = temporary_step_folder(self.root, step, os.getpid())
        try:
            _write_checkpoint_folder(tmp, model, state)
            self._move_into_place(tmp, final)
        except BaseException as err:
            remove_quietly(tmp)  # also on KeyboardInterrupt: no temporary is left behind
            if isinstance(err, _WRITE_FAILURES):
                raise self._write_error(step, err) from None
            raise

    def _move_into_place(self, tmp: Path, final: Path) -> None:
        if final.exists():
            shutil.rmtree(final)  # re-saving a step: the pointer may still name it, so point away first
        os.replace(tmp, final)
        _fsync_dir(self.root)

    def _drop_old(self, final: Path) -> None:
        kept = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in kept[:-self.keep_last] if self.keep_last > 0 else []:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def _write_error(self, step: int, err: BaseException) -> RunFolderError:
        previous = read_latest_pointer(self.root)
        kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
        if isinstance(err, OSError):
            reason = why(err)
        else:  # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos ..."
            free_mib = shutil.disk_usage(self.root).free / 2**20
            reason = (f"{type(err).__name__}: {str(err).splitlines()[0][:100]}; {free_mib:.1f} MiB left on the "
                      "device, probably full: free space (or choose another --out), then --resume")
        return RunFolderError(f"cannot write checkpoint step {step} into {self.root} ({reason}); {kept}")


def non_finite_entries(model: nn.Module) -> list[str]:
    """Names of the model's floating-point state holding NaN/Inf (this rank's shard of an FSDP2 tensor)."""
    from velora.optim.sharded import local

    return [name for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(local(tensor)).all())]


def _refuse_non_finite(model: nn.Module, step: int) -> None:
    bad = non_finite_entries(model)
    if bad:
        raise TrainingDiverged(f"refusing to checkpoint step {step}: {bad[0]} holds NaN/Inf")


def _write_checkpoint_folder(tmp: Path, model: nn.Module, state: dict[str, Any]) -> None:
    """Model and training state into a fresh temporary folder, fsynced (the caller renames it into place)."""
    remove_quietly(tmp)
    tmp.mkdir()
    _write_model(model, tmp / MODEL_FILE)
    _write_training_state(state, tmp / STATE_FILE)
    fsync_files(tmp)


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer, accumulator=None,
                    keep_last: int = 1) -> Path:
    """``Checkpointer(out_dir, keep_last).save(...)``."""
    return Checkpointer(out_dir, keep_last).save(step, model, optimizer, accumulator)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """``Checkpointer(out_dir).latest()``: the step folder ``checkpoints/latest`` names, or None."""
    return Checkpointer(out_dir).latest()


# ---- reading back ----------------------------------------------------------------------------------


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

    path = Path(checkpoint) / MODEL_FILE
    check_readable_safetensors(path)
    load_model(model, str(path))


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    try:
        # on the CPU first: optimizer.load_state_dict and the accumulator move state to their parameters' device,
        # so a run saved on a GPU resumes on any device
        return torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise _unreadable(path, err) from None
