"""VeLoRA gradient fidelity over training on `velora compare`'s model (issue 17): one run per (variant, seed).

Every run pre-trains the `velora` method exactly as `velora compare` does (its ``SETTING``, tuned lr, M and
targets; only the seed and the variant's VeLoRA options change), diagnosing every ``every`` steps
(``train(diagnose_every=...)``). A finished run appends one JSON line to ``runs.jsonl``: per wrapped layer the
median gradient cosine and energy over training, the measured saved-activation bytes and the validation ppl.
A (variant, seed) already in ``runs.jsonl`` with the same config is not trained again, so the study resumes where
it was stopped. ``render`` turns the records into the markdown table (means over the seeds each variant has).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from velora.experiments.common import cpu_model, fresh_dir, markdown_table, mib
from velora.experiments.compare import RANK, SETTING, SUB_TOKEN_SIZE, TUNED_LR, UPDATE_GAP, method_overrides
from velora.experiments.control import (
    check_lr_scale,
    freeze_compressed_layers,
    scale_compressed_lr,
    train_only_compressed_layers,
)

METHOD = "velora"  # compare's velora row: full AdamW training with VeLoRA on v_proj + down_proj
TARGET_COSINE_FACTOR = 2.0  # issue 17: at least double the paper default's median gradient cosine ...
BYTES_TOLERANCE = 0.02  # ... at equal saved bytes (+-2%) ...
PAPER = "paper"  # ... with validation ppl no worse than this variant's, over the same seeds
EXACT_CONTROL = "exact-r4-M4"  # exact weight gradients through the same op: what a faithful option can match


@dataclass(frozen=True)
class Variant:
    """A VeLoRA option set compared with the paper default: ``changes`` update compare's velora config."""

    name: str
    description: str
    changes: dict[str, Any] = field(default_factory=dict)
    seeded_directions: bool = False  # the directions are drawn from VeLoRAConfig.seed: tie it to the run seed
    frozen: bool = False  # the control: the layers VeLoRA would compress get no update (nothing to diagnose)
    lr: float | None = None  # None: compare's tuned lr for the velora row
    optimizer: str | None = None  # None: compare's (AdamW); else the base optimizer's name (velora.methods.common)
    reference: str = PAPER  # the paper-default row it is judged against (bytes, cosine, ppl): same base optimizer


