"""FLoRA's compressed gradient accumulation against plain accumulation, in two settings beyond
`velora bench flora-rank` (which runs FLoRA's protocol at the plain-tuned lr, with three seeds).

Part ``protocol`` runs the bench's protocol (FLoRA paper §3.1-3.2 on our base model: llama-small,
d = 128, pre-trained on stdlib code, fine-tuned on stdlib docstrings; 16 accumulation steps of physical
batch 1 x 128 tokens, constant learning rate, no warm-up, no weight decay, no gradient clipping, one
epoch, each run scored on the whole validation split by its checkpoint of lowest validation loss) at
seed 0 with every FLoRA rank at every learning rate of a wider grid, to show how the gap depends on the
learning rate. Base optimizers: Adafactor (the paper's) and AdamW (ours).

Part ``scale`` repeats the flora-rank bench's earlier protocol (100 steps x 4 micro-batches x 2 x 128 tokens,
AdamW, lr 1e-3 with warm-up and cosine decay, clipping at 1.0) on a 4x wider model, llama-20m
(d = 256, MLP 704), pre-trained the same way, at r = 64 (1/4 of 256) and r = 128.

    python benchmarks/flora_accumulation_study.py --part protocol   # ~25 min at 1 thread
    python benchmarks/flora_accumulation_study.py --part scale      # ~8 min (pre-trains llama-20m once)

Writes ``results.md`` and ``results.json`` into ``--out`` (default velora-runs/bench/flora-study-<part>).
The base models are shared with `velora bench` (``velora-runs/bench/shared``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from velora.experiments import ablation
from velora.experiments.ablation import Variant, mib, stderr_say
from velora.experiments.common import markdown_table, write_json
from velora.experiments.flora_rank import best_checkpoint, flora_options, protocol_config

PROTOCOL_GRIDS = {"adafactor": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1), "adamw": (3e-4, 1e-3, 3e-3, 1e-2)}
PROTOCOL_RANKS = (32, 64)


def protocol(out: Path, base_steps: int, steps: int, progress: bool, optimizers: list[str]
             ) -> tuple[list[str], list[list], list[dict]]:
    base = ablation.ensure_base(out.parent / "shared", base_steps, progress, stderr_say)
    table, rows = [], []
    for optimizer in optimizers:
        grid = PROTOCOL_GRIDS[optimizer]
        plain = [Variant(f"{optimizer} plain lr={lr:g}", protocol_config(base, steps, optimizer, lr),
                         {"optimizer": optimizer, "kind": "plain"}) for lr in grid]
        flora = [Variant(f"{optimizer} FLoRA r={rank} lr={lr:g}",
                         protocol_config(base, steps, optimizer, lr, setting=(rank, "smaller", False)),
                         {"optimizer": optimizer, "kind": f"flora r={rank}", "rank": rank})
                 for rank in PROTOCOL_RANKS for lr in grid]
        plain, flora = (best_checkpoint(ablation.run_variants(v, out / optimizer, progress, stderr_say))
                        for v in (plain, flora))
        best = min(plain, key=lambda r: r["val_ppl"])
        rows += plain + flora
        for r in plain + flora:
            same_lr = next(p for p in plain if p["lr"] == r["lr"])
            table.append([optimizer, r["kind"], f"{r['lr']:g}", round(r["val_ppl"], 2),
                          "–" if r["kind"] == "plain" else f"{100 * (r['val_ppl'] / same_lr['val_ppl'] - 1):+.2f}%",
                          f"{100 * (r['val_ppl'] / best['val_ppl'] - 1):+.2f}%"])
    headers = ["optimizer", "accumulation", "lr", "val ppl", "Δ vs plain at this lr", "Δ vs best plain"]
    return headers, table, rows


def scale(out: Path, base_steps: int, steps: int, progress: bool) -> tuple[list[str], list[list], list[dict]]:
    model = "llama-20m"
    base = ablation.ensure_base(out.parent / "shared", base_steps, progress, stderr_say, model=model)
    common = dict(model=model, steps=steps, batch_size=2, accumulation_steps=4, lr=1e-3, warmup_steps=10)
    variants = [Variant("plain accumulation", ablation.finetune_config(base, "full", **common), {"rank": None})]
    variants += [Variant(f"FLoRA r={rank}", ablation.finetune_config(
        base, "full", options=flora_options((rank, "smaller", False)), **common), {"rank": rank}) for rank in (64, 128)]
    rows = ablation.run_variants(variants, out, progress, stderr_say)
    plain = rows[0]
    naive = rows[1]["naive_accumulation_bytes"]  # what plain accumulation holds for the compressed weights
    table = [[r["label"], "–" if r is plain else r["rank"],
              round(mib(naive if r is plain else r["accumulation_buffer_bytes"]), 2), round(r["val_ppl"], 2),
              "–" if r is plain else f"{100 * (r['val_ppl'] / plain['val_ppl'] - 1):+.2f}%"] for r in rows]
    return ["setting", "rank", "accum. buffer MiB", "val ppl", "Δ vs plain"], table, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("protocol", "scale"), required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run (protocol: 68, one epoch; scale: 100)")
    parser.add_argument("--base-steps", type=int, default=ablation.BASE_STEPS)
    parser.add_argument("--optimizer", choices=sorted(PROTOCOL_GRIDS), action="append",
                        help="protocol part: base optimizer(s) to run (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"velora-runs/bench/flora-study-{args.part}")
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "protocol":
        headers, table, rows = protocol(out, args.base_steps, args.steps or 68, not args.no_progress,
                                        args.optimizer or list(PROTOCOL_GRIDS))
    else:
        headers, table, rows = scale(out, args.base_steps, args.steps or 100, not args.no_progress)
    markdown = markdown_table(headers, table)
    (out / "results.md").write_text(f"# FLoRA accumulation study: {args.part}\n\n{markdown}\n")
    write_json(out / "results.json", {"part": args.part, "rows": rows, "table": {"headers": headers, "rows": table}})
    print(markdown)
    print(json.dumps({"wrote": str(out / "results.md")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
