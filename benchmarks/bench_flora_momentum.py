"""FLoRA momentum at the authors' quality (issue #16), measured on `velora compare`'s setting.

    nice -n 10 python benchmarks/bench_flora_momentum.py            # run what is missing, then write the tables
    python benchmarks/bench_flora_momentum.py --report              # the tables from the finished runs only
    python benchmarks/bench_flora_momentum.py --rows uncompressed ours-authors
    python benchmarks/bench_flora_momentum.py --phase start      # one phase across the rows (a short budget)
    python benchmarks/bench_flora_momentum.py --eps-check velora-runs/flora_momentum/uncompressed/lr0.03-s0

Every row trains llama-small for compare's 1000 steps (velora.experiments.compare.SETTING, one thread) through
velora.training.loop.train, like compare's rows. Each row's lr is picked on seed 0 from a factor-2 grid that
must bracket it (the best lr's two neighbours are run, extending the grid while the best is at its end), then seeds
1 and 2 run at that lr. Validation ppl is reported as the mean ± sample std over the 3 seeds, with the per-seed
ratios (same seed = same init and batch order) beside the ratio of the means.

The flora-opt rows use the FLoRA authors' package (flora-opt 0.0.3, PyTorch path). It is never a dependency of
the library: install it for this bench only with `pip install --no-deps flora-opt==0.0.3`; without it those rows
are skipped with one line. It enters through velora's method registry as the bench-only base method "flora-opt".

Finished runs are appended to benchmarks/results/flora_momentum/runs.jsonl as they end (rerunning skips them);
results.json and results.md are rewritten after every run. Run folders go to velora-runs/flora_momentum/.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from velora.experiments.common import environment, fresh_dir, markdown_table, write_json
from velora.experiments.compare import SETTING

RESULTS = Path(__file__).resolve().parent / "results" / "flora_momentum"
RUNS_ROOT = Path("velora-runs") / "flora_momentum"
SEEDS = (0, 1, 2)
KAPPA = 1000  # the FLoRA paper's kappa (Tab. 3): the projection is never resampled in 1000 steps
RANK = 64  # half of llama-small's smaller side (d_model = 128)
FULL_SIDE = 128  # rank >= every matrix's smaller side: Flora keeps the momentum uncompressed
ADAFACTOR_START, ADAMW_START = 3e-2, 2e-3  # first seed-0 lr: the flora-opt lr, compare's AdamW lr
MAX_SEED0_RUNS = 6  # bracket search budget per row
AUTHORS_OPTIONS = {"flora_momentum": "update", "flora_exact_current": True, "flora_momentum_orthogonal": True}
ALG2_OPTIONS = {"flora_momentum": "gradient", "flora_exact_current": False, "flora_momentum_orthogonal": False}
# torch.optim.Adafactor's eps1 (our default: float32 eps 1.2e-7) clamps the row-statistic mean at eps1 and v_hat at
# eps1^2; after compare's gradient clipping many matrices have mean(G^2) below 1.2e-7, so v_hat is underestimated.
# flora-opt (and the Adafactor paper) add 1e-30 to G^2 instead; eps1 = 1e-15 puts our v_hat floor at that 1e-30.
AUTHORS_EPS1 = 1e-15
# Flora's default eps1 is 1e-15 since issue #16; the rows measured with torch's rule name it: for float32 weights that
# rule is the float32 eps, so these rows run bit for bit as they did before the default changed
TORCH_EPS1 = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    method: str
    options: dict = field(hash=False)
    start: float  # the first lr tried on seed 0; the search then walks by factors of 2
    seeds: tuple[int, ...] = SEEDS


def _flora(optimizer: str, rank: int, **options) -> dict:
    return {"optimizer": optimizer, "flora_rank": rank, "flora_kappa": KAPPA, **options}


ROWS = (
    Row("uncompressed", "Adafactor + uncompressed momentum (our Flora, r = full side, momentum='update')", "flora",
        _flora("adafactor", FULL_SIDE, flora_momentum="update", flora_eps1=TORCH_EPS1), ADAFACTOR_START),
    Row("ours-authors", "our FLoRA, Adafactor, κ=1000, r=64: update, current exact, orthonormal", "flora",
        _flora("adafactor", RANK, **AUTHORS_OPTIONS, flora_eps1=TORCH_EPS1), ADAFACTOR_START),
    Row("ours-authors-gaussian", "our FLoRA, Adafactor, κ=1000, r=64: Flora.authors_code (update, current exact, "
        "Gaussian rows)", "flora",
        _flora("adafactor", RANK, **{**AUTHORS_OPTIONS, "flora_momentum_orthogonal": False}, flora_eps1=TORCH_EPS1),
        ADAFACTOR_START),
    Row("flora-opt", "flora-opt 0.0.3 FLoRA, κ=1000, r=64 (authors' package)", "flora-opt",
        _flora("adafactor", RANK), ADAFACTOR_START),
    Row("ours-alg2", "our FLoRA, Adafactor, κ=1000, r=64: paper's Alg. 2 literally (Flora.paper_alg2)", "flora",
        _flora("adafactor", RANK, **ALG2_OPTIONS, flora_eps1=TORCH_EPS1), ADAFACTOR_START),
    Row("adamw", "AdamW (uncompressed, compare's full row)", "full", {"optimizer": "adamw"}, ADAMW_START),
    Row("ours-adamw", "our FLoRA, AdamW base, κ=1000, r=64: gradient, current exact, orthonormal", "flora",
        _flora("adamw", RANK, flora_momentum="gradient", flora_exact_current=True, flora_momentum_orthogonal=True),
        ADAMW_START),
    Row("ours-adamw-update", "our FLoRA, AdamW base, κ=1000, r=64: update, current exact, orthonormal", "flora",
        _flora("adamw", RANK, **AUTHORS_OPTIONS), ADAMW_START),
    Row("ours-adamw-residual", "our FLoRA, AdamW base, κ=1000, r=64: gradient, current exact, orthonormal, "
        "residual (the complement of the row space gets the gradient itself)", "flora",
        _flora("adamw", RANK, flora_momentum="gradient", flora_exact_current=True, flora_momentum_orthogonal=True,
               flora_momentum_residual=True), ADAMW_START),
    Row("uncompressed-eps", "Adafactor + uncompressed momentum, eps1 = 1e-15 (v_hat floor 1e-30, as flora-opt)",
        "flora", _flora("adafactor", FULL_SIDE, flora_momentum="update", flora_eps1=AUTHORS_EPS1), ADAFACTOR_START),
    Row("ours-authors-eps", "our FLoRA, Adafactor, κ=1000, r=64: update, current exact, orthonormal, eps1 = 1e-15",
        "flora", _flora("adafactor", RANK, **AUTHORS_OPTIONS, flora_eps1=AUTHORS_EPS1), ADAFACTOR_START),
    Row("ours-alg2-eps", "our FLoRA, Adafactor, κ=1000, r=64: Alg. 2 literally, eps1 = 1e-15", "flora",
        _flora("adafactor", RANK, **ALG2_OPTIONS, flora_eps1=AUTHORS_EPS1), ADAFACTOR_START),
    Row("flora-opt-uncompressed", "flora-opt 0.0.3, uncompressed momentum (cross-check of our reference, seed 0)",
        "flora-opt", {"optimizer": "adafactor", "flora_kappa": KAPPA}, ADAFACTOR_START, seeds=(0,)),
)
# (row, reference, target): the targets of issue #16, as ratios of the 3-seed means
TARGETS = (("ours-authors", "uncompressed", 1.02), ("ours-authors", "flora-opt", 1.0), ("ours-adamw", "adamw", 1.05),
           ("ours-authors-gaussian", "uncompressed", 1.02), ("ours-authors-gaussian", "flora-opt", 1.0),
           ("ours-alg2", "uncompressed", 1.02), ("flora-opt", "uncompressed", 1.02),
           ("ours-adamw-update", "adamw", 1.05), ("ours-adamw-residual", "adamw", 1.05),
           ("ours-authors-eps", "uncompressed-eps", 1.02),
           ("ours-authors-eps", "flora-opt", 1.0), ("ours-alg2-eps", "uncompressed-eps", 1.02),
           ("uncompressed-eps", "flora-opt-uncompressed", 1.02))


# ---- flora-opt as a bench-only method -------------------------------------------------------------------------

def flora_opt_available() -> bool:
    try:
        import flora_opt.optimizers.torch  # noqa: F401
    except ImportError:
        return False
    return True


def register_flora_opt() -> None:
    """The authors' optimizer as base method "flora-opt" (Adafactor-style, beta1 0.9; rank None: uncompressed)."""
    from velora.methods.registry import BaseMethod, base_methods, register

    if "flora-opt" in base_methods():
        return

    def optimizer(model, options):
        from flora_opt.optimizers.torch import Flora as AuthorsFlora

        params = [p for p in model.parameters() if p.requires_grad]
        return AuthorsFlora(params, lr=options.optim.lr, rank=options.flora.rank, kappa=options.flora.kappa,
                            beta1=0.9, seed=options.seed)

    register(BaseMethod("flora-opt", "the FLoRA authors' package (bench only)", lambda model, options: model,
                        optimizer, optimizers=("adafactor",)))