# M, rank: saved scalars per token are D * rank / M, so (M, r) = (4, 1), (8, 2), (16, 4) keep equal bytes
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant(PAPER, f"M={SUB_TOKEN_SIZE}, r=1, v = normalised first-batch mean (compare's velora row)"),
    Variant("random", f"M={SUB_TOKEN_SIZE}, r=1, seeded random unit v", {"init": "random"}, seeded_directions=True),
    Variant("svd-r1", f"M={SUB_TOKEN_SIZE}, r=1, top singular vector of the first batch", {"init": "svd"}),
    Variant("svd-r2-M8", "M=8, r=2, top-2 singular vectors of the first batch (equal bytes)",
            {"init": "svd", "rank": 2, "sub_token_size": 2 * SUB_TOKEN_SIZE}),
    Variant("avg-r2-M8", "M=8, r=2, first-batch mean + top residual singular vector (equal bytes)",
            {"init": "batch_average_once", "rank": 2, "sub_token_size": 2 * SUB_TOKEN_SIZE}),
    Variant("svd-r4-M16", "M=16, r=4, top-4 singular vectors of the first batch (equal bytes)",
            {"init": "svd", "rank": 4, "sub_token_size": 4 * SUB_TOKEN_SIZE}),
    # issue 17 (a) and (c): VeLoRAConfig.per_group_directions / reestimate_every (branch wt-dirs)
    Variant("per-group", f"M={SUB_TOKEN_SIZE}, r=1, one first-batch mean direction per sub-token group",
            {"per_group_directions": True}),
    Variant("reest-100", f"M={SUB_TOKEN_SIZE}, r=1, v re-estimated from the batch every 100 steps",
            {"reestimate_every": 100}),
    Variant("per-group-reest-100", f"M={SUB_TOKEN_SIZE}, r=1, per-group directions re-estimated every 100 steps",
            {"per_group_directions": True, "reestimate_every": 100}),
    Variant("per-group-svd-r2-M8", "M=8, r=2, per-group top-2 singular vectors of the first batch (equal bytes)",
            {"per_group_directions": True, "init": "svd", "rank": 2, "sub_token_size": 2 * SUB_TOKEN_SIZE}),
    # (b) + (c) every step: each training forward's own per-group top-r directions (v is part of what is saved)
    Variant("per-group-svd-r4-M16-reest-1", "M=16, r=4, per-group top-4 singular vectors of each batch (equal bytes)",
            {"per_group_directions": True, "init": "svd", "rank": 4, "sub_token_size": 4 * SUB_TOKEN_SIZE,
             "reestimate_every": 1}),
    Variant("per-group-svd-r8-M32-reest-1", "M=32, r=8, per-group top-8 singular vectors of each batch (equal bytes)",
            {"per_group_directions": True, "init": "svd", "rank": 8, "sub_token_size": 8 * SUB_TOKEN_SIZE,
             "reestimate_every": 1}),
    # is the M=32 option's quality loss its every-batch fit, or the lr? (one seed each, a check, not a 3-seed row)
    Variant("per-group-svd-r8-M32-reest-100", "M=32, r=8, per-group top-8 singular vectors re-estimated every 100 "
            "steps (equal bytes)", {"per_group_directions": True, "init": "svd", "rank": 8,
                                    "sub_token_size": 8 * SUB_TOKEN_SIZE, "reestimate_every": 100}),
    Variant("per-group-svd-r8-M32-reest-1-lr1e-3", "per-group-svd-r8-M32-reest-1 at lr 1e-3 (half compare's 2e-3)",
            {"per_group_directions": True, "init": "svd", "rank": 8, "sub_token_size": 8 * SUB_TOKEN_SIZE,
             "reestimate_every": 1}, lr=1e-3),
    # the velora row's lr was tuned (1e-3, 2e-3, 3e-3) with the paper's v; an option whose per-element gradient
    # changes every step may want another: the M=32 option on compare's grid and one step beyond it
    Variant("per-group-svd-r8-M32-reest-1-lr3e-3", "per-group-svd-r8-M32-reest-1 at lr 3e-3",
            {"per_group_directions": True, "init": "svd", "rank": 8, "sub_token_size": 8 * SUB_TOKEN_SIZE,
             "reestimate_every": 1}, lr=3e-3),
    Variant("per-group-svd-r8-M32-reest-1-lr4e-3", "per-group-svd-r8-M32-reest-1 at lr 4e-3",
            {"per_group_directions": True, "init": "svd", "rank": 8, "sub_token_size": 8 * SUB_TOKEN_SIZE,
             "reestimate_every": 1}, lr=4e-3),
    # is the every-forward option's loss AdamW's per-element second moments? The same pair under Adafactor (factored
    # row / column statistics), at its lr from a 1e-2 / 3e-2 check on seed 0
    Variant("paper-adafactor", "paper default, Adafactor at lr 3e-2 instead of AdamW (the reference of the next row)",
            lr=3e-2, optimizer="adafactor", reference="paper-adafactor"),
    Variant("per-group-svd-r8-M32-reest-1-adafactor", "per-group-svd-r8-M32-reest-1, Adafactor at lr 3e-2 (against "
            "paper-adafactor)", {"per_group_directions": True, "init": "svd", "rank": 8,
                                 "sub_token_size": 8 * SUB_TOKEN_SIZE, "reestimate_every": 1},
            lr=3e-2, optimizer="adafactor", reference="paper-adafactor"),
    Variant("paper-adafactor-lr1e-2", "paper-adafactor at lr 1e-2 (the lr check)", lr=1e-2, optimizer="adafactor",
            reference="paper-adafactor-lr1e-2"),
    Variant("per-group-svd-r8-M32-reest-1-adafactor-lr1e-2", "per-group-svd-r8-M32-reest-1-adafactor at lr 1e-2 "
            "(against paper-adafactor-lr1e-2)", {"per_group_directions": True, "init": "svd", "rank": 8,
                                                  "sub_token_size": 8 * SUB_TOKEN_SIZE, "reestimate_every": 1},
            lr=1e-2, optimizer="adafactor", reference="paper-adafactor-lr1e-2"),
    # the exact control through the same code path: rank = M keeps every sub-token whole
    Variant("per-group-svd-r4-M4-reest-1", "control: M=4, r=4 (= M), per-group SVD of each batch: exact, "
            "4x the compressed inputs' bytes",
            {"per_group_directions": True, "init": "svd", "rank": 4, "sub_token_size": 4, "reestimate_every": 1}),
    # rank sweep at the paper's M=4 with each batch's per-group SVD: does quality follow the cosine toward r = M?
    Variant("per-group-svd-r1-M4-reest-1", "M=4, r=1, per-group top singular vector of each batch (equal bytes)",
            {"per_group_directions": True, "init": "svd", "rank": 1, "sub_token_size": 4, "reestimate_every": 1}),
    Variant("per-group-svd-r3-M4-reest-1", "M=4, r=3, per-group top-3 singular vectors of each batch (3x the "
            "compressed inputs' bytes)",
            {"per_group_directions": True, "init": "svd", "rank": 3, "sub_token_size": 4, "reestimate_every": 1}),
    # the same two choices, each changed alone: every batch's per-group mean (the paper's rule), and the first
    # batch's per-group top singular vector kept fixed (the SVD rule without re-estimation)
    Variant("per-group-reest-1", "M=4, r=1, per-group normalised mean of each batch (equal bytes)",
            {"per_group_directions": True, "reestimate_every": 1}),
    Variant("per-group-svd-r1-M4", "M=4, r=1, per-group top singular vector of the first batch (equal bytes)",
            {"per_group_directions": True, "init": "svd", "rank": 1, "sub_token_size": 4}),
    # the bytes spent on precision instead of rank: rank = M keeps every sub-token whole, and 8-bit coefficients with
    # one fp32 scale per token keep the paper's fp32 bytes (D·r/M scalars · 4 bytes = D bytes per token, + 4).
    # These two ran before per-column scales existed: they pin the per-token layout their records were made with
    Variant("int8-r4-M4", "M=4, r=4 (= M), first-batch directions, z in 8 bits with one scale per token (equal "
            "bytes)", {"rank": 4, "sub_token_size": 4, "coefficient_bits": 8, "coefficient_scales": "token"}),
    Variant("int4-r4-M4", "M=4, r=4 (= M), first-batch directions, z in 4 bits with one scale per token (half the "
            "bytes; equal bytes against a bf16 paper default)",
            {"rank": 4, "sub_token_size": 4, "coefficient_bits": 4, "coefficient_scales": "token"}),
    # the library's layout: each coefficient divided by its RMS over the batch first (+ G·r fp32 numbers a forward)
    Variant("int8-cols-r4-M4", "M=4, r=4 (= M), first-batch directions, z in 8 bits with per-column then "
            "per-token scales (the library's layout; equal bytes)",
            {"rank": 4, "sub_token_size": 4, "coefficient_bits": 8}),
    Variant("int4-cols-r4-M4", "M=4, r=4 (= M), first-batch directions, z in 4 bits with per-column then "
            "per-token scales (the library's layout; equal bytes against a bf16 paper default)",
            {"rank": 4, "sub_token_size": 4, "coefficient_bits": 4}),
    # what exact weight gradients give on each seed, through the same op: rank = M in fp32 keeps every sub-token
    Variant("exact-r4-M4", "control: M=4, r=4 (= M) in the run's dtype: every sub-token kept whole, 4x the "
            "compressed inputs' bytes", {"rank": 4, "sub_token_size": 4}),
    Variant("frozen-control", "control: v_proj + down_proj weights frozen at init (no VeLoRA, no update)",
            frozen=True),
)}


