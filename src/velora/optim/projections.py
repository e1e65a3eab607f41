"""Projection matrices shared by the optimizers and the accumulator.

Two kinds:
- seeded random projections (FLoRA): ``A`` of shape (r, n) regenerated from an integer seed, so only
  the seed has to be stored (and every DDP rank can rebuild the same matrix without communication);
- SVD projectors (GaLore / GradNormLoRP): the top-``r`` singular vectors of a gradient, refreshed
  every few hundred steps and stored as a tensor in the optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from velora.core.runtime import state_dtype

__all__ = [
    "random_projection",
    "derive_seed",
    "PROJECT_SIDES",
    "check_project_side",
    "saved_project_side",
    "CompressionPlan",
    "compression_plan",
    "orient",
    "compress",
    "decompress",
    "svd_projector",
    "projectable_parameters",
    "projectable_split",
    "trainable_except",
    "split_param_groups",
]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # a tiny, well-mixed integer hash; pure Python so it is identical on every machine and rank
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (base seed, parameter index, cycle, ...); fits an int64 tensor."""
    x = 0
    for part in parts:
        x = _splitmix64(x ^ (int(part) & _MASK64))
    return x & ((1 << 63) - 1)


def random_projection(
    seed: int,
    n: int,
    r: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    orthogonal: bool = False,
) -> torch.Tensor:
    """The FLoRA projection ``A`` of shape (r, n), entries N(0, 1/r), regenerated from ``seed``.

    Compress a row vector x (..., n) with ``x @ A.T`` (..., r); decompress with ``c @ A`` (..., n).
    ``E[A.T @ A] = I``, so decompress(compress(x)) is unbiased. With ``orthogonal=True`` the rows are
    orthonormalised (QR) and scaled by sqrt(n / r), keeping ``E[A.T @ A] = I``; at r == n, A is an
    orthogonal matrix and the round trip is exact. The matrix is drawn in float32 on the CPU (bit-identical
    on every CPU and DDP rank) or, for a CUDA ``device``, on that GPU with a seeded CUDA generator (no host
    work or copy on the hot path; identical on every rank of one GPU model, different numbers than the CPU's),
    then cast to ``dtype``.
    """
    if r <= 0 or n <= 0:
        raise ValueError(f"random_projection needs n > 0 and r > 0, got n={n}, r={r}")
    if orthogonal and r > n:
        raise ValueError(f"orthogonal projection needs r <= n, got r={r} > n={n}; lower r or set orthogonal=False")
    draw_on = torch.device(device) if device is not None and torch.device(device).type == "cuda" else "cpu"
    generator = torch.Generator(device=draw_on).manual_seed(int(seed))
    gaussian = torch.randn(r, n, generator=generator, dtype=torch.float32, device=draw_on)  # (r, n)
    if orthogonal:
        q, upper = torch.linalg.qr(gaussian.T)  # (n, r), (r, r)
        # fix the sign of each column so the result is a function of the seed only
        signs = torch.sign(torch.diagonal(upper))  # (r,)
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        projection = (q * signs).T * math.sqrt(n / r)  # (r, n)
    else:
        projection = gaussian / math.sqrt(r)  # (r, n)
    return projection.to(device=device, dtype=dtype)


PROJECT_SIDES = ("smaller", "larger")


def check_project_side(project: str) -> None:
    """One-line ValueError for a projection side other than "smaller" / "larger"."""
    if project not in PROJECT_SIDES:
        raise ValueError(f"project={project!r} is not a projection side; use 'smaller' (project the smaller side "
                         "of each matrix, as the FLoRA reference code: less noise) or 'larger' (less memory)")


def saved_project_side(saved: str | None, current: str, owner: str) -> str:
    """The side a saved state was built with (None: saved before the option existed, i.e. "larger"); a one-line
    ValueError if it is not ``current``, since the kept buffers then have the other side's shape."""
    saved = saved or "larger"
    if saved != current:
        raise ValueError(f"{owner} state was built with project={saved!r} but this one has project={current!r}; "
                         f"build it with project={saved!r} or start from a fresh state")
    return saved


@dataclass(frozen=True)
class CompressionPlan:
    """How a 2-D tensor (rows, cols) is compressed: one side is projected to ``rank``, the other kept.

    We always work on the orientation (kept_dim, projected_dim): the tensor itself, or its transpose
    when ``transposed`` is True. The kept state is (kept_dim, rank). ``project="smaller"`` (default)
    projects min(rows, cols), keeping (max, rank): the decompression noise grows like
    sqrt(projected_dim / rank), so this is the accurate choice at a given rank, and the one of the
    FLoRA reference code (the paper's Alg. 1 writes the column side). ``project="larger"`` projects
    max(rows, cols), keeping (min, rank): less memory, more noise (at equal memory both sides have the
    same error). Square matrices are identical under both.
    """

    kept_dim: int
    projected_dim: int
    rank: int
    transposed: bool
    project: str = "smaller"


