"""`velora demo`: a one-minute look at VeLoRA — train a tiny LLaMA on standard-library source bytes with
and without VeLoRA, and print the loss and the saved-activation bytes measured for each."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

# the demo is a one-minute look on a CPU: attention memory grows with batch x seq^2, so larger settings belong
# to `velora train` / `velora plan`
MAX_BATCH = 64
MAX_SEQ = 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    parser.add_argument("--batch", type=int, default=8, help=f"sequences per step, 1..{MAX_BATCH} (default 8)")
    parser.add_argument("--seq", type=int, default=128, help=f"tokens per sequence, 2..{MAX_SEQ} (default 128)")
    parser.add_argument("--sub-token-size", type=int, default=32, help="VeLoRA sub-token size M (default 32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")


def _stdlib_bytes(limit: int = 400_000) -> torch.Tensor:
    """Byte-level tokens from the running Python's standard library (read at run time, never shipped)."""
    root = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as fh:
                data = fh.read()
            chunks.append(data)
            total += len(data)
            if total >= limit:
                break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def _run(method: str, tokens: torch.Tensor, args) -> dict:
    from velora import VeLoRAConfig, apply_velora
    from velora.memory import SavedActivationMeter
    from velora.training.device import resolve_device
    from velora.training.models import build_config, build_model

    device = resolve_device(getattr(args, "device", "auto"))

    torch.manual_seed(0)
    model = build_model(build_config("llama-small", vocab_size=256, max_position_embeddings=args.seq)).to(device)
    if method == "velora":
        apply_velora(model, VeLoRAConfig(sub_token_size=args.sub_token_size, target_modules="paper"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    span = args.seq + 1
    losses, step_times = [], []
    for _ in range(args.steps):
        starts = torch.randint(0, tokens.numel() - span, (args.batch,), generator=generator)
        batch = torch.stack([tokens[s : s + span] for s in starts.tolist()]).to(device)  # (B, S+1)
        start = time.perf_counter()
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise ValueError(f"{method}: loss became {loss.item()}; lower the learning rate")
        losses.append(loss.item())
    with SavedActivationMeter(model) as meter:
        # keep the loss alive until the block ends: the meter counts what the autograd graph still holds
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
    del loss
    return {"method": method, "initial_loss": losses[0], "final_loss": sum(losses[-5:]) / 5,
            "activation_bytes": meter.total_bytes, "step_s": sorted(step_times)[len(step_times) // 2]}


def check_arguments(args) -> None:
    """One-line errors for settings the demo cannot run."""
    if args.steps < 5:
        raise ValueError(f"--steps={args.steps} is too few to compare losses; use --steps 5 or more")
    if not 1 <= args.batch <= MAX_BATCH:
        raise ValueError(f"--batch={args.batch} must be between 1 and {MAX_BATCH}; try --batch 8")
    if not 2 <= args.seq <= MAX_SEQ:
        raise ValueError(f"--seq={args.seq} must be between 2 and {MAX_SEQ} (the demo's model attends over "
                         "the whole sequence); try --seq 128, or `velora plan` for longer sequences")
    if args.sub_token_size < 1:
        raise ValueError(f"--sub-token-size={args.sub_token_size} must be >= 1; try --sub-token-size 32")


def run(args) -> int:
    check_arguments(args)
    tokens = _stdlib_bytes()
    rows = [_run(method, tokens, args) for method in ("full", "velora")]
    full, compressed = rows
    saved = 1 - compressed["activation_bytes"] / full["activation_bytes"]
    if args.json:
        print(json.dumps({"rows": rows, "activation_saving": saved}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tiny LLaMA, {args.steps} steps, batch {args.batch} x seq {args.seq} (stdlib bytes)")
    for column in ("method", "first loss", "final loss", "saved activations", "step time"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["method"], f"{row['initial_loss']:.3f}", f"{row['final_loss']:.3f}",
                      f"{row['activation_bytes'] / 2**20:.2f} MiB", f"{row['step_s'] * 1e3:.0f} ms")
    console = Console()
    console.print(table)
    console.print(f"VeLoRA (M={args.sub_token_size}, value + down projections) keeps {saved:.1%} fewer "
                  "saved-activation bytes, measured by velora.memory.SavedActivationMeter.")
    return 0
