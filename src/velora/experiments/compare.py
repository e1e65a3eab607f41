"""`velora compare` — the main job: a CPU-sized VeLoRA Tab. 4 / GradNormLoRP Tab. 2.

Pre-train the same small LLaMA from the same seed on the offline stdlib corpus with every method —
equal steps, equal tokens, equal batch order — then report validation perplexity, the measured
saved-activation bytes, the peak of a training step by category and the step time relative to full
training. Learning rates were tuned per method on a grid (``LR_GRID`` on the default setting; best kept in
``TUNED_LR``) and are printed with the table. The methods train in parallel worker
processes (``--jobs``), one thread each; the numbers do not depend on the number of jobs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from velora.experiments.common import (
    environment,
    fresh_dir,
    rows_to_console,
    write_json,
)
from velora.experiments.compare_folder import finished_result, prepare_folder, run_folder
from velora.experiments.compare_jobs import Job, default_jobs, train_jobs
from velora.experiments.compare_plot import write_plot
from velora.experiments.compare_report import HEADERS, render_markdown, table_rows
from velora.experiments.progress import MethodState, ProgressBoard
from velora.methods.registry import base_methods, parse_method

DEFAULT_METHODS = ("full", "velora", "lora", "galore", "flora", "gradnormlorp")
DEFAULT_OUT = "velora-runs/compare"
PLAIN_PROGRESS_EVERY_S = 30.0  # without a terminal: one progress line this often

# the CPU-sized setting (llama-small: d=128, 4 layers, MLP 352, vocab 2048 BPE, 1.3M parameters)
# 1000 steps x 5 x 128 tokens = 640k tokens per method. The step count is what carries full AdamW off its early
# loss plateau (250 steps x 8 x 128 left full behind every compressed method); with 5 x 128-token batches the six
# methods take ~5.5 min with two parallel jobs on 2 cores (1000 x 8 x 128 would need ~8.5 min, too close to the
# 10-min budget). Linear warmup over the first 10% of steps, cosine to 0.1 x lr.
SETTING = dict(model="llama-small", data="stdlib", tokenizer="bpe", vocab_size=2048, bpe_train_chars=1_000_000,
               max_train_chars=1_500_000, max_val_chars=200_000, seq_len=128, batch_size=5, steps=1000,
               warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0, eval_batches=8, seed=0)
# the setting the learning rates were first tuned on (and that `velora bench flora-kappa` keeps)
TUNING_SETTING = {**SETTING, "seq_len": 128, "batch_size": 8, "steps": 250, "warmup_steps": 25}
RANK = 64  # r / d_model = 64 / 128, the ratio of Tab. 4's 60M column (128 / 256)
SUB_TOKEN_SIZE = 4  # M = D/32 for the value projection (D = 128); the down projection (D = 352) has 88 groups
UPDATE_GAP = 50  # GaLore / GradNormLoRP subspace refresh (kept from the 250-step tuning run)
# FLoRA as the paper runs it (issue #16): Adafactor base, kappa = 1000 (never resampled in 1000 steps), with Flora's
# defaults (update momentum, current step exact, orthonormal rows, eps1 1e-15; benchmarks/bench_flora_momentum.py)
PAPER_OPTIONS = {"flora": {"optimizer": "adafactor", "flora_kappa": 1000}}
# beside the method's name in the table: the base and kappa it ran with (from PAPER_OPTIONS, so they cannot drift)
TABLE_TAGS = {base: f"{options['optimizer'].capitalize()}, κ={options['flora_kappa']}"
              for base, options in PAPER_OPTIONS.items()}

# Learning rates. Every method was first tuned on TUNING_SETTING (250 steps x 8 x 128, TUNING_GRID), then re-tuned
# on the default setting (LR_GRID, same seed; each grid brackets its best; FLoRA with its smaller-side projection):
# the lr with the lowest validation ppl is kept in TUNED_LR. Every run is in benchmarks/results/compare/lr_sweep.jsonl.
TUNING_GRID = {"full": (1e-3, 3e-3, 1e-2, 2e-2), "velora": (3e-3, 1e-2), "lora": (1e-3, 3e-3, 1e-2),
               "galore": (1e-2, 2e-2), "flora": (3e-4, 1e-3, 3e-3, 1e-2), "gradnormlorp": (3e-3, 1e-2)}
LR_GRID = {"full": (1e-3, 2e-3, 3e-3), "velora": (1e-3, 2e-3, 3e-3), "lora": (5e-4, 1e-3, 2e-3, 4e-3),
           "galore": (2.5e-3, 5e-3, 1e-2, 2e-2), "gradnormlorp": (2.5e-3, 5e-3, 1e-2, 2e-2),
           "flora": (1.5e-2, 3e-2, 6e-2)}  # flora: Adafactor base, the bench's seed-0 grid (bench_flora_momentum.py)
TUNED_LR = {"full": 2e-3, "velora": 2e-3, "lora": 2e-3, "galore": 5e-3, "flora": 3e-2, "gradnormlorp": 5e-3,
            "dora": 2e-3}
# the 250-step optima, used by `bench flora-kappa` on TUNING_SETTING
TUNING_LR = {"full": 3e-3, "velora": 3e-3, "lora": 1e-3, "galore": 1e-2, "flora": 1e-3, "gradnormlorp": 1e-2,
             "dora": 1e-3}

# the papers' numbers (validation ppl, memory) for the smallest model they pre-train (LLaMA 60M, C4)
PAPER = {
    "VeLoRA Tab. 4 (60M, 1.1B tokens, on-device GPU memory)": {
        "full": (34.06, "1.30G"), "galore": (34.88, "1.27G"), "lora": (34.99, "0.86G"), "velora": (33.76, "1.18G"),
        "flora": (34.35, "1.27G (poster)"),
    },
    "GradNormLoRP Tab. 2 (60M, 1.1B tokens, BF16 weights+optimizer estimate)": {
        "full": (34.51, "0.35G"), "lora": (35.33, "0.35G"), "dora": (35.42, "0.37G"), "galore": (34.94, "0.23G"),
        "gradnormlorp": (34.63, "0.17G"),
    },
}


def method_overrides(method: str, rank: int, sub_token_size: int, update_gap: int) -> dict[str, Any]:
    """TrainConfig fields (options / velora) a method needs beyond the shared setting: its options at rank r and
    refresh interval T, as its registry entry sizes them (``BaseMethod.sized``)."""
    base = parse_method(method).base
    options = {**base_methods()[base].sized(rank, update_gap), **PAPER_OPTIONS.get(base, {})}
    return {"options": options, "velora": {"sub_token_size": sub_token_size, "target_modules": "paper"}}


def table_label(method: str) -> str:
    """The method's name in the table, with the base and kappa beside it where they are not the usual ones."""
    tag = TABLE_TAGS.get(parse_method(method).base)
    return f"{method} ({tag})" if tag else method


