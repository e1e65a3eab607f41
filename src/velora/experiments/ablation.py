"""The shared machinery of `velora bench`: a pre-trained base model, the fine-tuning setting of the
VeLoRA ablations, a runner for a list of variants, and the md/json/PNG writer with the paper beside us.

VeLoRA's ablations (Tab. 5, 6) fine-tune a pre-trained LLaMA-7B with (Q)LoRA + VeLoRA on Alpaca and
score MMLU. Our CPU stand-in: pre-train llama-small on the stdlib *code* corpus once (cached), then
fine-tune it with LoRA (+ VeLoRA on the adapters) on a second domain, the stdlib *docstrings and
comments*, and score validation perplexity on held-out docstrings (lower is better, where the paper's
accuracy is higher-is-better).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velora.experiments.common import environment, fresh_dir, markdown_table, mib, pyplot, rows_to_console, write_json

BASE_STEPS = 200
BASE = dict(method="full", model="llama-small", data="stdlib", tokenizer="bpe", vocab_size=2048,
            bpe_train_chars=1_000_000, max_train_chars=1_500_000, max_val_chars=200_000, seq_len=128, batch_size=8,
            warmup_steps=25, lr=3e-3, eval_batches=8, seed=0)
FINETUNE = dict(model="llama-small", data="stdlib-docs", max_train_chars=400_000, max_val_chars=100_000, seq_len=128,
                batch_size=8, steps=80, warmup_steps=8, lr=3e-3, eval_batches=8, seed=0,
                options={"lora_rank": 16, "lora_alpha": 32.0, "lora_targets": "all-linear"})


@dataclass
class Variant:
    label: str
    config: Any  # TrainConfig
    columns: dict[str, Any] = field(default_factory=dict)
    on_model_ready: Callable | None = None  # passed to train(): e.g. the frozen control (experiments/control.py)


def ensure_base(root: Path, steps: int, progress: bool, say, model: str | None = None) -> Path:
    """The pre-trained base model (``model``, by default ``BASE["model"]``, on stdlib code), trained once and
    reused while its configuration is unchanged. Returns the run folder (holding tokenizer.json and
    checkpoints/)."""
    from velora.training.loop import TrainConfig, latest_checkpoint, train

    model = model or BASE["model"]
    config = TrainConfig(steps=steps, **{**BASE, "model": model})
    folder = root / ("base" if model == BASE["model"] else f"base-{model}")
    saved = folder / "config.json"
    if saved.exists() and json.loads(saved.read_text()) == config.to_dict() and (folder / "result.json").exists():
        if latest_checkpoint(folder) is not None:
            say(f"reusing the pre-trained base model in {folder}")
            return folder
    say(f"pre-training the base model ({model}, stdlib code, {steps} steps) into {folder}")
    fresh_dir(folder)
    train(config, folder, progress=progress, measure=False, tensorboard=False)
    return folder


def finetune_config(base: Path, method: str, velora: dict[str, Any] | None = None, **changes):
    """A fine-tuning TrainConfig on stdlib docstrings/comments starting from the base model."""
    from velora.training.loop import TrainConfig

    settings = {**FINETUNE, **changes}
    settings["options"] = {**FINETUNE["options"], **changes.get("options", {})}
    return TrainConfig(method=method, tokenizer=str(base / "tokenizer.json"), init_from=str(base),
                       velora=velora or {"num_groups": 32, "pad": True, "target_modules": "paper"}, **settings)


def run_variants(variants: list[Variant], out: Path, progress: bool, say, before_each: Callable | None = None
                 ) -> list[dict[str, Any]]:
    from velora.training.loop import train

    rows = []
    for index, variant in enumerate(variants, 1):
        say(f"[{index}/{len(variants)}] {variant.label}")
        slug = "".join(c if c.isalnum() else "-" for c in variant.label.lower()).strip("-")
        result = train(variant.config, fresh_dir(out / "runs" / slug), progress=progress, tensorboard=False,
                       on_model_ready=variant.on_model_ready)
        result.pop("_model")
        rows.append({"label": variant.label, **variant.columns, "method": result["method"], "lr": result["lr"],
                     "val_ppl": result["val_ppl"], "val_history": result["val_history"],
                     "activation_bytes": result["activation_bytes"], "peak_bytes": result["peak_bytes"],
                     "peak_breakdown": result["peak_breakdown"],
                     "step_time_s": result["step_time_median_s"], "final_loss": result["final_loss"],
                     "accumulation_buffer_bytes": result.get("accumulation_buffer_bytes"),
                     "naive_accumulation_bytes": result.get("naive_accumulation_bytes"),
                     "loss_curve": result["loss_curve"], "fingerprint": result["data_fingerprint"]})
    return rows


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="output folder (default velora-runs/bench/<experiment>)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning / training steps per variant")
    parser.add_argument("--base-steps", type=int, default=BASE_STEPS, help="pre-training steps of the base model")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see velora compare)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar per run")


def stderr_say(message: str) -> None:
    print(message, file=sys.stderr)


# ---- output ------------------------------------------------------------------------------------------


def write_outputs(out: Path, name: str, title: str, intro: str, headers: list[str], table: list[list[Any]],
                  paper_title: str, paper_headers: list[str], paper_rows: list[list[Any]], verdict: str,
                  rows: list[dict[str, Any]], setting: dict[str, Any], plot: Callable | None) -> dict[str, Any]:
    """results.json, results.md and <name>.png in ``out``; returns the summary dict."""
    summary = {"experiment": name, "title": title, "rows": [{k: v for k, v in r.items() if k != "loss_curve"}
                                                             for r in rows],
               "table": {"headers": headers, "rows": table}, "paper": {"title": paper_title,
                                                                        "headers": paper_headers, "rows": paper_rows},
               "verdict": verdict, "setting": setting, "environment": environment()}
    md = [f"# velora bench {name}: {title}", "", intro, "", "Ours:", "", markdown_table(headers, table), "",
          f"Paper ({paper_title}):", "", markdown_table(paper_headers, paper_rows), "", verdict, ""]
    (out / "results.md").write_text("\n".join(md))
    png = None
    plt = pyplot()
    if plt is not None and plot is not None:
        fig = plot(plt, rows)
        png = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
    summary["plot"] = str(png) if png else None
    write_json(out / "results.json", summary)
    return summary


def print_summary(summary: dict[str, Any], as_json: bool, out: Path) -> None:
    if as_json:
        print(json.dumps(summary, default=str))
        return
    rows_to_console(summary["table"]["headers"], summary["table"]["rows"], summary["title"])
    rows_to_console(summary["paper"]["headers"], summary["paper"]["rows"], "paper: " + summary["paper"]["title"])
    print(summary["verdict"])
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}" + (f", {summary['plot']}" if summary["plot"] else ""))


def two_panel(plt, ours: list[tuple[str, float, float]], paper: list[tuple[str, float, float]], ours_labels,
              paper_labels, title: str):
    """Left: our (x, y) points, right: the paper's; annotated with their labels."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, points, (xlabel, ylabel), heading in ((axes[0], ours, ours_labels, "ours (CPU scale)"),
                                                    (axes[1], paper, paper_labels, "paper")):
        xs = [p[1] for p in points]
        ys = [p[2] for p in points]
        axis.plot(xs, ys, "o", color="tab:blue" if axis is axes[0] else "tab:orange")
        for label, x, y in points:
            axis.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.set_title(heading)
    fig.suptitle(title)
    return fig


def act_mib(row: dict[str, Any]) -> float | None:
    return mib(row["activation_bytes"])