def study_config(variant: Variant, seed: int, **setting_changes):
    """The TrainConfig of one run: compare's velora row with the variant's VeLoRA options and ``seed``
    (model init and batch order). ``setting_changes`` (model, steps, ...) are for tests and short trials."""
    from velora.training.loop import TrainConfig

    overrides = method_overrides(METHOD, RANK, SUB_TOKEN_SIZE, UPDATE_GAP)
    velora = {**overrides["velora"], **variant.changes}
    if variant.seeded_directions:
        velora["seed"] = seed
    setting = {**SETTING, "seed": seed, **setting_changes}
    if "steps" in setting_changes and "warmup_steps" not in setting_changes:
        setting["warmup_steps"] = max(1, setting["steps"] // 10)  # compare's rule for a changed step count
    lr = TUNED_LR[METHOD] if variant.lr is None else variant.lr
    lr = setting.pop("lr", lr)  # a study-wide lr (bench_fidelity --lr) wins over compare's and the variant's
    if variant.optimizer is not None:
        overrides["options"] = {**overrides["options"], "optimizer": variant.optimizer}
    return TrainConfig(method=METHOD, lr=lr, **{**overrides, "velora": velora}, **setting)


# ---- one run -----------------------------------------------------------------------------------------


def layer_medians(diagnose_csv: Path) -> dict[str, dict[str, float]]:
    """Per wrapped layer: median cosine, energy and norm ratio over the diagnosed steps (NaN rows skipped)."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with open(diagnose_csv) as fh:
        for row in csv.DictReader(fh):
            for column in ("cosine", "energy", "norm_ratio"):
                value = float(row[column])
                if value == value:  # NaN: undefined on that batch (zero gradient)
                    values[row["layer"]][column].append(value)
    return {layer: {column: statistics.median(v) for column, v in columns.items()}
            for layer, columns in values.items()}


def run_one(variant: Variant, seed: int, runs_dir: Path, every: int, stop_at_step: int | None = None,
            only_compressed: bool = False, compressed_lr_scale: float = 1.0, **setting_changes) -> dict[str, Any]:
    """Train one (variant, seed) into ``runs_dir/<variant>-s<seed>[-to<stop>]`` and return its record.
    ``stop_at_step`` ends the run early with the schedule unchanged (a screening run); ``only_compressed`` trains
    the compressed layers alone (``train_only_compressed_layers``); ``compressed_lr_scale`` gives the compressed
    layers that times the run's lr (``scale_compressed_lr``; 1: the same lr, no regrouping)."""
    from velora.training.loop import train

    config = study_config(variant, seed, **setting_changes)
    last = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
    folder = fresh_dir(runs_dir / (f"{variant.name}-s{seed}" + ("" if last == config.steps else f"-to{last}")))
    started = time.perf_counter()
    if variant.frozen and only_compressed:
        raise ValueError(f"{variant.name!r} freezes the only layers only_compressed trains: nothing would train")
    hook = freeze_compressed_layers if variant.frozen else train_only_compressed_layers if only_compressed else None
    regroup = None if compressed_lr_scale == 1 else partial(scale_compressed_lr, scale=compressed_lr_scale)
    result = train(config, folder, measure=True, tensorboard=False, diagnose_every=0 if variant.frozen else every,
                   stop_at_step=last, on_model_ready=hook, on_optimizer_ready=regroup)
    layers = {} if variant.frozen else layer_medians(folder / "diagnose.csv")
    cosines = [] if variant.frozen else defined_cosines(folder / "diagnose.csv")
    return {"variant": variant.name, "seed": seed, "config": config.to_dict(), "every": every, "last_step": last,
            "val_ppl": result["val_ppl"], "final_loss": result["final_loss"],
            "activation_bytes": result["activation_bytes"],
            "median_cosine": statistics.median(cosines) if cosines else None,
            "layers": layers, "wall_s": time.perf_counter() - started, "trained": _trained(only_compressed),
            "compressed_lr_scale": compressed_lr_scale,
            "cpu_model": cpu_model()}  # runs are bitwise only on one CPU model (README)


def _trained(only_compressed: bool) -> str:
    return "compressed layers only" if only_compressed else "all"


def trained(record: dict[str, Any]) -> str:
    """Which weights a run trained (records from before the option trained all of them)."""
    return record.get("trained", "all")


def _check_options_exist(variants: list[str]) -> None:
    from dataclasses import fields

    from velora.core.config import VeLoRAConfig

    known = {f.name for f in fields(VeLoRAConfig)}
    missing = sorted({key for name in variants for key in VARIANTS[name].changes if key not in known})
    if missing:
        raise ValueError(f"VeLoRAConfig of this build has no option(s) {missing}, which variant(s) "
                         f"{[n for n in variants if set(VARIANTS[n].changes) & set(missing)]} need; drop them")


def lr_scale_of(record: dict[str, Any]) -> float:
    """The compressed layers' lr over the run's (records from before the option had the run's lr)."""
    return record.get("compressed_lr_scale", 1.0)


def last_step(record: dict[str, Any]) -> int:
    """The step a run stopped at (records written before screening runs existed ran the whole schedule)."""
    return record.get("last_step", record["config"]["steps"])


def defined_cosines(diagnose_csv: Path) -> list[float]:
    """Every layer's cosine at every diagnosed step of diagnose.csv, NaN rows (zero gradient) left out."""
    with open(diagnose_csv) as fh:
        cosines = [float(r["cosine"]) for r in csv.DictReader(fh)]
    return [c for c in cosines if c == c]


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_record(path: Path, record: dict[str, Any]) -> None:
    """One line, appended whole (O_APPEND): two study processes may share the file."""
    line = (json.dumps(record, default=str) + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


def run_study(variants: list[str], seeds: list[int], out: Path, every: int, say=print, stop_at_step: int | None = None,
              only_compressed: bool = False, compressed_lr_scale: float = 1.0,
              **setting_changes) -> list[dict[str, Any]]:
    """Train every (variant, seed) not yet in ``out/runs.jsonl`` with the same config and last step; returns all
    records."""
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r} must be an integer >= 1 (steps between diagnoses)")
    _check_options_exist(variants)
    check_lr_scale(compressed_lr_scale)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.jsonl"
    for seed in seeds:
        for name in variants:
            config = study_config(VARIANTS[name], seed, **setting_changes).to_dict()
            last = config["steps"] if stop_at_step is None else min(stop_at_step, config["steps"])
            done = [r for r in read_records(path) if r["variant"] == name and r["seed"] == seed
                    and r["config"] == config and r["every"] == every and last_step(r) == last
                    and trained(r) == _trained(only_compressed)
                    and lr_scale_of(r) == compressed_lr_scale]
            if done:
                say(f"{name} seed {seed}: in {path} already")
                continue
            say(f"{name} seed {seed}: training ({VARIANTS[name].description})")
            record = run_one(VARIANTS[name], seed, out / "runs", every, stop_at_step, only_compressed,
                             compressed_lr_scale, **setting_changes)
            append_record(path, record)
            say(f"{name} seed {seed}: median cosine {_fmt(record['median_cosine'])}, val ppl {record['val_ppl']:.2f}, "
                f"{record['wall_s']:.0f} s")
    keep_diagnose_logs(out)
    return read_records(path)


def keep_diagnose_logs(out: Path) -> None:
    """Copy each run's diagnose.csv to ``out/diagnose/<run>.csv``: the small part of a run folder worth keeping."""
    for log in sorted((out / "runs").glob("*/diagnose.csv")):
        if not (log.parent / "result.json").exists():
            continue  # still training (another study process): copied once it has finished
        (out / "diagnose").mkdir(exist_ok=True)
        shutil.copyfile(log, out / "diagnose" / f"{log.parent.name}.csv")


# ---- the table ---------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mean(values: list[float | None]) -> float | None:
    """Mean over seeds; None (a frozen control has no cosine) when any is None."""
    return None if any(v is None for v in values) else statistics.mean(values)


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant (VARIANTS order): seeds, means over seeds of val ppl, bytes and cosines, per-layer cosines."""
    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_variant[record["variant"]].append(record)
    summary = {}
    for name in [n for n in VARIANTS if n in by_variant] + [n for n in by_variant if n not in VARIANTS]:
        runs = sorted(by_variant[name], key=lambda r: r["seed"])
        layer_names = list(runs[0]["layers"])
        summary[name] = {
            "seeds": [r["seed"] for r in runs],
            "val_ppl": statistics.mean(r["val_ppl"] for r in runs),
            "val_ppl_per_seed": [r["val_ppl"] for r in runs],
            "activation_bytes": statistics.mean(r["activation_bytes"] for r in runs),
            "median_cosine": _mean([r["median_cosine"] for r in runs]),
            "layers": {layer: statistics.mean(r["layers"][layer]["cosine"] for r in runs) for layer in layer_names},
            "energy": _mean([statistics.median(v["energy"] for v in r["layers"].values()) if r["layers"] else None
                             for r in runs]),
        }
    return summary


def target_verdict(row: dict[str, Any], paper: dict[str, Any]) -> str:
    """Whether a variant meets issue 17's target against its paper-default row (``Variant.reference``), on the seeds
    both have."""
    shared = [s for s in row["seeds"] if s in paper["seeds"]]
    if row is paper or not shared:
        return "–"
    if row["median_cosine"] is None:
        return "control"
    bytes_ratio = row["activation_bytes"] / paper["activation_bytes"]
    cosine_ratio = row["median_cosine"] / paper["median_cosine"]
    ppl = statistics.mean(p for s, p in zip(row["seeds"], row["val_ppl_per_seed"]) if s in shared)
    paper_ppl = statistics.mean(p for s, p in zip(paper["seeds"], paper["val_ppl_per_seed"]) if s in shared)
    checks = [abs(bytes_ratio - 1) <= BYTES_TOLERANCE, cosine_ratio >= TARGET_COSINE_FACTOR, ppl <= paper_ppl,
              len(shared) >= 3]
    failed = [why for ok, why in zip(checks, ("bytes", "cosine", "ppl", "3 seeds")) if not ok]
    return "yes" if not failed else "no (" + ", ".join(failed) + ")"


# Student's t two-sided 95% quantiles for 1-30 degrees of freedom (the normal 1.96 beyond)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_difference(row: dict[str, Any], paper: dict[str, Any] | None) -> str:
    """Val ppl minus the reference row's on the same seed: mean ± sample sd over the shared seeds (n of them), and
    the 95% t-interval of the mean difference."""
    if paper is None or row is paper:
        return "–"
    theirs = dict(zip(paper["seeds"], paper["val_ppl_per_seed"]))
    differences = [p - theirs[s] for s, p in zip(row["seeds"], row["val_ppl_per_seed"]) if s in theirs]
    if not differences:
        return "–"
    mean, n = statistics.mean(differences), len(differences)
    if n == 1:
        return f"{mean:+.2f} (n=1)"
    sd = statistics.stdev(differences)
    half = (T_975[n - 2] if n - 1 <= len(T_975) else 1.96) * sd / n ** 0.5
    return f"{mean:+.2f} ± {sd:.2f} (n={n}; 95% CI {mean - half:+.2f} to {mean + half:+.2f})"


def render_horizon(records: list[dict[str, Any]]) -> str:
    """The tables of runs that stopped at one step: one row per variant (means over its seeds), then per-layer
    median cosines."""
    summary = summarise(records)
    if not summary:
        return "no finished runs yet"
    headers = ["variant", "what", "seeds", "saved act. MiB", "bytes vs paper", "median grad cosine",
               "cosine vs paper", "median energy", "val ppl (mean)", "val ppl per seed",
               "val ppl − paper, same seed (mean ± sd; 95% CI)", "meets #17 target"]
    exact = summary.get(EXACT_CONTROL)  # with it in the table, every row is also paired against exact gradients
    if exact is not None:
        headers.insert(-1, "val ppl − exact control, same seed (mean ± sd; 95% CI)")
    rows = []
    for name, row in summary.items():
        paper = summary.get(VARIANTS[name].reference if name in VARIANTS else PAPER)
        cosine = row["median_cosine"]
        rows.append([name, VARIANTS[name].description if name in VARIANTS else "?",
                     ",".join(str(s) for s in row["seeds"]), f"{mib(row['activation_bytes']):.3f}",
                     f"{row['activation_bytes'] / paper['activation_bytes']:.3f}x" if paper else "–",
                     _fmt(cosine), f"{cosine / paper['median_cosine']:.2f}x" if paper and cosine is not None else "–",
                     _fmt(row["energy"]), f"{row['val_ppl']:.2f}",
                     " / ".join(f"{p:.2f}" for p in row["val_ppl_per_seed"]), paired_difference(row, paper),
                     *([paired_difference(row, exact)] if exact is not None else []),
                     target_verdict(row, paper) if paper else "–"])
    diagnosed = {name: row for name, row in summary.items() if row["layers"]}
    layer_names = list(next(iter(diagnosed.values()))["layers"]) if diagnosed else []
    layer_rows = [[f"`{layer}`"] + [_fmt(row["layers"].get(layer)) for row in diagnosed.values()]
                  for layer in layer_names]
    return "\n\n".join([markdown_table(headers, rows), "Median gradient cosine per wrapped layer over training "
                        "(mean over the variant's seeds):", markdown_table(["layer", *diagnosed], layer_rows)])


def render(records: list[dict[str, Any]]) -> str:
    """``render_horizon`` for the whole runs first, then for each shorter (screening) horizon."""
    horizons = sorted({last_step(r) for r in records}, reverse=True)
    if not horizons:
        return "no finished runs yet"
    sections = []
    for horizon in horizons:
        chosen = [r for r in records if last_step(r) == horizon]
        steps = chosen[0]["config"]["steps"]
        heading = (f"### {steps} steps (the whole schedule)" if horizon == steps else
                   f"### screening: steps 1-{horizon} of {steps} (schedule unchanged, stopped early)")
        sections.append(f"{heading}\n\n{render_horizon(chosen)}")
    return "\n\n".join(sections)
