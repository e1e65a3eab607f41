"""VeLoRA gradient fidelity over training on `velora compare`'s model and setting (issue 17).

Trains compare's velora row (llama-small, 1000 steps, its lr and schedule) once per (variant, seed), diagnosing
every --every steps (`velora train --diagnose-every`), appends each finished run to OUT/runs.jsonl (a stopped study
resumes: finished runs are not trained again) and writes OUT/results.md: per variant the median gradient cosine over
training, the measured saved-activation bytes and the val ppl, means over the seeds run; per wrapped layer the
median cosine. Variants: velora.experiments.fidelity_study.VARIANTS.

    python benchmarks/bench_fidelity.py --seeds 0                        # every variant, seed 0 (~3 min a run)
    python benchmarks/bench_fidelity.py --variants paper,svd-r2-M8 --seeds 1,2
    python benchmarks/bench_fidelity.py --stop-at-step 300                 # screening: steps 1-300 of 1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from velora.experiments.fidelity_study import VARIANTS, keep_diagnose_logs, read_records, render, run_study

DEFAULT_OUT = Path(__file__).parent / "results" / "fidelity"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"study folder (default {DEFAULT_OUT})")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (model init and batch order)")
    parser.add_argument("--every", type=int, default=50, help="steps between diagnoses (default 50)")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="screening: stop each run here, the schedule unchanged (default: the whole run)")
    parser.add_argument("--table-only", action="store_true", help="write results.md from runs.jsonl, train nothing")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} must be comma-separated integers, e.g. 0,1,2")
    torch.set_num_threads(1)
    if args.table_only:
        keep_diagnose_logs(args.out)
        records = read_records(args.out / "runs.jsonl")
    else:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        records = run_study(variants, seeds, args.out, args.every, stop_at_step=args.stop_at_step)
    table = render(records)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("# VeLoRA gradient fidelity over training (velora compare's setting)\n\n"
                                         f"{table}\n")
    print(table)


if __name__ == "__main__":
    main()
