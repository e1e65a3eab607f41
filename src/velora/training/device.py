"""``--device auto|cpu|cuda|cuda:N``: which device a run trains on, checked before anything is built.

``auto`` takes CUDA when torch sees a GPU and the CPU otherwise. Under torchrun (WORLD_SIZE > 1) each process
takes ``cuda:LOCAL_RANK`` for ``auto`` and ``cuda``; a fixed ``cuda:N`` would put every process on one GPU and
is refused there.
"""

from __future__ import annotations

import os

import torch

CHOICES = "auto, cpu, cuda or cuda:N"


def _several_processes() -> bool:
    """True under torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _cuda_device(index: int | None, spec: str) -> torch.device:
    if not torch.cuda.is_available():
        raise ValueError(f"--device {spec!r}: torch {torch.__version__} sees no CUDA device "
                         f"(built with CUDA {torch.version.cuda}); use --device cpu or auto")
    if index is None:
        index = int(os.environ.get("LOCAL_RANK", "0")) if _several_processes() else torch.cuda.current_device()
    elif _several_processes():
        raise ValueError(f"--device {spec!r} under torchrun would put every rank on one GPU; pass --device cuda "
                         "(each rank takes cuda:LOCAL_RANK)")
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"--device {spec!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``spec`` (auto | cpu | cuda | cuda:N), or a one-line ValueError saying why not."""
    if spec is None:
        spec = "auto"
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise TypeError(f"device={spec!r} must be a string ({CHOICES}) or a torch.device")
    text = spec.strip().lower()
    if text == "auto":
        return _cuda_device(None, "cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {spec!r} is not a device; use {CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"--device {spec!r}: only {CHOICES} are supported")
    return _cuda_device(device.index, spec)