# ---- runs -----------------------------------------------------------------------------------------------------

def run_key(row: Row, lr: float, seed: int) -> str:
    return f"{row.key}/lr{lr:g}-s{seed}"


def load_runs() -> dict[str, dict]:
    path = RESULTS / "runs.jsonl"
    if not path.exists():
        return {}
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {run["run"]: run for run in runs}


def train_one(row: Row, lr: float, seed: int, say) -> dict:
    """Train one (row, lr, seed) on compare's setting and append its result line to runs.jsonl."""
    from velora.training.loop import TrainConfig, TrainingDiverged, train

    torch.set_num_threads(1)  # as compare's workers
    config = TrainConfig(method=row.method, lr=lr, options=row.options, **{**SETTING, "seed": seed})
    folder = fresh_dir(RUNS_ROOT / run_key(row, lr, seed))  # a run stopped half-way starts over
    say(f"  {run_key(row, lr, seed)} ...")
    began = time.perf_counter()
    try:
        result = train(config, folder, progress=False, tensorboard=False)
        ppl, state = result["val_ppl"], (result.get("peak_breakdown") or {}).get("optimizer_state")
    except TrainingDiverged as err:
        ppl, state = math.inf, None
        say(f"  diverged: {str(err)[:160]}")
    run = {"run": run_key(row, lr, seed), "row": row.key, "lr": lr, "seed": seed, "val_ppl": ppl,
           "optimizer_state_bytes": state, "wall_s": round(time.perf_counter() - began, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "runs.jsonl").open("a") as handle:
        handle.write(json.dumps(run) + "\n")
    say(f"  {run['run']}: val ppl {ppl:.2f} ({run['wall_s']:.0f} s)")
    return run


def _seed0(row: Row, runs: dict[str, dict]) -> dict[float, float]:
    return {run["lr"]: run["val_ppl"] for run in runs.values() if run["row"] == row.key and run["seed"] == 0}


def next_lr(row: Row, runs: dict[str, dict]) -> float | None:
    """The next seed-0 lr the bracket search needs (a factor-2 neighbour of the best one not yet run; the grid
    extends past its first guess as far as needed), or None once both neighbours of the best lr are run."""
    tried = _seed0(row, runs)
    if not tried:
        return row.start
    best = min(tried, key=tried.get)
    done = {f"{lr:g}" for lr in tried}
    for neighbour in (float(f"{best / 2:g}"), float(f"{best * 2:g}")):  # (rounded as the run keys are)
        if f"{neighbour:g}" not in done and len(tried) < MAX_SEED0_RUNS:
            return neighbour
    return None


def best_lr(row: Row, runs: dict[str, dict]) -> tuple[float | None, bool]:
    """The seed-0 best lr and whether the grid brackets it (a worse lr run on both sides)."""
    tried = _seed0(row, runs)
    if not tried:
        return None, False
    best = min(tried, key=tried.get)
    return best, any(lr < best for lr in tried) and any(lr > best for lr in tried)


def _train_and_record(row: Row, lr: float, seed: int, runs: dict[str, dict], say) -> None:
    run = train_one(row, lr, seed, say)
    runs[run["run"]] = run
    write_report(runs)


def run_row(row: Row, runs: dict[str, dict], say, phase: str = "all", seeds: tuple[int, ...] | None = None) -> None:
    """Run ``phase`` of one row: "start" (its first lr on seed 0), "bracket" (the seed-0 lr search), "seeds" (the
    other seeds at the best seed-0 lr so far; ``seeds`` restricts which), or "all" three in turn."""
    if row.method == "flora-opt" and not flora_opt_available():
        say(f"skipping {row.key}: flora-opt is not installed (pip install --no-deps flora-opt==0.0.3)")
        return
    say(f"{row.key} ({phase}): {row.label}")
    if phase == "start" and not _seed0(row, runs):
        _train_and_record(row, row.start, 0, runs, say)
    while phase in ("bracket", "all") and (lr := next_lr(row, runs)) is not None:
        _train_and_record(row, lr, 0, runs, say)
    if phase not in ("seeds", "all"):
        return
    lr, bracketed = best_lr(row, runs)
    if lr is None:
        return
    if not bracketed:
        say(f"  {row.key}: the best seed-0 lr so far, {lr:g}, is not bracketed")
    for seed in row.seeds[1:]:
        if (seeds is None or seed in seeds) and run_key(row, lr, seed) not in runs:
            _train_and_record(row, lr, seed, runs, say)


def eps_floor_check(run: Path) -> str:
    """How many 2-D weights of a finished run have mean(G^2) below torch Adafactor's eps1 (float32 eps), where our
    Adafactor base clamps the row-statistic mean: one batch (step 500's), clipped to norm 1 as compare clips."""
    from velora.training.config import TrainConfig
    from velora.training.loop import build_base_model, latest_checkpoint, load_data, load_model_weights

    config = TrainConfig(**json.loads((run / "config.json").read_text()))
    data = load_data(config, run_folder=run)
    model = build_base_model(config, data.tokenizer.vocab_size)
    load_model_weights(model, latest_checkpoint(run))
    batch = data.train.batch(500, config.batch_size)  # (B, T)
    model(input_ids=batch, labels=batch).loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], config.grad_clip)
    eps1 = torch.finfo(torch.float32).eps
    means = sorted(p.grad.pow(2).mean().item() for p in model.parameters() if p.grad is not None and p.dim() == 2)
    below = sum(mean < eps1 for mean in means)
    return (f"{run}: {below} of {len(means)} matrices have mean(G^2) < eps1 = {eps1:.2e} (min {means[0]:.1e}, "
            f"median {means[len(means) // 2]:.1e}, max {means[-1]:.1e})")


