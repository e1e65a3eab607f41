"""The highest gradient cosine any fixed direction choice can reach (issue #17's doubling target).

VeLoRA's weight gradient is the exact one times a block-diagonal orthogonal projector: Ĝ = G P, P = diag(V Vᵀ, ...)
per sub-token chunk (V (M, r) orthonormal, scale 1). So cos(G, Ĝ) = ‖G P‖ / ‖G‖, and no V — first-batch mean, SVD,
per group, re-estimated — can beat the V built from the exact gradient itself with hindsight: the top-r eigenvectors
of Σ_chunks G_cᵀ G_c (one V per layer) or of each G_cᵀ G_c (one V per group). This script trains compare's velora
row (paper default) for ``--steps`` of its schedule and, at the listed steps, on that step's batch, reports per
wrapped layer: the cosine VeLoRA's v reaches (velora.diagnose) and those hindsight ceilings at equal saved bytes
(M=4 r=1, M=8 r=2, M=16 r=4, M=32 r=8). If twice the measured cosine is above the ceiling, the target cannot be met
at equal bytes by any fixed direction on this model. The ``batch-`` rows are not oracles: directions read off the
batch's own inputs before the backward (per group or shared, top-r singular vectors or the mean), which a layer can
compute during its forward (``per_group_directions=True, init="svd", reestimate_every=1``).

    python benchmarks/fidelity_ceiling.py            # 300 steps of compare's schedule, seed 0 (~1 min on 2 cores)
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

from velora.core.fidelity import _loss, _plain_layers, _untouched, diagnose  # noqa: E402
from velora.core.layers import velora_modules  # noqa: E402
from velora.experiments.fidelity_study import VARIANTS, study_config  # noqa: E402

LAYOUTS = ((4, 1), (8, 2), (16, 4), (32, 8))  # (M, r): D * r / M saved scalars per token, equal bytes


def exact_gradients(model, batch) -> dict[str, torch.Tensor]:
    """Per VeLoRA layer, the exact weight gradient (O, D) on ``batch`` in fp64, the model left untouched."""
    layers = velora_modules(model)
    calls: dict[str, list] = {name: [] for name in layers}
    with _untouched(model), _plain_layers(layers, calls) as capturing, torch.enable_grad():
        loss = _loss(model, batch, None)
        capturing[0] = False
        outputs = [output for name in layers for _x, output in calls[name]]
        grads = iter(torch.autograd.grad(loss, outputs, allow_unused=True))
    exact = {}
    for name, layer in layers.items():
        total = None
        for x, output in calls[name]:
            grad = next(grads)
            out_grad = grad.reshape(-1, output.shape[-1]).double()  # (T, O)
            part = out_grad.t() @ x.reshape(-1, layer._velora_in_features()).double()  # (O, D)
            total = part if total is None else total + part
        exact[name] = (total, torch.cat([x.reshape(-1, layer._velora_in_features()) for x, _ in calls[name]]))
    return exact


def _layouts(gradient: torch.Tensor):
    """(M, r, chunks (O, G, M), ‖G‖²) of one layer's exact gradient G (O, D) for each layout whose M divides D."""
    out_features, in_features = gradient.shape
    for size, rank in LAYOUTS:
        if in_features % size == 0:
            chunks = gradient.reshape(out_features, in_features // size, size)  # (O, G, M)
            yield size, rank, chunks, float(chunks.square().sum())


def input_directions(gradient: torch.Tensor, inputs: torch.Tensor) -> dict[str, float]:
    """Cosines reached by directions read off this batch's inputs X (T, D) before the backward (realisable at
    training time): per group, the top-r eigenvectors of X_cᵀX_c (the batch's own SVD) or the normalised batch mean."""
    in_features = gradient.shape[1]
    result = {}
    for size, rank, chunks, total in _layouts(gradient):
        x = inputs.reshape(-1, in_features // size, size).double()  # (T, G, M)
        covariance = torch.einsum("tgm,tgn->gmn", x, x)  # (G, M, M)
        basis = torch.linalg.eigh(covariance).eigenvectors[..., -rank:]  # (G, M, r) top-r per group
        kept = float(torch.einsum("ogm,gmr->ogr", chunks, basis).square().sum())
        result[f"batch-svd per-group M={size} r={rank}"] = (kept / total) ** 0.5
        shared = torch.linalg.eigh(covariance.sum(0)).eigenvectors[:, -rank:]  # (M, r)
        kept = float(torch.einsum("ogm,mr->ogr", chunks, shared).square().sum())
        result[f"batch-svd shared M={size} r={rank}"] = (kept / total) ** 0.5
        if rank == 1:
            mean = torch.nn.functional.normalize(x.mean(0), dim=-1)  # (G, M)
            kept = float(torch.einsum("ogm,gm->og", chunks, mean).square().sum())
            result[f"batch-mean per-group M={size} r=1"] = (kept / total) ** 0.5
    return result


def ceilings(gradient: torch.Tensor) -> dict[str, float]:
    """Hindsight cosine ceilings of one layer's exact gradient G (O, D) for each (M, r) layout."""
    result = {}
    for size, rank, chunks, total in _layouts(gradient):
        per_group = torch.einsum("ogm,ogn->gmn", chunks, chunks)  # (G, M, M): Σ_o G_c^T G_c per chunk
        shared_eig = torch.linalg.eigvalsh(per_group.sum(0))  # (M,) ascending
        group_eig = torch.linalg.eigvalsh(per_group)  # (G, M) ascending
        result[f"shared M={size} r={rank}"] = (float(shared_eig[-rank:].sum()) / total) ** 0.5
        result[f"per-group M={size} r={rank}"] = (float(group_eig[:, -rank:].sum()) / total) ** 0.5
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="stop after this step of compare's schedule")
    parser.add_argument("--at", default="1,50,100,200,300", help="steps whose batch is measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fidelity")
    args = parser.parse_args(argv)
    from velora.training.loop import train

    measured_at = {int(s) for s in args.at.split(",")}
    state: dict = {"model": None, "batch": None, "rows": []}

    def ready(model):
        state["model"] = model
        model.register_forward_pre_hook(lambda module, inputs, kwargs: state.update(
            batch=kwargs.get("input_ids", inputs[0] if inputs else None)), with_kwargs=True)

    def on_step(row):
        step = int(row["step"])
        if step not in measured_at:
            return
        model, batch = state["model"], state["batch"].detach().clone()
        report = {r.name: r.cosine for r in diagnose(model, batch).layers}
        for name, (gradient, inputs) in exact_gradients(model, batch).items():
            state["rows"].append({"step": step, "layer": name, "velora": report[name], **ceilings(gradient),
                                  **input_directions(gradient, inputs)})
        print(f"step {step}: measured", flush=True)

    config = study_config(VARIANTS["paper"], args.seed)
    with tempfile.TemporaryDirectory() as run_dir:  # the run's checkpoints are not kept
        train(config, Path(run_dir) / "run", progress=False, measure=False, tensorboard=False, memory_check=False,
              stop_at_step=args.steps, on_model_ready=ready, on_step=on_step)
    rows = state["rows"]
    columns = [c for c in rows[0] if c not in ("step", "layer")]
    medians = {c: statistics.median(r[c] for r in rows) for c in columns}
    lines = ["| layout | median cosine over layers and steps | x the paper default's |", "|---|---:|---:|"]
    lines += [f"| {c} | {v:.3f} | {v / medians['velora']:.2f}x |" for c, v in medians.items()]
    text = (f"Hindsight ceilings (benchmarks/fidelity_ceiling.py, compare's velora row, seed {args.seed}, steps "
            f"{sorted(measured_at)} of {args.steps}; {len(rows)} layer-steps). 'velora' = the paper default's measured "
            "cosine; 'shared' / 'per-group' = the best any direction could do on the same batch at equal saved bytes, "
            "with hindsight (read off the exact gradient); 'batch-' = directions read off that batch's inputs before "
            "the backward, realisable during the forward.\n\n"
            + "\n".join(lines) + "\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ceiling.json").write_text(json.dumps({"rows": rows, "medians": medians}, indent=1))
    (args.out / "ceiling.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
