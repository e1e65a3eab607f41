"""`velora bench <experiment>`: reproduce one of the papers' ablation tables at CPU scale.

Each experiment writes results.md, results.json and a PNG with the paper's numbers beside ours into
``velora-runs/bench/<experiment>`` (the pre-trained base model the fine-tuning ablations share is
cached in ``velora-runs/bench/shared``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

from velora.experiments.ablation import add_common_arguments, print_summary, stderr_say
from velora.experiments.common import write_json

EXPERIMENTS = {
    "subtoken": ("velora.experiments.bench_subtoken", "VeLoRA Tab. 5b: sub-token size M = D/64 … D/8"),
    "init": ("velora.experiments.init", "VeLoRA Tab. 5c: random / SVD / fixed average / running average v"),
    "layers": ("velora.experiments.bench_layers", "VeLoRA Tab. 6: q, k, v, down combinations"),
    "convergence": ("velora.experiments.convergence", "VeLoRA Tab. 5a: LoRA vs LoRA+VeLoRA per epoch"),
    "flora-rank": ("velora.experiments.flora_rank", "FLoRA Tab. 1: compressed accumulation memory/quality vs r"),
    "flora-kappa": ("velora.experiments.flora_kappa", "FLoRA Tab. 3: momentum resampling interval kappa"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS),
                        help="; ".join(f"{name}: {text}" for name, (_m, text) in EXPERIMENTS.items()))
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps={args.steps} must be >= 1")
    out = Path(args.out or f"velora-runs/bench/{args.experiment}")
    out.mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(EXPERIMENTS[args.experiment][0])
    started = time.perf_counter()
    summary = module.run_experiment(args, out, stderr_say)
    summary["runtime_s"] = time.perf_counter() - started
    record = out / "results.json"
    if record.exists():  # the wall time goes into the record too (the experiment wrote it before it was known)
        write_json(record, {**json.loads(record.read_text()), "runtime_s": summary["runtime_s"]})
    print_summary(summary, args.json, out)
    if not args.json:
        print(f"runtime {summary['runtime_s'] / 60:.1f} min")
    return 0