def flora_opt_step_check(scale: float, steps: int = 30) -> float:
    """Largest relative weight difference between our uncompressed ``Flora`` (as the "uncompressed" row builds it)
    and flora-opt's uncompressed optimizer after ``steps`` identical random gradients of RMS ``scale`` on
    llama-small (70% of the embedding rows get a zero gradient, as rare tokens do)."""
    import copy

    from flora_opt.optimizers.torch import Flora as AuthorsFlora

    from velora.methods.registry import MethodOptions, build_optimizer
    from velora.training.models import build_config, build_model

    torch.manual_seed(0)
    ours = build_model(build_config("llama-small", vocab_size=SETTING["vocab_size"]))
    theirs = copy.deepcopy(ours)
    ours_opt = build_optimizer(ours, "flora", MethodOptions.from_flat({"lr": 3e-2, **ROWS[0].options}))
    theirs_opt = AuthorsFlora(list(theirs.parameters()), lr=3e-2, rank=None, kappa=KAPPA, beta1=0.9)
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        for (name, mine), other in zip(ours.named_parameters(), theirs.parameters()):
            grad = torch.randn(mine.shape, generator=generator) * scale  # same shape as the weight
            if "embed" in name:
                grad[torch.rand(mine.shape[0], generator=generator) < 0.7] = 0  # (V, d): unseen tokens
            mine.grad, other.grad = grad.clone(), grad.clone()
        ours_opt.step()
        theirs_opt.step()
    return max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(ours.parameters(), theirs.parameters()))


