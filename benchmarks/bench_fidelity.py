"""VeLoRA gradient fidelity over training on `velora compare`'s model and setting (issue 17).

Trains compare's velora row (llama-small, 1000 steps, its lr and schedule) once per (variant, seed), diagnosing
every --every steps (`velora train --diagnose-every`), appends each finished run to OUT/runs.jsonl (a stopped study
resumes: finished runs are not trained again) and writes OUT/results.md: per variant the median gradient cosine over
training, the measured saved-activation bytes and the val ppl, means over the seeds run; per wrapped layer the
median cosine. Variants: velora.experiments.fidelity_study.VARIANTS.

    python benchmarks/bench_fidelity.py --seeds 0                        # every variant, seed 0 (~3 min a run)
    python benchmarks/bench_fidelity.py --variants paper,svd-r2-M8 --seeds 1,2
    python benchmarks/bench_fidelity.py --stop-at-step 300                 # screening: steps 1-300 of 1000
    python benchmarks/bench_fidelity.py --max-train-chars 6000000 --out benchmarks/results/fidelity/one-pass
                                         # compare's setting on 4x the text: its 640k training tokens seen once
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from velora.experiments.compare import TUNED_LR
from velora.experiments.fidelity_study import (
    VARIANTS,
    keep_diagnose_logs,
    last_step,
    lr_scale_of,
    read_records,
    render,
    run_study,
    trained,
)

DEFAULT_OUT = Path(__file__).parent / "results" / "fidelity"


def merged_records(folders: list[Path]) -> list[dict]:
    """The runs of several study folders; one (variant, seed) once, and one setting per variant."""
    records, settings = {}, {}
    for folder in folders:
        for record in read_records(folder / "runs.jsonl"):
            setting = {**{k: v for k, v in record["config"].items() if k != "seed"}, "trained": trained(record),
                       "compressed_lr_scale": lr_scale_of(record)}
            known = settings.setdefault(record["variant"], (setting, folder))
            if known[0] != setting:
                raise SystemExit(f"{record['variant']!r} runs in {known[1]} and {folder} differ in their settings; "
                                 "merge only folders of one setting")
            records.setdefault((record["variant"], record["seed"], last_step(record)), record)  # first folder wins
    return list(records.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"study folder (default {DEFAULT_OUT})")
    parser.add_argument("--variants", default=None, help="comma-separated (default all; with --table-only: the rows "
                        "shown), from: " + ", ".join(VARIANTS))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (model init and batch order)")
    parser.add_argument("--every", type=int, default=50, help="steps between diagnoses (default 50)")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="screening: stop each run here, the schedule unchanged (default: the whole run)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of every run (default compare's 1000; warmup stays a tenth of them)")
    parser.add_argument("--max-train-chars", type=int, default=None,
                        help="training text cap in characters (default compare's 1,500,000: 475k tokens, which the "
                             "1000 x 640 training tokens pass over 1.35 times)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="weights and activations dtype of every run (default compare's float32; in bfloat16 the "
                             "paper default keeps z in 2 bytes, so 4-bit coefficients at rank M are its equal bytes)")
    parser.add_argument("--lr", type=float, default=None,
                        help="one lr for every run of this study (default: compare's tuned 2e-3, or the variant's)")
    parser.add_argument("--compressed-lr-scale", type=float, default=1.0,
                        help="the compressed layers (v_proj, down_proj) train at this times the run's lr in every "
                             "run (default 1; frozen-control runs are unaffected)")
    parser.add_argument("--train-only-compressed", action="store_true",
                        help="freeze every weight outside the compressed layers, so all learning goes through "
                             "VeLoRA's weight gradients (a setting where those updates matter by construction)")
    parser.add_argument("--table-only", action="store_true", help="write results.md from runs.jsonl, train nothing")
    parser.add_argument("--merge", type=Path, action="append", default=[], metavar="DIR",
                        help="with --table-only: add the runs of another study folder of the same setting (more "
                             "seeds); a variant whose settings differ between the folders is an error")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} must be comma-separated integers, e.g. 0,1,2")
    torch.set_num_threads(1)
    chosen = None if args.variants is None else [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.merge and not args.table_only:
        parser.error("--merge only combines finished runs: add --table-only")
    if args.table_only:
        keep_diagnose_logs(args.out)
        records = merged_records([args.out, *args.merge])
        if chosen is not None:
            records = [r for r in records if r["variant"] in chosen]
    else:
        variants = list(VARIANTS) if chosen is None else chosen
        changes = {} if args.max_train_chars is None else {"max_train_chars": args.max_train_chars}
        if args.lr is not None:
            changes["lr"] = args.lr
        if args.steps is not None:
            changes["steps"] = args.steps
        if args.dtype is not None:
            changes["dtype"] = args.dtype
        records = run_study(variants, seeds, args.out, args.every, stop_at_step=args.stop_at_step,
                            only_compressed=args.train_only_compressed,
                            compressed_lr_scale=args.compressed_lr_scale, **changes)
    table = render(records)
    args.out.mkdir(parents=True, exist_ok=True)
    caps = sorted({r["config"]["max_train_chars"] for r in records})
    setting = "velora compare's setting" + ("" if caps == [1_500_000] else f", training text capped at {caps} chars")
    lrs = {r["config"]["lr"] for r in records}
    if len(lrs) == 1 and lrs != {TUNED_LR["velora"]}:
        setting += f", lr {lrs.pop():g} for every run"
    dtypes = {r["config"]["dtype"] for r in records}
    if dtypes != {"float32"}:
        setting += f", dtype {'/'.join(sorted(dtypes))}"
    steps = {r["config"]["steps"] for r in records}
    if steps != {1000}:
        setting += f", {'/'.join(str(s) for s in sorted(steps))} steps"
    scales = {lr_scale_of(r) for r in records}
    if len(scales) == 1 and scales != {1.0}:
        setting += f", the compressed layers at {scales.pop():g}x the lr"
    if {trained(r) for r in records} == {"compressed layers only"}:
        setting += ", only the compressed layers trained"
    (args.out / "results.md").write_text(f"# VeLoRA gradient fidelity over training ({setting})\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
