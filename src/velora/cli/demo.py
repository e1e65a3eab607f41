"""`velora demo`: a one-minute look at VeLoRA — train a small LLaMA on standard-library source bytes with
and without VeLoRA (``velora train``'s loop and data path), and print the loss and the saved-activation bytes
measured for each."""

from __future__ import annotations

import argparse
import json

from velora.training.config import TrainConfig

# the demo is a one-minute look on a CPU: attention memory grows with batch x seq^2, so larger settings belong
# to `velora train` / `velora plan`
MAX_BATCH = 64
MAX_SEQ = 2048
DEMO_TRAIN_CHARS = 400_000  # of the stdlib's source: plenty for a few dozen steps, tokenized in a moment
DEMO_VAL_CHARS = 40_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    parser.add_argument("--batch", type=int, default=8, help=f"sequences per step, 1..{MAX_BATCH} (default 8)")
    parser.add_argument("--seq", type=int, default=128, help=f"tokens per sequence, 2..{MAX_SEQ} (default 128)")
    parser.add_argument("--sub-token-size", type=int, default=32, help="VeLoRA sub-token size M (default 32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")


def demo_config(method: str, args) -> TrainConfig:
    """The run ``velora train`` would do for the demo: a small LLaMA on byte-level stdlib source, a constant
    learning rate, evaluated on one validation batch."""
    return TrainConfig(method=method, model="llama-small", data="stdlib", tokenizer="byte",
                       max_train_chars=DEMO_TRAIN_CHARS, max_val_chars=DEMO_VAL_CHARS, seq_len=args.seq,
                       batch_size=args.batch, steps=args.steps, lr=2e-3, warmup_steps=0, min_lr_ratio=1.0,
                       grad_clip=0.0, eval_batches=1,
                       velora={"sub_token_size": args.sub_token_size, "target_modules": "paper"})


def _run(method: str, args) -> dict:
    """One demo run through ``velora.training.loop.train`` (no run folder: nothing is written but train's token
    cache); the saved activations are what train measures (``SavedActivationMeter`` on one training forward)."""
    from velora.training.loop import TrainingDiverged, train

    try:
        result = train(demo_config(method, args), device=args.device, measure=True, memory_check=False,
                       tensorboard=False)
    except TrainingDiverged as err:
        raise ValueError(f"{method}: {err}") from None
    losses = [loss for _, loss in result["loss_curve"]]
    return {"method": method, "initial_loss": losses[0], "final_loss": sum(losses[-5:]) / 5,
            "activation_bytes": result["activation_bytes"], "step_s": result["step_time_median_s"]}


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
    rows = [_run(method, args) for method in ("full", "velora")]
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