# ---- report ---------------------------------------------------------------------------------------------------

def summarize(row: Row, runs: dict[str, dict]) -> dict | None:
    lr, bracketed = best_lr(row, runs)
    if lr is None:
        return None
    grid = {f"{lr:g}": ppl for lr, ppl in sorted(_seed0(row, runs).items())}
    seeds = {seed: runs[run_key(row, lr, seed)]["val_ppl"] for seed in row.seeds if run_key(row, lr, seed) in runs}
    ppls = list(seeds.values())
    state = runs[run_key(row, lr, 0)].get("optimizer_state_bytes")
    return {"row": row.key, "label": row.label, "lr": lr, "bracketed": bracketed, "lr_grid_seed0": grid,
            "val_ppl_by_seed": seeds, "mean": statistics.fmean(ppls),
            "std": statistics.stdev(ppls) if len(ppls) > 1 else None, "optimizer_state_bytes": state}


def compare_rows(row: dict, reference: dict, target: float) -> dict:
    """Ratio of the means and the per-seed ratios, over the seeds both rows have."""
    common = sorted(set(row["val_ppl_by_seed"]) & set(reference["val_ppl_by_seed"]))
    paired = [row["val_ppl_by_seed"][s] / reference["val_ppl_by_seed"][s] for s in common]
    # over the seeds both rows have, so a row with fewer seeds is not set against another seed mix
    ratio = statistics.fmean(row["val_ppl_by_seed"][s] for s in common) / statistics.fmean(
        reference["val_ppl_by_seed"][s] for s in common)
    # a verdict needs both rows at a bracketed lr with every seed; short of that the ratio is provisional
    final = all(r["bracketed"] and len(r["val_ppl_by_seed"]) == len(SEEDS) for r in (row, reference))
    return {"row": row["row"], "reference": reference["row"], "ratio_of_means": ratio,
            "paired_ratios": paired, "seeds": common, "target": target, "met": ratio <= target, "final": final}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_report(runs: dict[str, dict]) -> dict:
    summaries = {row.key: s for row in ROWS if (s := summarize(row, runs)) is not None}
    ratios = [compare_rows(summaries[a], summaries[b], t) for a, b, t in TARGETS if a in summaries and b in summaries]
    table = [[s["label"], f"{s['lr']:g}" + ("" if s["bracketed"] else " (not bracketed)"),
              " · ".join(f"{lr} → {_fmt(p)}" for lr, p in s["lr_grid_seed0"].items()),
              " / ".join(_fmt(p) for p in s["val_ppl_by_seed"].values()),
              f"{_fmt(s['mean'])} ± {_fmt(s['std'])}" if s["std"] is not None else _fmt(s["mean"]),
              _fmt((s["optimizer_state_bytes"] or 0) / 2**20)] for s in summaries.values()]
    ratio_table = [[r["row"], r["reference"], f"{100 * (r['ratio_of_means'] - 1):+.2f}%",
                    " / ".join(f"{100 * (p - 1):+.2f}%" for p in r["paired_ratios"]),
                    f"≤ {100 * (r['target'] - 1):+.0f}%",
                    ("yes" if r["met"] else "no") + ("" if r["final"] else " (provisional)")] for r in ratios]
    text = "\n\n".join([
        "# FLoRA momentum on velora compare's setting (issue #16)",
        f"llama-small, {SETTING['steps']} steps x {SETTING['batch_size']} x {SETTING['seq_len']} tokens, compare's "
        f"schedule; lr picked on seed 0 from a factor-2 grid (the best lr's neighbours run), then seeds "
        f"{', '.join(map(str, SEEDS[1:]))} at it. `python benchmarks/bench_flora_momentum.py` reruns what is missing.",
        markdown_table(["row", "best lr", "seed-0 lr grid (val ppl)", "val ppl per seed", "mean ± std",
                        "opt. state MiB"], table),
        markdown_table(["row", "vs", "ratio of means", "per seed", "target", "met"], ratio_table),
    ] + [f"Run `{run['run']}` is not the bench's own: {run['source']}." for run in runs.values() if run.get("source")])
    summary = {"setting": {**SETTING, "rank": RANK, "kappa": KAPPA}, "rows": summaries, "ratios": ratios,
               "environment": environment()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.md").write_text(text + "\n")
    write_json(RESULTS / "results.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=[row.key for row in ROWS], help="rows to run (default: all)")
    parser.add_argument("--report", action="store_true", help="only rewrite the tables from finished runs")
    parser.add_argument("--phase", choices=("all", "start", "bracket", "seeds"), default="all",
                        help="all: each row in turn, start + bracket + seeds (default); the others run one phase "
                             "across the rows (breadth first, for a short time budget)")
    parser.add_argument("--seeds", nargs="+", type=int, choices=SEEDS[1:], help="--phase seeds: only these seeds")
    parser.add_argument("--eps-check", type=Path, metavar="RUN", help="only report, for a finished run folder, how "
                        "many matrices have mean(G^2) below torch Adafactor's eps1")
    parser.add_argument("--opt-check", action="store_true", help="only compare our uncompressed Flora with flora-opt's "
                        "on random gradients of RMS 1e-2 and 1e-4 (the second is below torch Adafactor's eps1 rule)")
    args = parser.parse_args(argv)
    if args.opt_check:
        for scale in (1e-2, 1e-4):
            print(f"gradient RMS {scale:g}: max relative weight difference {flora_opt_step_check(scale):.1e}")
        return 0
    if args.eps_check:
        print(eps_floor_check(args.eps_check))
        return 0

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    if flora_opt_available():
        register_flora_opt()
    runs = load_runs()
    if not args.report:
        for row in ROWS:
            if args.rows is None or row.key in args.rows:
                run_row(row, runs, say, args.phase, tuple(args.seeds) if args.seeds else None)
    summary = write_report(runs)
    for ratio in summary["ratios"]:
        paired = ", ".join(f"{100 * (p - 1):+.2f}%" for p in ratio["paired_ratios"])
        verdict = ("met" if ratio["met"] else "NOT met") + ("" if ratio["final"] else ", provisional")
        print(f"{ratio['row']:>18} vs {ratio['reference']:<14} {100 * (ratio['ratio_of_means'] - 1):+6.2f}% "
              f"(per seed {paired}; target ≤ {100 * (ratio['target'] - 1):+.0f}%: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
