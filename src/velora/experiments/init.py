"""`velora bench init` — VeLoRA Tab. 5c: how the rank-1 direction v is initialised (M = D/32).

random (a seeded unit vector), SVD (top singular vector of the first batch's sub-tokens), fixed
average (the first batch's mean sub-token, the paper's default) and running average (an EMA of the
batch means), each as LoRA + VeLoRA fine-tuning of the base model on stdlib docstrings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from velora.experiments import ablation
from velora.experiments.ablation import Variant, act_mib
from velora.experiments.control import control_sentence, frozen_control

STRATEGIES = (("Random", "random"), ("SVD", "svd"), ("Fixed average", "batch_average_once"),
              ("Running average", "ema"))
PAPER_ROWS = [["Random", 36.8], ["SVD", 37.1], ["Fixed average", 39.5], ["Running average", 38.9]]


def run_experiment(args: argparse.Namespace, out: Path, say) -> dict:
    base = ablation.ensure_base(out.parent / "shared", args.base_steps, not args.no_progress, say)
    steps = args.steps or ablation.FINETUNE["steps"]
    variants = [Variant("LoRA (no VeLoRA)", ablation.finetune_config(base, "lora", steps=steps), {"init": "–"})]
    for label, init in STRATEGIES:
        velora = {"num_groups": 32, "pad": True, "target_modules": "paper", "init": init}
        variants.append(Variant(label, ablation.finetune_config(base, "lora+velora", velora, steps=steps),
                                {"init": init}))
    variants.append(frozen_control(base, steps, columns={"init": "–"}))
    rows = ablation.run_variants(variants, out, not args.no_progress, say)
    reference = rows[0]
    table = [[r["label"], r["val_ppl"], f"{100 * (r['val_ppl'] / reference['val_ppl'] - 1):+.2f}%", act_mib(r)]
             for r in rows]
    ranked = sorted(rows[1:-1], key=lambda r: r["val_ppl"])
    verdict = (f"Ranking here (best first): {', '.join(r['label'] for r in ranked)}. The paper ranks fixed average > "
               "running average > SVD > random. "
               + ("Agreement: the average-based inits beat random and SVD." if {r["label"] for r in ranked[:2]} ==
                  {"Fixed average", "Running average"} else
                  "Partial or no agreement with the paper's ranking at this scale; the spread is "
                  f"{ranked[-1]['val_ppl'] - ranked[0]['val_ppl']:.2f} ppl.")
               + " " + control_sentence(next(r for r in rows if r["label"] == "Fixed average"), rows[-1], reference,
                                        "LoRA"))

    def plot(plt, rows):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        axes[0].bar([r["label"] for r in rows], [r["val_ppl"] for r in rows], color="tab:blue")
        axes[0].set_ylabel("validation ppl (lower is better)")
        axes[0].set_title("ours")
        axes[0].tick_params(axis="x", rotation=20)
        axes[1].bar([p[0] for p in PAPER_ROWS], [p[1] for p in PAPER_ROWS], color="tab:orange")
        axes[1].set_ylabel("MMLU acc (higher is better)")
        axes[1].set_title("paper (LLaMA-7B, Alpaca)")
        axes[1].tick_params(axis="x", rotation=20)
        lo = min(r["val_ppl"] for r in rows)
        axes[0].set_ylim(lo * 0.97, max(r["val_ppl"] for r in rows) * 1.01)
        axes[1].set_ylim(35, 40)
        fig.suptitle("VeLoRA initialisation of v (Tab. 5c)")
        return fig

    intro = (f"LoRA r=16 + VeLoRA (M = D/32 per layer, v_proj + down_proj LoRA-A inputs) fine-tuning of the base "
             f"model on stdlib docstrings/comments, {steps} steps; only the initialisation of v changes.")
    return ablation.write_outputs(out, "init", "initialisation of v (VeLoRA Tab. 5c)", intro,
                                  ["init", "val ppl", "Δ ppl vs LoRA", "saved act. MiB"], table,
                                  "VeLoRA Tab. 5c, LLaMA-7B on Alpaca, MMLU, M = D/32", ["init", "acc"], PAPER_ROWS,
                                  verdict, rows, {"steps": steps}, plot)
