"""Does any gradient-fidelity measure predict VeLoRA's training quality? (issue #17's target assumes the cosine does)

Trains compare's velora row (paper default, seed 0) for ``--steps`` of its schedule, then, at those weights, takes the
last ``--batches`` training batches and, per wrapped layer, the exact weight gradient G_b of each batch b (fp64). For
each direction rule it projects every G_b as VeLoRA would (Ĝ_b = G_b P_b, P_b block-diagonal from the rule's
directions on batch b) and reports medians over the layers of:

- ``per-batch cos``: median over b of cos(G_b, Ĝ_b) — what ``velora diagnose`` reports;
- ``mean-grad cos``: cos(mean_b G_b, mean_b Ĝ_b) — fidelity of the expected gradient, which descent follows;
- ``signal share``: ‖mean_b Ĝ_b‖² / mean_b ‖Ĝ_b‖² — how much of the kept gradient is signal rather than batch noise
  (the exact gradient's own share is the reference);
- ``added share``: 1 − ⟨mean G, mean Ĝ⟩ / ‖mean Ĝ‖² — the part of the mean kept gradient that is not a piece of the
  mean exact one. A fixed projector P only removes (mean Ĝ = (mean G)·P, so ⟨mean G, mean Ĝ⟩ = ‖mean Ĝ‖²: exactly 0);
  directions read off each batch can also add, because P_b depends on the batch it projects;

beside the validation ppl the bench_fidelity study measured for the matching variant (runs.jsonl, seed 0, 1000 steps).
``noise floor`` is cos between the exact mean gradients of the two halves of the batches: above it, the mean-grad
cosine measures signal, not sampling noise.

    python benchmarks/fidelity_metrics.py                # 300 steps, 64 batches (~4 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).parent))

from fidelity_ceiling import exact_gradients  # noqa: E402

from velora.core.layers import velora_modules  # noqa: E402
from velora.experiments.common import markdown_table  # noqa: E402
from velora.experiments.fidelity_study import VARIANTS, read_records, study_config  # noqa: E402

# rule -> (sub-token size M, rank r, how the directions are read, the bench_fidelity variant that trains with it)
RULES = {
    "paper: first-batch mean, shared (M=4 r=1)": (4, 1, "paper", "paper"),
    "each batch's per-group mean (M=4 r=1)": (4, 1, "mean", "per-group-reest-1"),
    "each batch's per-group SVD (M=4 r=1)": (4, 1, "svd", "per-group-svd-r1-M4-reest-1"),
    "each batch's per-group SVD (M=16 r=4)": (16, 4, "svd", "per-group-svd-r4-M16-reest-1"),
    "each batch's per-group SVD (M=32 r=8)": (32, 8, "svd", "per-group-svd-r8-M32-reest-1"),
    "each batch's per-group SVD (M=4 r=3, 3x bytes)": (4, 3, "svd", "per-group-svd-r3-M4-reest-1"),
    "exact (M=4 r=4, 4x bytes)": (4, 4, "svd", "per-group-svd-r4-M4-reest-1"),
}


def projected(gradient: torch.Tensor, inputs: torch.Tensor, size: int, rank: int, how: str,
              paper_v: torch.Tensor) -> torch.Tensor:
    """Ĝ = G P for one batch: G (O, D) exact, inputs (T, D); P block-diagonal from the rule's (G, M, r) directions."""
    out_features, in_features = gradient.shape
    groups = in_features // size
    x = inputs.reshape(-1, groups, size).double()  # (T, G, M)
    if how == "paper":
        basis = paper_v.double().reshape(1, size, 1).expand(groups, size, 1)  # (G, M, 1), one v for every group
    elif how == "mean":
        basis = torch.nn.functional.normalize(x.mean(0), dim=-1).unsqueeze(-1)  # (G, M, 1)
    else:
        covariance = torch.einsum("tgm,tgn->gmn", x, x)  # (G, M, M)
        basis = torch.linalg.eigh(covariance).eigenvectors[..., -rank:]  # (G, M, r), top-r per group
    chunks = gradient.reshape(out_features, groups, size)  # (O, G, M)
    kept = torch.einsum("ogm,gmr->ogr", chunks, basis)  # (O, G, r)
    return torch.einsum("ogr,gmr->ogm", kept, basis).reshape(out_features, in_features)  # (O, D)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def layer_metrics(items: list[tuple[torch.Tensor, torch.Tensor]], paper_v: torch.Tensor) -> dict[str, dict]:
    """Per rule, the four measures for one layer from its (G_b, X_b) over the batches; plus the exact references."""
    exact_mean = sum(g for g, _ in items) / len(items)  # (O, D)
    exact_energy = sum(float(g.square().sum()) for g, _ in items) / len(items)
    half = len(items) // 2
    result = {"noise floor": _cos(sum(g for g, _ in items[:half]), sum(g for g, _ in items[half:])),
              "exact signal share": float(exact_mean.square().sum()) / exact_energy}
    for rule, (size, rank, how, _variant) in RULES.items():
        hats = [projected(g, x, size, rank, how, paper_v) for g, x in items]
        mean = sum(hats) / len(hats)
        result[rule] = {"per-batch cos": statistics.median(_cos(g, h) for (g, _), h in zip(items, hats)),
                        "mean-grad cos": _cos(exact_mean, mean),
                        "signal share": float(mean.square().sum()) / (sum(float(h.square().sum()) for h in hats)
                                                                      / len(hats)),
                        "added share": 1 - float((exact_mean * mean).sum() / mean.square().sum())}
    return result


