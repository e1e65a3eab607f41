"""Issue 17's target on the VeLoRA paper's own use case: LoRA fine-tuning of a pre-trained model.

On `velora compare`'s model (pre-training from scratch) freezing the layers VeLoRA compresses beats training them
exactly, so validation ppl there cannot reward a more faithful gradient. The fine-tuning benches (`velora bench
layers | subtoken | init`) are a setting where the frozen control loses: LoRA r=16 on every linear layer of the
stdlib-pretrained llama-small, fine-tuned on stdlib docstrings, VeLoRA on the LoRA-A inputs of v_proj and down_proj
at M = D/32 (M = 4 for v_proj's 128 inputs, 11 for down_proj's 352, padded). This bench runs, per seed (LoRA init
and batch order; the base model is one), with ``--diagnose-every`` on the VeLoRA rows:

- ``lora``: no VeLoRA, the exact LoRA-A gradients (the reference: what a faithful option can match);
- ``paper``: VeLoRA at M = D/32, r = 1, v = first-batch mean (the benches' VeLoRA row);
- ``int8-r4``: the same groups with r = 4 directions per sub-token (first-batch mean + top residual singular
  vectors) and z in 8 bits with per-column and per-token scales: 32 groups x 4 bytes per token, the paper row's
  32 x 1 fp32 scalars (equal bytes up to the scales); v_proj's M = 4 is then kept whole;
- ``frozen-control``: the paper row's LoRA-A weights of v_proj and down_proj frozen (no update).

Each finished run is one line of ``runs.jsonl`` in ``--out`` (a stopped bench resumes there; its diagnose.csv is
kept in ``diagnose/``), and ``results.md`` is the table: saved activations (measured), median gradient cosine over
layers and diagnoses (NaN rows, a LoRA-A whose B is still zero, left out), val ppl per seed and paired by seed
against ``paper`` and ``lora``, and the per-layer medians.

    python benchmarks/bench_fidelity_finetune.py --seeds 0,1,2      # ~20 s a run, the base model once (~30 s)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from velora.experiments import ablation  # noqa: E402
from velora.experiments.control import freeze_compressed_layers  # noqa: E402
from velora.experiments.fidelity_study import (  # noqa: E402
    append_record,
    defined_cosines,
    keep_diagnose_logs,
    layer_medians,
    paired_difference,
    read_records,
)

DEFAULT_OUT = Path(__file__).parent / "results" / "fidelity" / "finetune"
PAPER_VELORA = {"num_groups": 32, "pad": True, "target_modules": "paper"}
VARIANTS = {  # name -> (method, VeLoRA config or None, frozen)
    "lora": ("lora", None, False),
    "paper": ("lora+velora", PAPER_VELORA, False),
    "int8-r4": ("lora+velora", {**PAPER_VELORA, "rank": 4, "coefficient_bits": 8}, False),
    # screened on seed 0: the same bytes with the first batch's top-4 singular vectors, shared or one set per group
    "int8-r4-svd": ("lora+velora", {**PAPER_VELORA, "rank": 4, "coefficient_bits": 8, "init": "svd"}, False),
    "int8-r4-per-group-svd": ("lora+velora", {**PAPER_VELORA, "rank": 4, "coefficient_bits": 8, "init": "svd",
                                              "per_group_directions": True}, False),
    "frozen-control": ("lora+velora", PAPER_VELORA, True),
}
DIAGNOSE_EVERY = 10


def run_one(base: Path, name: str, seed: int, runs: Path, adapter: str = "lora") -> dict:
    """One (variant, seed); ``adapter="qlora"`` fine-tunes the NF4-quantised base instead (qlora / qlora+velora)."""
    from velora.training.loop import train

    method, velora, frozen = VARIANTS[name]
    method = method.replace("lora", adapter, 1)
    config = ablation.finetune_config(base, method, velora, seed=seed)
    folder = ablation.fresh_dir(runs / f"{name}-s{seed}")
    diagnosed = velora is not None and not frozen
    result = train(config, folder, progress=False, tensorboard=False, diagnose_every=DIAGNOSE_EVERY if diagnosed else 0,
                   on_model_ready=freeze_compressed_layers if frozen else None)
    cosines = defined_cosines(folder / "diagnose.csv") if diagnosed else []
    return {"variant": name, "seed": seed, "config": config.to_dict(), "val_ppl": result["val_ppl"],
            "activation_bytes": result["activation_bytes"],
            "median_cosine": statistics.median(cosines) if cosines else None,
            "layers": {layer: medians["cosine"] for layer, medians in layer_medians(folder / "diagnose.csv").items()
                       if "cosine" in medians} if diagnosed else {}}


def layer_table(records: list[dict]) -> str:
    """Median gradient cosine per wrapped layer over the diagnoses, mean over each variant's seeds."""
    per: dict[str, dict[str, list[float]]] = {}
    for r in records:
        for layer, cosine in r.get("layers", {}).items():
            per.setdefault(r["variant"], {}).setdefault(layer, []).append(cosine)
    names = [n for n in VARIANTS if n in per]
    if not names:
        return ""
    layers = list(per[names[0]])
    lines = ["| layer | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for layer in layers:
        cells = [f"{statistics.mean(per[n][layer]):.3f}" if layer in per[n] else "–" for n in names]
        lines.append(f"| `{layer}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(records: list[dict]) -> str:
    by_name: dict[str, dict] = {}
    for r in records:
        row = by_name.setdefault(r["variant"], {"seeds": [], "val_ppl_per_seed": [], "cosines": [], "bytes": []})
        row["seeds"].append(r["seed"])
        row["val_ppl_per_seed"].append(r["val_ppl"])
        row["bytes"].append(r["activation_bytes"])
        if r["median_cosine"] is not None:
            row["cosines"].append(r["median_cosine"])
    paper, lora = by_name.get("paper"), by_name.get("lora")
    lines = ["| variant | seeds | saved act. MiB | bytes vs paper | median grad cosine | cosine vs paper | "
             "val ppl per seed | val ppl − paper, same seed | val ppl − lora (exact), same seed |",
             "|---|---|---:|---:|---:|---:|---|---|---|"]
    for name in VARIANTS:
        row = by_name.get(name)
        if row is None:
            continue
        cosine = statistics.mean(row["cosines"]) if row["cosines"] else None
        paper_cosine = statistics.mean(paper["cosines"]) if paper and paper["cosines"] else None
        lines.append(
            f"| {name} | {','.join(map(str, row['seeds']))} | {row['bytes'][0] / 2**20:.3f} | "
            + (f"{row['bytes'][0] / paper['bytes'][0]:.3f}x" if paper else "–") + " | "
            + (f"{cosine:.3f}" if cosine is not None else "–") + " | "
            + (f"{cosine / paper_cosine:.2f}x" if cosine is not None and paper_cosine else "–") + " | "
            + " / ".join(f"{p:.2f}" for p in row["val_ppl_per_seed"]) + " | "
            + (paired_difference(row, paper) if paper else "–") + " | "
            + (paired_difference(row, lora) if lora else "–") + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"bench folder (default {DEFAULT_OUT})")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds (default 0,1,2)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--base-steps", type=int, default=ablation.BASE_STEPS)
    parser.add_argument("--adapter", default="lora", choices=("lora", "qlora"),
                        help="lora (default) or qlora: the same fine-tune on the NF4-quantised base (bitsandbytes)")
    parser.add_argument("--table-only", action="store_true", help="write results.md from runs.jsonl, train nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "runs.jsonl"
    records = read_records(path)
    other = sorted({r["config"]["method"] for r in records} - {args.adapter, f"{args.adapter}+velora"})
    if other:
        parser.error(f"{path} holds {other} runs, not --adapter {args.adapter}; use another --out")
    if not args.table_only:
        shared = Path(tempfile.gettempdir()) / "velora-fidelity-finetune"
        base = ablation.ensure_base(shared / "shared", args.base_steps, False, print)
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in names:
                if any(r["variant"] == name and r["seed"] == seed for r in records):
                    continue
                record = run_one(base, name, seed, args.out / "runs", args.adapter)
                records.append(record)
                append_record(path, record)
                cosine = record["median_cosine"]
                print(f"{name} seed {seed}: val ppl {record['val_ppl']:.2f}"
                      + (f", median cosine {cosine:.3f}" if cosine is not None else ""), flush=True)
        keep_diagnose_logs(args.out)  # each run's diagnose.csv into diagnose/ (the run folders are not kept in git)
    text = (table(records) + "\n\nMedian gradient cosine per wrapped layer (mean over the seeds):\n\n"
            + layer_table(records))
    title = "QLoRA (NF4 base)" if args.adapter == "qlora" else "LoRA"
    (args.out / "results.md").write_text(f"# Issue 17's target on {title} fine-tuning (`bench_fidelity_finetune.py "
                                         f"--adapter {args.adapter}`)\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