def compression_plan(shape: torch.Size | tuple[int, ...], rank: int, force: bool = False,
                     project: str = "smaller") -> CompressionPlan | None:
    """The rule for which tensors get a projected state (``None`` = keep full state).

    A tensor is compressed iff it is 2-D and its kept state (kept_dim, rank) is smaller than the full
    tensor, i.e. ``rank < projected_dim`` (``min(rows, cols)`` for ``project="smaller"``, ``max`` for
    ``"larger"``). ``force=True`` compresses every 2-D tensor with the effective rank
    min(rank, projected_dim) (used to test the projection path).
    """
    check_project_side(project)
    if len(shape) != 2:
        return None
    rows, cols = int(shape[0]), int(shape[1])
    if project == "smaller":
        kept_dim, projected_dim = max(rows, cols), min(rows, cols)
        transposed = rows < cols  # work on (cols, rows): the rows are the smaller side
    else:
        kept_dim, projected_dim = min(rows, cols), max(rows, cols)
        transposed = rows > cols  # work on (cols, rows): the rows are the larger side
    if rank >= projected_dim and not force:
        return None
    return CompressionPlan(kept_dim, projected_dim, min(rank, projected_dim), transposed, project)


def orient(matrix: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(rows, cols) -> the plan's working orientation (kept_dim, projected_dim), and back (a transpose is its own
    inverse)."""
    return matrix.T if transposed else matrix


def compress(matrix: torch.Tensor, projection: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(rows, cols) -> (kept_dim, r): the projected side times Aᵀ, A (r, projected_dim)."""
    return orient(matrix, transposed) @ projection.T  # (kept_dim, projected_dim) @ (projected_dim, r)


def decompress(compressed: torch.Tensor, projection: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(kept_dim, r) -> (rows, cols): C·A, turned back to the matrix's orientation."""
    return orient(compressed @ projection, transposed)  # (kept_dim, r) @ (r, projected_dim)


def _svd_attempts(matrix: torch.Tensor):
    # 1) fp32 gesdd, 2) fp64, 3) fp64 with a tiny deterministic jitter (breaks exact degeneracies
    # that make the divide-and-conquer driver fail to converge); a float64 gradient starts at 2)
    if matrix.dtype != torch.float64:
        yield "float32", matrix.float()
    yield "float64", matrix.double()
    generator = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(matrix.shape, generator=generator, dtype=torch.float64).to(matrix.device)
    scale = matrix.double().abs().max().clamp_min(1e-30) * 1e-7
    yield "float64+jitter", matrix.double() + noise * scale


def svd_projector(matrix: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Top-``rank`` singular vectors of ``matrix`` (n, m): (n, rank) for side="left", (m, rank) for "right".

    A failed or non-finite SVD is retried in float64 and then with a tiny jitter; if every attempt
    fails a RuntimeError is raised (never a silent NaN). A non-finite input raises ValueError.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r} is not 'left' or 'right'")
    if not torch.isfinite(matrix).all():
        raise ValueError("cannot compute an SVD projector of a gradient holding NaN/inf; "
                         "check the loss scale and learning rate")
    errors = []
    for name, attempt in _svd_attempts(matrix):
        try:
            u, _, vh = torch.linalg.svd(attempt, full_matrices=False)  # (n, k), (k,), (k, m)
        except (RuntimeError, torch.linalg.LinAlgError) as err:  # LinAlgError subclasses RuntimeError
            errors.append(f"{name}: {str(err).splitlines()[0]}")
            continue
        basis = u[:, :rank] if side == "left" else vh[:rank].T  # (n, rank) or (m, rank)
        if torch.isfinite(basis).all():  # float32, or float64 for a float64 gradient (never below its precision)
            return basis.to(state_dtype(matrix.dtype)).contiguous()
        errors.append(f"{name}: non-finite singular vectors")
    raise RuntimeError(f"SVD of a {tuple(matrix.shape)} gradient failed in every attempt ({'; '.join(errors)})")


def projectable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The matrices FLoRA/GaLore-style compression is meant for: trainable weights of ``nn.Linear``
    (and HF ``Conv1D``) layers, minus the output head (``get_output_embeddings()``) and any weight
    shared with an ``nn.Embedding``. Embeddings and heads project across the vocabulary, which
    smears a sparse gradient over every token row (the FLoRA paper keeps them uncompressed too)."""
    excluded = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            excluded.add(id(module.weight))
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None and getattr(head, "weight", None) is not None:
        excluded.add(id(head.weight))
    chosen, seen = [], set()
    for module in model.modules():
        # HF Conv1D by name (no transformers import), including subclasses such as VeLoRA's wrapped Conv1D
        if isinstance(module, torch.nn.Linear) or any(cls.__name__ == "Conv1D" for cls in type(module).__mro__):
            weight = module.weight
            if weight.requires_grad and weight.dim() == 2 and id(weight) not in excluded | seen:
                chosen.append(weight)
                seen.add(id(weight))
    return chosen


def trainable_except(model: torch.nn.Module, chosen: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Every trainable parameter of ``model`` that is not in ``chosen``, in model order."""
    chosen_ids = {id(p) for p in chosen}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in chosen_ids]


def projectable_split(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(``projectable_parameters(model)``, every other trainable parameter): the GaLore/FLoRA split."""
    chosen = projectable_parameters(model)
    return chosen, trainable_except(model, chosen)


def split_param_groups(model: torch.nn.Module, projected: dict, rest: dict | None = None) -> list[dict]:
    """Two param groups: ``projectable_parameters(model)`` with the options ``projected`` and every
    other trainable parameter with the options ``rest`` (empty groups are dropped)."""
    chosen, others = projectable_split(model)
    groups = [dict(params=chosen, **projected), dict(params=others, **(rest or {}))]
    return [group for group in groups if group["params"]]
