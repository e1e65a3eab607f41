"""How much do 8- and 4-bit VeLoRA coefficients lose on LLM-like activation outliers, per scale layout?

With one scale per token (``coefficient_scales="token"``) each token's z is rounded with a step of max|z_t| / 127
(or / 7), so a token whose largest coefficient is k times its typical one rounds the rest with a step of about
k/127 of their size. Large pretrained LLMs have two such patterns: a few feature channels 10-100x the rest on
every token (the "emergent features" of LLM.int8) and a few tokens with a few features 10^2-10^3x the rest
("massive activations"). The default layout, ``"token_and_column"``, first divides each coefficient by its RMS
over the batch's tokens. This bench feeds one ``VeLoRALinear`` (rank = M, the layout the equal-bytes study uses)
inputs with each pattern and, against the exact weight gradient Gᵀx in float64, reports:

- ``cosine``: the whole weight gradient's cosine (what ``velora diagnose`` reports);
- ``typical-column rel. err``: ‖Ĝ_j − G_j‖ / ‖G_j‖ over the columns fed by the typical (non-outlier) features, the
  part of the gradient the cosine hides when outliers dominate its norm (median over those columns);
- the paper default (M = 4, r = 1, fp32, first-batch mean) on the same inputs, for scale.

Synthetic inputs, one layer, seeded: it isolates the rounding; on a real model run ``velora diagnose
--coefficient-bits 8``. ~10 s on 2 cores.

    python benchmarks/bench_coefficient_outliers.py [--features 1024 --tokens 4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from velora import VeLoRAConfig, apply_velora  # noqa: E402

OUTLIER_CHANNELS = 6  # emergent features: a handful of channels, on every token
MASSIVE_SHARE = 0.01  # massive activations: about 1% of tokens, two features each


def activations(kind: str, tokens: int, features: int, generator: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """(T, D) float32 inputs of one pattern and the outlier channels (to leave out of the typical columns)."""
    x = torch.randn(tokens, features, generator=generator)  # (T, D)
    channels = torch.randperm(features, generator=generator)[:OUTLIER_CHANNELS].tolist()
    if kind.startswith("channels"):
        x[:, channels] *= float(kind.split("x")[1])  # (T, 6) columns scaled on every token
    elif kind.startswith("massive"):
        rows = torch.randperm(tokens, generator=generator)[: max(1, int(MASSIVE_SHARE * tokens))]  # (T/100,)
        x[rows[:, None], torch.tensor(channels[:2])] *= float(kind.split("x")[1])  # (T/100, 2) entries scaled
        channels = channels[:2]
    else:
        channels = []
    return x, channels


def weight_gradient(x: torch.Tensor, out_grad: torch.Tensor, config: VeLoRAConfig | None) -> torch.Tensor:
    """dL/dW of one Linear(D, O) for L = <y, out_grad>, through VeLoRA when ``config`` is given (float64 result)."""
    layer = nn.Sequential(nn.Linear(x.shape[1], out_grad.shape[1], bias=False))
    if config is not None:
        apply_velora(layer, config)
    layer(x)  # the first-batch estimate of the directions, as in training
    (layer(x) * out_grad).sum().backward()
    return layer[0].weight.grad.double()  # (O, D)


def measure(kind: str, tokens: int, features: int, out_features: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    x, channels = activations(kind, tokens, features, generator)
    out_grad = torch.randn(tokens, out_features, generator=generator)  # (T, O)
    exact = out_grad.double().T @ x.double()  # (O, D)
    typical = torch.ones(features, dtype=torch.bool)
    typical[channels] = False
    row = {"inputs": kind}
    layouts = {"paper (M=4, r=1, fp32)": VeLoRAConfig(sub_token_size=4, target_modules="re:.*")}
    for bits in (8, 4):
        for scales in ("token", "token_and_column"):
            layouts[f"{bits} bits, {scales} scales"] = VeLoRAConfig(
                sub_token_size=4, rank=4, coefficient_bits=bits, coefficient_scales=scales, target_modules="re:.*")
    for name, config in layouts.items():
        grad = weight_gradient(x, out_grad, config)  # (O, D)
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), exact.flatten(), dim=0).item()
        column_error = (grad - exact).norm(dim=0) / exact.norm(dim=0)  # (D,)
        row[name] = (cosine, column_error[typical].median().item())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=1024, help="input features D (default 1024)")
    parser.add_argument("--out-features", type=int, default=256, help="output features O (default 256)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch (default 4096)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kinds = ["gaussian", "channels x20", "channels x100", "massive x100", "massive x1000"]
    rows = [measure(kind, args.tokens, args.features, args.out_features, args.seed) for kind in kinds]
    names = [key for key in rows[0] if key != "inputs"]
    print(f"D={args.features}, O={args.out_features}, T={args.tokens}, seed {args.seed}; each cell: weight-gradient "
          "cosine / median relative error of the typical features' columns")
    print("| inputs | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in rows:
        print(f"| {row['inputs']} | " + " | ".join(f"{row[n][0]:.4f} / {row[n][1]:.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()