def measure(steps: int, batches: int) -> list[dict]:
    """Train the paper default to ``steps`` and return each wrapped layer's ``layer_metrics`` on the last batches."""
    from velora.training.loop import train

    state: dict = {"model": None, "batches": [], "layers": []}

    def ready(model):
        state["model"] = model

        def keep(module, args, kwargs):
            if module.training:  # training batches only, not evaluation ones
                batch = kwargs.get("input_ids", args[0] if args else None)
                state["batches"] = (state["batches"] + [batch.detach().clone()])[-batches:]
        model.register_forward_pre_hook(keep, with_kwargs=True)

    def on_step(row):
        if int(row["step"]) != steps:
            return
        per_layer: dict[str, list] = {}
        for batch in state["batches"]:
            for name, pair in exact_gradients(state["model"], batch).items():
                per_layer.setdefault(name, []).append(pair)
        layers = velora_modules(state["model"])
        state["layers"] = [{"layer": name, **layer_metrics(items, layers[name].velora_v.reshape(-1))}
                           for name, items in per_layer.items()]

    with tempfile.TemporaryDirectory() as run_dir:  # the run's checkpoints are not kept
        train(study_config(VARIANTS["paper"], 0), Path(run_dir) / "run", progress=False, measure=False,
              tensorboard=False, memory_check=False, stop_at_step=steps, on_model_ready=ready, on_step=on_step)
    return state["layers"]


def table(layers: list[dict], records: list[dict]) -> str:
    ppl = {r["variant"]: r["val_ppl"] for r in records if r["seed"] == 0 and r.get("last_step", 1000) == 1000}
    rows = []
    for rule, (_size, _rank, _how, variant) in RULES.items():
        values = [statistics.median(layer[rule][key] for layer in layers)
                  for key in ("per-batch cos", "mean-grad cos", "signal share", "added share")]
        rows.append([rule, *(f"{v:.3f}".replace("-0.000", "0.000") for v in values),
                     f"{ppl[variant]:.2f}" if variant in ppl else "not run", f"`{variant}`"])
    rows.append(["exact gradient (reference)", "1.000", "1.000",
                 f"{statistics.median(layer['exact signal share'] for layer in layers):.3f}", "0.000", "", ""])
    return markdown_table(["direction rule", "per-batch cos", "mean-grad cos", "signal share", "added share",
                           "val ppl (seed 0, 1000 steps)", "bench_fidelity variant"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="weights after this step of compare's schedule")
    parser.add_argument("--batches", type=int, default=64, help="training batches averaged at those weights")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fidelity")
    args = parser.parse_args(argv)
    if args.batches < 2 or args.steps < args.batches:
        parser.error(f"--batches {args.batches} must be >= 2 and <= --steps {args.steps}")
    torch.set_num_threads(1)
    layers = measure(args.steps, args.batches)
    floor = statistics.median(layer["noise floor"] for layer in layers)
    text = (f"Gradient-fidelity measures against training quality (benchmarks/fidelity_metrics.py): the paper "
            f"default's weights after step {args.steps} of compare's schedule (seed 0), the last {args.batches} "
            f"training batches, medians over the {len(layers)} wrapped layers. Noise floor (cos of the two halves' "
            f"exact mean gradients): {floor:.3f}.\n\n{table(layers, read_records(args.out / 'runs.jsonl'))}\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps({"steps": args.steps, "batches": args.batches,
                                                       "layers": layers}, indent=1))
    (args.out / "metrics.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
