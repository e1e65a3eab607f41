"""`velora bench flora-rank` — FLoRA Tab. 1: compressed gradient accumulation, memory vs rank.

Full fine-tuning of the base model on stdlib docstrings with 4 micro-batches per optimizer step,
accumulated plainly (one full gradient buffer per weight) or with FLoRA's compressed accumulation
(each 2-D gradient projected to rank r as soon as it is produced, decompressed at the boundary).
Reports the accumulation buffer bytes and validation ppl per rank. The default projects the smaller
side of each matrix (what the FLoRA reference code does); a few rows project the larger side instead (smaller buffers,
more noise) to show the trade-off.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from velora.experiments import ablation
from velora.experiments.ablation import Variant, mib

RANKS = (8, 16, 32, 64)
ORTHOGONAL_RANKS = (32, 64)
LARGER_SIDE_RANKS = (32, 64)
ACCUMULATION = 4
PAPER_NOTE = ("FLoRA Tab. 1 (papers/flora-paper.txt; the smallest models, T5-small 60M on XSum and GPT-2 110M "
              "on IWSLT17 De-En, Adafactor) has compressed accumulation approach naive accumulation as r grows "
              "(T5-60M r=256: ROUGE 33.6/11.3/26.5 vs 34.0/11.5/26.7, extra memory 0.04 vs 0.12 GiB) and stay far "
              "ahead of LoRA at every rank; at r=8-32 it is 1.8-2.5 ROUGE-1 points (5-7%) behind naive")
# FLoRA Tab. 1 as printed (memory in GiB = total training memory, ΔM = extra over no accumulation); the paper's
# models have d = 512 (T5-small) and 768 (GPT-2 base), so its r = 8...256 is d/64...d/2 (ours: d/16...d/2)
PAPER_ROWS = [
    ["T5-60M XSum: no accumulation", "0.75 GiB", "ROUGE-1/2/L 33.4/11.4/26.4"],
    ["T5-60M XSum: naive", "0.87 GiB (ΔM 0.12)", "34.0/11.5/26.7"],
    ["T5-60M XSum: LoRA r=8 / 32 / 128 / 256", "ΔM 0.07 / 0.11 / 0.19 / 0.32",
     "30.4/8.60/23.6 · 30.7/8.90/23.9 · 31.0/9.10/24.1 · 31.4/9.34/24.5"],
    ["T5-60M XSum: FLoRA r=8 / 32 / 128 / 256", "ΔM 0.00 / 0.00 / 0.02 / 0.04",
     "31.5/9.67/24.6 · 32.2/10.3/25.2 · 33.2/10.9/26.0 · 33.6/11.3/26.5"],
    ["GPT-2 110M IWSLT17: no accumulation", "2.77 GiB", "BLEU 17.9"],
    ["GPT-2 110M IWSLT17: naive", "3.24 GiB (ΔM 0.47)", "24.9"],
    ["GPT-2 110M IWSLT17: LoRA r=8 / 32 / 128 / 256", "ΔM 0.48 / 0.52 / 0.60 / 0.75", "9.94 · 11.2 · 12.2 · 13.4"],
    ["GPT-2 110M IWSLT17: FLoRA r=8 / 32 / 128 / 256", "ΔM 0.15 / 0.16 / 0.20 / 0.26", "16.3 · 22.0 · 24.0 · 25.4"],
]


def run_experiment(args: argparse.Namespace, out: Path, say) -> dict:
    base = ablation.ensure_base(out.parent / "shared", args.base_steps, not args.no_progress, say)
    steps = args.steps or 100
    common = dict(steps=steps, batch_size=2, accumulation_steps=ACCUMULATION, lr=1e-3, warmup_steps=10)
    variants = [Variant("plain accumulation", ablation.finetune_config(base, "full", **common),
                        {"rank": "–", "side": "–", "orthogonal": False})]

    def flora(rank: int, side: str, orthogonal: bool) -> Variant:
        options = {"flora_accumulation": True, "flora_rank": rank, "flora_project": side,
                   "flora_orthogonal": orthogonal}
        label = f"FLoRA r={rank}" + (" orthogonal" if orthogonal else "") + (" larger side" if side == "larger" else "")
        return Variant(label, ablation.finetune_config(base, "full", options=options, **common),
                       {"rank": rank, "side": side, "orthogonal": orthogonal})

    variants += [flora(rank, "smaller", False) for rank in RANKS]
    # not in the paper: orthonormal projection rows trade variance for bias
    variants += [flora(rank, "smaller", True) for rank in ORTHOGONAL_RANKS]
    # the larger side (our former default): a min(n, m) x r buffer instead of max(n, m) x r, more noise
    variants += [flora(rank, "larger", False) for rank in LARGER_SIDE_RANKS]
    rows = ablation.run_variants(variants, out, not args.no_progress, say)
    reference = rows[0]
    naive = rows[1]["naive_accumulation_bytes"]

    def gap(row: dict) -> float:
        return 100 * (row["val_ppl"] / reference["val_ppl"] - 1)

    table = [["plain accumulation", "–", "–", mib(naive), reference["val_ppl"], "–"]]
    for r in rows[1:]:
        table.append([r["label"], r["rank"], r["side"], mib(r["accumulation_buffer_bytes"]), r["val_ppl"],
                      f"{gap(r):+.2f}%"])
    gaussian = [r for r in rows[1:] if not r["orthogonal"] and r["side"] == "smaller"]  # the paper's (Gaussian) setting
    quarter = [r for r in gaussian if r["rank"] >= 32]  # r >= 1/4 of the smaller side (128) of every weight
    worst = max(gap(r) for r in quarter)
    orthogonal = [r for r in rows[1:] if r["orthogonal"]]
    larger = [r for r in rows[1:] if r["side"] == "larger"]
    best_orthogonal = min(orthogonal, key=lambda r: r["val_ppl"]) if orthogonal else None
    smallest, largest = (mib(r["accumulation_buffer_bytes"]) for r in (gaussian[0], gaussian[-1]))
    verdict = (f"Acceptance (r ≥ ¼ of the smaller dimension, i.e. r ≥ 32 for d = 128, smaller side projected): "
               f"worst gap {worst:+.2f}% → {'met' if worst <= 2.0 else 'NOT met'} (target within 2% of plain "
               f"accumulation). Buffers: {mib(naive):.2f} MiB plain vs {smallest:.3f}–{largest:.3f} MiB compressed. "
               + (f"Orthonormal projection rows (not in the paper) reach {best_orthogonal['label']}: "
                  f"{gap(best_orthogonal):+.2f}%. " if best_orthogonal else "")
               + ("Projecting the larger side instead: " + ", ".join(
                   f"r={r['rank']} {gap(r):+.2f}% at {mib(r['accumulation_buffer_bytes']):.3f} MiB" for r in larger)
                  + ". " if larger else "")
               + f"Paper: {PAPER_NOTE}.")

    def plot(plt, rows):
        fig, axis = plt.subplots(figsize=(6.5, 4.2))
        kinds = ((("smaller", False), "o-", "FLoRA, smaller side (Gaussian, default)"),
                 (("smaller", True), "s--", "FLoRA, smaller side (orthonormal)"),
                 (("larger", False), "^:", "FLoRA, larger side (Gaussian)"))
        for kind, style, name in kinds:
            chosen = [r for r in rows[1:] if (r["side"], r["orthogonal"]) == kind]
            if not chosen:
                continue
            xs = [mib(r["accumulation_buffer_bytes"]) for r in chosen]
            axis.plot(xs, [r["val_ppl"] for r in chosen], style, label=name)
            for r, x in zip(chosen, xs):
                axis.annotate(f"r={r['rank']}", (x, r["val_ppl"]), textcoords="offset points", xytext=(4, 4),
                              fontsize=8)
        axis.axhline(reference["val_ppl"], color="gray", linestyle="--",
                     label=f"plain accumulation ({mib(naive):.2f} MiB)")
        axis.set_xlabel("accumulation buffer (MiB)")
        axis.set_ylabel("validation ppl")
        axis.set_title("FLoRA gradient accumulation vs rank (FLoRA Tab. 1)")
        axis.legend(fontsize=8)
        return fig

    intro = (f"Full fine-tuning (AdamW, lr 1e-3) of the base model on stdlib docstrings/comments, {steps} steps of "
             f"{ACCUMULATION} micro-batches x 2 sequences x 128 tokens; only the accumulation differs. 'side' is the "
             "side of each weight that is projected (smaller: the FLoRA reference code's choice and our default, "
             "buffer max(n, m) x r; larger: buffer min(n, m) x r). llama-small's attention weights are square "
             "(128 x 128), so the side only changes its MLP weights (352 x 128 and 128 x 352).")
    return ablation.write_outputs(out, "flora-rank", "compressed gradient accumulation vs rank (FLoRA Tab. 1)",
                                  intro, ["setting", "rank", "side", "accum. buffer MiB", "val ppl", "Δ vs plain"],
                                  table, "FLoRA Tab. 1", ["setting", "memory", "quality"], PAPER_ROWS, verdict, rows,
                                  {"steps": steps, "accumulation_steps": ACCUMULATION}, plot)