def describe(method: str, rank: int, sub_token_size: int, update_gap: int) -> str:
    parsed = parse_method(method)
    text = {
        "full": "AdamW on every weight",
        "lora": f"peft LoRA r={rank} on all linears + trainable embeddings/norms/head",
        "dora": f"peft DoRA r={rank} on all linears + trainable embeddings/norms/head",
        "galore": f"GaLore AdamW r={rank}, T={update_gap}, scale 0.25 on attention/MLP weights",
        "flora": f"FLoRA compressed momentum r={rank}, kappa={PAPER_OPTIONS['flora']['flora_kappa']}, Adafactor base "
                 "(the paper's setting), update "
                 "momentum with the current step exact, orthonormal rows, eps1 1e-15 (Flora's defaults)",
        "gradnormlorp": f"GradNormLoRP r={rank}, projection r={rank // 2}, T={update_gap}, scale 0.25",
    }.get(parsed.base, parsed.base)
    if parsed.velora:
        text = ("" if parsed.base == "full" else text + " + ") + \
            f"VeLoRA M={sub_token_size} on v_proj + down_proj (full weights)"
    if parsed.checkpointing:
        text += " + gradient checkpointing"
    return text



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--steps", type=int, default=SETTING["steps"], help="optimizer steps per method")
    parser.add_argument("--model", default=SETTING["model"], help="model preset")
    parser.add_argument("--batch-size", type=int, default=SETTING["batch_size"], help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=SETTING["seq_len"], help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=RANK, help="rank of LoRA / GaLore / FLoRA / GradNormLoRP")
    parser.add_argument("--sub-token-size", type=int, default=SUB_TOKEN_SIZE, help="VeLoRA sub-token size M")
    parser.add_argument("--update-gap", type=int, default=UPDATE_GAP,
                        help="GaLore/GradNormLoRP subspace refresh (steps); FLoRA keeps the paper's kappa=1000")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help="override a tuned learning rate, e.g. --lr velora=1e-3 (repeatable)")
    parser.add_argument("--data", default=SETTING["data"], help="corpus (default: the offline stdlib corpus)")
    parser.add_argument("--seed", type=int, default=SETTING["seed"], help="model init and batch order seed")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    # methods run in parallel worker processes with one thread each: at d=128 the matmuls are too small to
    # gain from intra-op threads, and on a shared machine two spinning OpenMP threads ran 5-10x slower than one
    parser.add_argument("--jobs", type=int, default=None,
                        help=f"methods trained at once, each in its own process (default min(2, CPUs) = "
                             f"{default_jobs()}); the numbers do not depend on it")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per job (default 1)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress display (the started/finished lines are still printed on stderr)")
    parser.add_argument("--fresh", action="store_true",
                        help="retrain every method, replacing an earlier `velora compare` in --out (by default "
                             "finished methods of the same arguments are reused)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")


