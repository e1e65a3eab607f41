"""Checkpoints of a run under ``--parallel fsdp2``: every rank calls ``save_sharded`` / ``restore_sharded``.

The step folder is the one a single-process run writes (``model.safetensors`` whole, ``training_state.pt`` with the
step and rank 0's RNG state, so ``--init-from`` and inspection work unchanged) plus ``dcp/``: the sharded model,
optimizer and accumulator state through ``torch.distributed.checkpoint``, which a resume at any world size reshards.
It is written into one temporary folder all ranks share and renamed into place by rank 0 only after every rank's
shards are written, so a crash leaves the previous checkpoint complete and pointed to.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from velora.integrations.fsdp2 import DCP_FOLDER, load_dcp, save_dcp
from velora.training.guards import TrainingDiverged
from velora.training.runfiles import ensure_folder, refuse_symlink, remove_quietly, temporary_step_folder

__all__ = ["save_sharded", "restore_sharded", "is_sharded_checkpoint"]


def is_sharded_checkpoint(checkpoint: Path) -> bool:
    return (Path(checkpoint) / DCP_FOLDER).is_dir()


def _refuse_non_finite(model: nn.Module, step: int) -> None:
    """Every rank checks its shards; all of them raise together when any holds NaN/Inf."""
    from velora.training.checkpoint import non_finite_entries

    bad = non_finite_entries(model)
    flag = torch.tensor([float(bool(bad))])
    dist.all_reduce(flag)
    if float(flag) > 0:
        raise TrainingDiverged(f"refusing to checkpoint step {step}: the model holds NaN/Inf"
                               + (f" ({bad[0]} on this rank)" if bad else ""))


def _whole_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state on rank 0 (CPU), empty elsewhere (collective); a tensor sharing storage with an earlier
    one (tied weights) gets its own copy so safetensors can write it, the rest are taken as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen, result = set(), {}
    for name, tensor in whole.items():
        storage = tensor.untyped_storage().data_ptr()
        result[name] = tensor.detach().clone() if storage in seen else tensor.detach().contiguous()
        seen.add(storage)
    return result


def _agree(failure: BaseException | None) -> None:
    """Every rank learns whether rank 0's writing failed (and raises), instead of waiting in a barrier."""
    flag = torch.tensor([0.0 if failure is None else 1.0])
    dist.broadcast(flag, src=0)
    if failure is not None:
        raise failure
    if float(flag) > 0:
        raise RuntimeError("process rank 0 failed to write the checkpoint; see its error")


def save_sharded(checkpointer, step: int, model: nn.Module, optimizer, accumulator, version: int) -> Path:
    """Write ``checkpoints/step-NNNNNNN`` of an FSDP2 model (every rank calls it; rank 0 renames and points)."""
    from safetensors.torch import save_file

    from velora.training.checkpoint import MODEL_FILE, STATE_FILE

    main = dist.get_rank() == 0
    root = checkpointer.root
    writer = [os.getpid()]  # rank 0 writes the folder: its pid names it, so a crashed save is cleaned up later
    dist.broadcast_object_list(writer, src=0)
    final, tmp = root / f"step-{step:07d}", temporary_step_folder(root, step, writer[0])
    _refuse_non_finite(model, step)
    failure = None
    if main:
        try:
            ensure_folder(root)
            refuse_symlink(final)
            remove_quietly(tmp)
            tmp.mkdir()
        except (OSError, ValueError) as err:  # a symlink, a full disk: every rank learns of it, none waits
            failure = err
    _agree(failure)
    save_dcp(tmp / DCP_FOLDER, model, optimizer, accumulator)
    whole = _whole_model(model)
    failure = None
    if main:
        try:
            save_file(whole, str(tmp / MODEL_FILE))
            torch.save({"version": version, "step": step, "rng": torch.get_rng_state(), "parallel": "fsdp2"},
                       tmp / STATE_FILE)
            checkpointer.publish(tmp, final, step)
        except BaseException as err:  # the others must not wait for rank 0 forever
            remove_quietly(tmp)
            failure = err
    _agree(failure)
    return final


def restore_sharded(checkpoint: Path, model: nn.Module, optimizer, accumulator) -> dict:
    """Load ``dcp/`` into the FSDP2 model, optimizer and accumulator (resharded to this world size); returns the
    training state (step, RNG)."""
    from velora.training.checkpoint import load_training_state

    load_dcp(Path(checkpoint) / DCP_FOLDER, model, optimizer, accumulator)
    return load_training_state(checkpoint)

