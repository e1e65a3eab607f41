"""Shared fixtures for the velora.optim tests: a toy LM, deterministic batches, optimizer factories."""

from __future__ import annotations

import inspect
import json.decoder

import torch
import torch.nn.functional as F
from torch import nn

import velora
from velora.optim import Flora, GaLoreAdamW, gradnorm_lorp_optimizer

VOCAB = 32


class ToyLM(nn.Module):
    """Embedding -> residual MLP -> LayerNorm -> head: 2-D, 1-D, wide and tall parameters."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.up = nn.Linear(16, 40)
        self.down = nn.Linear(40, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)  # (B, T, 16)
        hidden = hidden + self.down(torch.tanh(self.up(hidden)))  # (B, T, 16)
        return self.head(self.norm(hidden))  # (B, T, V)


def toy_model(seed: int = 0) -> ToyLM:
    torch.manual_seed(seed)
    return ToyLM()


def toy_batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (4, 12), generator=generator)  # (B, T)


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))


def matrices_and_rest(model: nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if p.dim() == 2], [p for p in params if p.dim() != 2]


def _galore(model, eight_bit=False, reproject=False, lr=1e-2, gap=3, rank=4):
    matrices, rest = matrices_and_rest(model)
    return GaLoreAdamW([dict(params=matrices, rank=rank, update_proj_gap=gap, scale=0.25,
                             reproject_moments=reproject), dict(params=rest)], lr=lr, eight_bit=eight_bit)


def _gradnorm(model, lr=1e-2, gap=3, targets=("up", "down"), rank=4, proj_rank=2):
    velora.apply_gradnorm_lorp(model, velora.GradNormLoRPConfig(rank=rank, alpha=2 * rank, target_modules=targets))
    return gradnorm_lorp_optimizer(model, lr=lr, proj_rank=proj_rank, update_proj_gap=gap)


# Flora's momentum rows: the paper's Gaussian, orthonormal, orthonormal with the residual passed through
FLORA_ROWS = {"gaussian": dict(orthogonal=False), "orthonormal": dict(orthogonal=True),
              "residual": dict(orthogonal=True, residual=True)}


def _flora_options(momentum: str, exact_current: bool, rows: str):
    options = dict(momentum=momentum, exact_current=exact_current, **FLORA_ROWS[rows])
    return lambda m: Flora(m.parameters(), lr=1e-2, rank=4, kappa=3, **options)


# name -> (prepare model in place and return its optimizer); kappa / gap of 3 so that short runs
# cross a resampling boundary and a projector refresh
FACTORIES = {
    "flora-adafactor": lambda m: Flora(m.parameters(), lr=1e-2, rank=4, kappa=3),
    "flora-adamw": lambda m: Flora(m.parameters(), lr=1e-2, rank=4, kappa=3, base="adamw"),
    "flora-8bit": lambda m: Flora(m.parameters(), lr=1e-2, rank=4, kappa=3, eight_bit=True),
    "flora-alg2": lambda m: Flora.paper_alg2(m.parameters(), lr=1e-2, rank=4, kappa=3),
    "flora-adamw-alg2": lambda m: Flora.paper_alg2(m.parameters(), lr=1e-2, rank=4, kappa=3, base="adamw"),
    "flora-authors": lambda m: Flora.authors_code(m.parameters(), lr=1e-2, rank=4, kappa=3),
    # every combination of the momentum options of issue #16 (docs/optim.md, "FLoRA momentum options")
    **{f"flora-{momentum}-{'exact' if exact else 'compressed'}-{rows}": _flora_options(momentum, exact, rows)
       for momentum in ("gradient", "update") for exact in (False, True) for rows in FLORA_ROWS},
    "flora-adamw-residual": lambda m: Flora(m.parameters(), lr=1e-2, rank=4, kappa=3, base="adamw", residual=True),
    "flora-8bit-residual": lambda m: Flora(m.parameters(), lr=1e-2, rank=4, kappa=3, eight_bit=True, residual=True),
    "galore": lambda m: _galore(m),
    "galore-reproject": lambda m: _galore(m, reproject=True),
    "galore-8bit": lambda m: _galore(m, eight_bit=True),
    "gradnorm-lorp": lambda m: _gradnorm(m),
}


def real_text_tokens() -> torch.Tensor:
    """Bytes of a standard-library source file, as token ids (vocab 256)."""
    data = inspect.getsource(json.decoder).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.long)  # (N,)