def _parse_lrs(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        method, sep, value = item.partition("=")
        try:
            out[parse_method(method).name] = float(value)
        except ValueError:
            raise ValueError(f"--lr {item!r} must look like METHOD=LR, e.g. velora=1e-3") from None
        if not sep:
            raise ValueError(f"--lr {item!r} must look like METHOD=LR, e.g. velora=1e-3")
    return out



def lr_source(method: str, overrides: dict[str, float]) -> str:
    """Where a method's learning rate comes from (printed beside it)."""
    if method in overrides:
        return "override"
    name = method if method in TUNED_LR else parse_method(method).base
    if name in LR_GRID:
        return f"tuned at {SETTING['steps']} x {SETTING['batch_size']} x {SETTING['seq_len']}"
    if name in TUNING_GRID:
        return "tuned at 250 x 8 x 128"
    return "LoRA's lr, not tuned" if name == "dora" else "not tuned"


def _check_arguments(args: argparse.Namespace) -> tuple[list[str], int, int]:
    """(methods, jobs, threads per job) from the arguments; one-line errors for bad ones."""
    methods = [parse_method(m.strip()).name for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods is empty; pass e.g. full,velora")
    n_jobs = default_jobs() if getattr(args, "jobs", None) is None else args.jobs
    if n_jobs < 1:
        raise ValueError(f"--jobs {n_jobs} must be >= 1 (the number of methods trained at once)")
    threads = args.threads if args.threads is not None else 1
    if threads < 1:
        raise ValueError(f"--threads {threads} must be >= 1")
    return methods, min(n_jobs, len(methods)), threads


def run_compare(args: argparse.Namespace, log=None) -> dict[str, Any]:
    from velora.training.loop import TrainConfig, load_data

    say = log or (lambda message: print(message, file=sys.stderr))
    methods, n_jobs, threads = _check_arguments(args)
    lr_overrides = _parse_lrs(args.lr)
    out = Path(args.out)
    setting = {**SETTING, "steps": args.steps, "model": args.model, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "data": args.data, "seed": args.seed,
               "warmup_steps": max(1, args.steps // 10)}
    configs = {}
    for method in methods:
        base = parse_method(method).base
        lr = lr_overrides.get(method, TUNED_LR.get(method, TUNED_LR.get(base, 1e-3)))
        configs[method] = TrainConfig(method=method, lr=lr, **setting,
                                      **method_overrides(method, args.rank, args.sub_token_size, args.update_gap))
    arguments = {**setting, "rank": args.rank, "sub_token_size": args.sub_token_size, "update_gap": args.update_gap,
                 "threads_per_job": threads}
    prepare_folder(out, arguments, {m: c.to_dict() for m, c in configs.items()}, fresh=args.fresh, say=say)
    started = time.perf_counter()
    finished: dict[str, dict[str, Any]] = {}
    jobs = []
    for method, config in configs.items():
        say(f"{method}: {describe(method, args.rank, args.sub_token_size, args.update_gap)}, lr {config.lr:g}")
        run_dir = run_folder(out, method)
        earlier = finished_result(run_dir, config.to_dict())
        if earlier is not None:
            finished[method] = {**earlier, "reused": True}
            say(f"{method}: reusing the finished run in {run_dir} (same arguments; --fresh retrains)")
        else:
            jobs.append(Job(method, config, fresh_dir(run_dir), threads, progress=False,
                            device=getattr(args, "device", "auto")))
    board = ProgressBoard([MethodState(m, args.steps, run_folder(out, m) / "log.csv") for m in methods],
                          enabled=not args.no_progress, plain_every_s=PLAIN_PROGRESS_EVERY_S)
    for method, result in finished.items():
        board.done(method, f"reused: val ppl {result['val_ppl']:.2f}", state="reused")

    def save_partial(method: str, result: dict[str, Any]) -> None:
        finished[method] = result
        write_results(out, summarize(args, methods, finished, setting, lr_overrides, n_jobs, threads,
                                     time.perf_counter() - started))

    board.start()
    try:
        train_jobs(jobs, n_jobs, say, board, save_partial, load_data)
    finally:
        board.stop()
    summary = summarize(args, methods, finished, setting, lr_overrides, n_jobs, threads,
                        time.perf_counter() - started)
    write_results(out, summary)
    plot = write_plot(summary, out / "compare.png")
    summary["plot"] = str(plot) if plot else None
    return summary



def summarize(args, methods: list[str], finished: dict[str, dict[str, Any]], setting: dict[str, Any],
              lr_overrides: dict[str, float], n_jobs: int, threads: int, runtime: float) -> dict[str, Any]:
    """results.json's content for the methods finished so far (kept in the --methods order)."""
    results = {method: {**finished[method], "lr_source": lr_source(method, lr_overrides)}
               for method in methods if method in finished}
    reference = results.get("full")
    rows = []
    for method, result in results.items():
        row = {
            "method": method,
            "label": table_label(method),
            "description": describe(method, args.rank, args.sub_token_size, args.update_gap),
            "lr": result["lr"],
            "lr_source": result["lr_source"],
            "val_ppl": result["val_ppl"],
            "val_ppl_vs_full_pct": (100 * (result["val_ppl"] / reference["val_ppl"] - 1)) if reference else None,
            "activation_bytes": result["activation_bytes"],
            "peak_bytes": result["peak_bytes"],
            "peak_breakdown": result["peak_breakdown"],
            "step_time_s": result["step_time_median_s"],
            "step_time_ratio": (result["step_time_median_s"] / reference["step_time_median_s"]) if reference else None,
            "wall_s": result["wall_s"],
            "cpu_s": result["cpu_s"],
            "reused": bool(result.get("reused")),
            "trainable_parameters": result["trainable_parameters"],
            "initial_loss": result["initial_loss"],
            "final_loss": result["final_loss"],
            "loss_curve": result["loss_curve"],
        }
        rows.append(row)
    first = next(iter(results.values()))
    reused = [row["method"] for row in rows if row["reused"]]
    return {
        "complete": len(results) == len(methods),
        "missing": [m for m in methods if m not in results],
        "rows": rows,
        "setting": {**setting, "rank": args.rank, "sub_token_size": args.sub_token_size,
                    "update_gap": args.update_gap, "tokens_per_method": first["tokens"],
                    "parameters": first["parameters"]},
        "learning_rates": {m: r["lr"] for m, r in results.items()},
        "lr_tuning": "lowest validation ppl on a grid, same model, data and seed; tuned on the default setting "
                     f"({SETTING['steps']} x {SETTING['batch_size']} x {SETTING['seq_len']}): "
                     + "; ".join(f"{m}: {', '.join(f'{lr:g}' for lr in grid)}" for m, grid in LR_GRID.items())
                     + "".join(f"; {m}: tuned once at 250 x 8 x 128 ({', '.join(f'{lr:g}' for lr in grid)})"
                               for m, grid in TUNING_GRID.items() if m not in LR_GRID),
        "data_fingerprint": first["data_fingerprint"],
        "tokenizer": first["tokenizer"],
        "memory_source": first["memory_source"],
        "paper": {k: {m: list(v) for m, v in table.items()} for k, table in PAPER.items()},
        "runtime_s": runtime,
        "jobs": n_jobs,
        "threads_per_job": threads,
        "reused": reused,
        "timing_note": f"step times are medians over steps 2..{setting['steps']} measured inside each method's own "
                       f"process while {n_jobs} job{'s' if n_jobs > 1 else ''} of {threads} thread"
                       f"{'s' if threads > 1 else ''} ran at once"
                       + (f" (reused methods {', '.join(reused)}: in their earlier run)" if reused else ""),
        "environment": environment(),
    }


def write_results(out: Path, summary: dict[str, Any]) -> None:
    write_json(out / "results.json", summary)
    (out / "results.md").write_text(render_markdown(summary))


def run(args: argparse.Namespace) -> int:
    try:
        summary = run_compare(args)
    except KeyboardInterrupt:
        print(f"velora compare: stopped; the methods that finished are kept in {args.out} (results.md lists them); "
              "run the same command again to train only the rest", file=sys.stderr)
        return 130
    if args.json:
        slim = {**summary, "rows": [{k: v for k, v in r.items() if k != "loss_curve"} for r in summary["rows"]]}
        print(json.dumps(slim, default=str))
        return 0
    s = summary["setting"]
    rows_to_console(HEADERS, table_rows(summary),
                    f"velora compare — {s['model']}, {s['tokens_per_method']:,} tokens/method "
                    f"(memory in MiB)")
    print("learning rates (lowest val ppl on a grid, see results.md): "
          + ", ".join(f"{r['method']} {r['lr']:g} ({r['lr_source']})" for r in summary["rows"]))
    print(summary["timing_note"])
    print(f"wrote {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'}"
          + (f", {summary['plot']}" if summary["plot"] else "") + f" in {summary['runtime_s']:.0f} s")
    return 0
