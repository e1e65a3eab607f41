"""``velora train --parallel fsdp2``: shard a prepared model with FSDP2 (``fully_shard``) and checkpoint it through
``torch.distributed.checkpoint`` (DCP).

Each decoder block (every child of the model's largest ``nn.ModuleList``) is one FSDP2 unit and the root holds the
rest (embeddings, final norm, head); it runs after the method has prepared the model (``apply_velora``, adapters)
and before the optimizer is built, so the optimizer sees the sharded (DTensor) parameters. Gradients are
reduce-scattered after every micro-batch (FSDP2's default), which is what the compressed accumulator's hooks read.

Methods: full, velora, galore, flora (momentum and ``--flora-accumulation``) and gradnormlorp, with or without
+velora; the others are refused in one line (use DDP, the default): lora/dora/qlora (peft adapters and 4-bit weights
are untested / cannot be sharded here), +ckpt (untested with FSDP2 here) and the 8-bit optimizer state (its blocks
follow each rank's shard and cannot be resharded).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("ddp", "fsdp2")
FSDP2_BASES = ("full", "galore", "flora", "gradnormlorp")

__all__ = ["PARALLEL_MODES", "check_parallel", "shard_model", "is_fsdp2", "save_dcp", "load_dcp", "DCP_FOLDER"]

DCP_FOLDER = "dcp"  # inside a step folder: the sharded model, optimizer and accumulator state


def check_parallel(parallel: str, method, options, world: int, diagnose_every: int = 0) -> bool:
    """True for FSDP2, False for DDP; one-line errors for a ``--parallel`` mode, method or option FSDP2 cannot run
    here."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"--parallel {parallel!r} is not one of {PARALLEL_MODES}; use ddp (the default) or fsdp2")
    if parallel != "fsdp2":
        return False
    if world < 2:
        raise ValueError("--parallel fsdp2 shards the model over the ranks of a torchrun group; launch with "
                         "`torchrun --nproc-per-node N -m velora train ...` (N >= 2) or drop --parallel")
    if method.base not in FSDP2_BASES or method.checkpointing:
        raise ValueError(f"--parallel fsdp2 does not support method {method.name!r} (FSDP2 runs "
                         f"{', '.join(FSDP2_BASES)}, each optionally +velora, without +ckpt); use --parallel ddp "
                         "(DDP, the default)")
    if diagnose_every:
        raise ValueError(f"--diagnose-every {diagnose_every} diagnoses on process rank 0 alone, which a model sharded "
                         "over every rank cannot run; drop --diagnose-every, or use --parallel ddp (the default)")
    if options.optim.name == "adamw8bit":
        raise ValueError("--parallel fsdp2 cannot checkpoint --optimizer adamw8bit (its 8-bit blocks follow each "
                         "rank's shard); use --optimizer adamw, or --parallel ddp (DDP, the default)")
    return True


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of the ``nn.ModuleList`` holding the most parameters (a transformer's decoder blocks)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    largest = max(lists, key=lambda blocks: sum(p.numel() for p in blocks.parameters()))
    return list(largest)


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` every decoder block, then the root, on a 1-D mesh over the whole group (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in _decoder_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_fsdp2(model: nn.Module) -> bool:
    """True for a model ``fully_shard`` has wrapped."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _state(model: nn.Module, optimizer, accumulator) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if accumulator is not None:
        state["accumulator"] = accumulator.state_dict()
    return state


def save_dcp(folder: Path, model: nn.Module, optimizer, accumulator=None) -> None:
    """Every rank writes its shards of the model, optimizer and accumulator state into ``folder`` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer, accumulator), checkpoint_id=str(folder))


def load_dcp(folder: Path, model: nn.Module, optimizer, accumulator=None) -> None:
    """Load what ``save_dcp`` wrote, resharded to this group's world size (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not (Path(folder) / ".metadata").exists():
        raise ValueError(f"{folder} holds no DCP checkpoint (no .metadata); this checkpoint was not saved under "
                         "--parallel fsdp2: resume it with --parallel ddp")
    state = _state(model, optimizer, accumulator)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if accumulator is not None:
        accumulator.load_state_dict(state["accumulator"])
