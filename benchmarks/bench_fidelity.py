"""VeLoRA gradient fidelity over training on `velora compare`'s model and setting (issue 17, the measurement).

Trains the `velora` method exactly as `velora compare` does (llama-small, M = 4 on v_proj + down_proj, the tuned
lr and the 1000-step schedule) but stops at --stop-at-step, diagnosing every --every steps
(`velora train --diagnose-every`), then prints the median energy and gradient cosine per layer as markdown.

    python benchmarks/bench_fidelity.py --out /tmp/fidelity              # paper init, 300 of 1000 steps (~5 min)
    python benchmarks/bench_fidelity.py --init random --out /tmp/fid-r   # the same with a seeded random v
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from velora.experiments.compare import RANK, SETTING, SUB_TOKEN_SIZE, TUNED_LR, UPDATE_GAP, method_overrides
from velora.training.loop import TrainConfig, train


def median_table(path: Path, chance: float) -> str:
    by_layer: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with open(path) as fh:
        for row in csv.DictReader(fh):
            by_layer[row["layer"]].append((float(row["energy"]), float(row["cosine"])))
    lines = [f"| layer | median energy (chance {chance:.2f}) | median grad cosine | cosine range |",
             "|---|---:|---:|---:|"]
    for layer, values in by_layer.items():
        cosines = [c for _, c in values]
        lines.append(f"| `{layer}` | {statistics.median(e for e, _ in values):.3f} | {statistics.median(cosines):.3f} "
                     f"| {min(cosines):.3f}–{max(cosines):.3f} |")
    every = [c for values in by_layer.values() for _, c in values]
    lines.append(f"| all layers | {statistics.median(e for v in by_layer.values() for e, _ in v):.3f} "
                 f"| {statistics.median(every):.3f} | {min(every):.3f}–{max(every):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder (must not hold a run)")
    parser.add_argument("--init", default="batch_average_once", help="VeLoRA init (default: the paper's)")
    parser.add_argument("--stop-at-step", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = method_overrides("velora", RANK, SUB_TOKEN_SIZE, UPDATE_GAP)
    overrides["velora"]["init"] = args.init
    config = TrainConfig(method="velora", lr=TUNED_LR["velora"], **SETTING, **overrides)
    result = train(config, args.out, stop_at_step=args.stop_at_step, measure=False, tensorboard=False,
                   diagnose_every=args.every)
    print(f"velora (init {args.init}), steps 1-{args.stop_at_step} of {config.steps}, diagnosed every {args.every}; "
          f"train loss {result['initial_loss']:.3f} -> {result['final_loss']:.3f}, val ppl {result['val_ppl']:.2f}\n")
    print(median_table(Path(args.out) / "diagnose.csv", 1 / SUB_TOKEN_SIZE))


if __name__ == "__main__":
    main()
