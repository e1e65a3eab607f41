"""`velora plan`: predicted peak training memory, on fake tensors (no real allocation).

    velora plan --model llama-7b --method qlora+velora --batch 1 --seq 512 --dtype bf16
    velora plan --model path/to/config.json --method galore --optimizer adamw8bit --json
"""

from __future__ import annotations

import argparse
import json

from velora.core.subtoken import COEFFICIENT_SCALES
from velora.memory.peak import CATEGORIES
from velora.methods.options import add_option_flags, options_from_flags

GIB = 2**30
MIB = 2**20
_NOT_PLAN_FLAGS = ("optimizer", "flora_accumulation")
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _plan_dtype(name: str) -> str:
    from velora.training.models import canonical_dtype

    try:
        return SHORT_DTYPE[canonical_dtype(name)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def size_unit(nbytes: int) -> tuple[str, int]:
    """MiB below 1 GiB, GiB from there: a tiny model's table is not a column of 0.00."""
    return ("GiB", GIB) if nbytes >= GIB else ("MiB", MIB)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="preset (llama-60m … llama-13b, gpt2, roberta-base, "
                        "vit-base) or a path to a config.json / model directory")
    parser.add_argument("--method", default="full", help="full, lora, dora, qlora, galore, flora, gradnormlorp, "
                        "velora; modifiers +velora +ckpt (e.g. lora+velora, qlora+velora+ckpt)")
    parser.add_argument("--optimizer", default="adamw", help="adamw, adafactor or adamw8bit (default adamw)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (ViT: patches + 1; default 512)")
    parser.add_argument("--dtype", default="fp32", type=_plan_dtype, metavar="{fp32,bf16,fp16}",
                        help="weights, activations and optimizer state dtype (float32 / bfloat16 / float16 "
                             "spellings accepted too; default fp32)")
    parser.add_argument("--sub-token-size", type=int, default=None, help="VeLoRA sub-token size M (default 32)")
    parser.add_argument("--velora-targets", default=None,
                        help="comma-separated VeLoRA target modules (default 'paper' = value + MLP down proj)")
    parser.add_argument("--velora-rank", type=int, default=None,
                        help="VeLoRA directions per sub-token, r (default 1, the paper's)")
    parser.add_argument("--velora-coefficient-bits", type=int, default=None, choices=(8, 4),
                        help="keep VeLoRA's coefficients as 8- or 4-bit integers (default: the activations' dtype)")
    parser.add_argument("--velora-coefficient-scales", default=None, choices=COEFFICIENT_SCALES,
                        help="with --velora-coefficient-bits: token_and_column (default) or token")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    # the method options, generated from the method configs as for `velora train` (--optimizer is plan()'s own;
    # the planner models one micro-batch step, so compressed accumulation has no flag here)
    add_option_flags(parser.add_argument_group("method options"), skip=_NOT_PLAN_FLAGS)


def _options(args: argparse.Namespace) -> dict:
    options = options_from_flags(args, skip=_NOT_PLAN_FLAGS)  # values are checked by the method configs
    if args.sub_token_size is not None:
        if args.sub_token_size <= 0:
            raise ValueError(f"--sub-token-size={args.sub_token_size} must be a positive integer")
        options["sub_token_size"] = args.sub_token_size
    if args.velora_targets is not None:
        targets = [t.strip() for t in args.velora_targets.split(",") if t.strip()]
        if not targets:
            raise ValueError(f"--velora-targets={args.velora_targets!r} names no module; e.g. v_proj,down_proj")
        options["velora_target_modules"] = targets
    for name in ("rank", "coefficient_bits", "coefficient_scales"):  # checked by VeLoRAConfig, one line each
        if getattr(args, f"velora_{name}") is not None:
            options[f"velora_{name}"] = getattr(args, f"velora_{name}")
    return options


def render(result: dict) -> None:
    """A rich table: one row per category, in MiB or GiB (by the peak's size) with two decimals."""
    from rich.console import Console
    from rich.table import Table

    peak = result["peak_bytes"]
    title = (f"{result['model']} · {result['method']} · {result['optimizer']} · batch {result['batch']} × "
             f"seq {result['seq']} · {result['dtype']}")
    console = Console()
    console.print(title, highlight=False)
    table = Table()
    table.add_column("category")
    unit, scale = size_unit(peak)
    table.add_column(unit, justify="right")
    table.add_column("share", justify="right")
    for name in CATEGORIES:
        nbytes = result["breakdown"][name]
        table.add_row(name.replace("_", " "), f"{nbytes / scale:.2f}", f"{nbytes / peak:.0%}" if peak else "-")
    table.add_row("[bold]peak[/bold]", f"[bold]{peak / scale:.2f}[/bold]", "")
    console.print(table)
    params, trainable = result["parameter_count"], result["trainable_parameter_count"]
    console.print(f"{params / 1e6:,.1f}M parameters, {trainable / 1e6:,.2f}M trainable; saved for backward "
                  f"after the forward: {_size(result['saved_activation_bytes'])}", highlight=False)
    console.print(f"peak of the 2nd training step, planned on fake tensors in {result['seconds']:.1f} s",
                  highlight=False)
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False)


def _size(nbytes: int) -> str:
    unit, scale = size_unit(nbytes)
    return f"{nbytes / scale:.2f} {unit}"


def run(args: argparse.Namespace) -> int:
    from velora.memory.planner import plan

    result = plan(args.model, args.method, args.optimizer, batch=args.batch, seq=args.seq, dtype=args.dtype,
                  **_options(args))
    if args.json:
        print(json.dumps(result))
    else:
        render(result)
    return 0
