"""Sub-token grouping, compression, reconstruction and the initial projection directions.

Shapes: T tokens (all leading dims flattened), D features, M = sub-token size, G = ceil(D/M) groups,
r = rank (number of orthonormal directions, 1 in the paper). V is (M, r) with orthonormal columns, shared by
every group (the paper), or (G, M, r): one set of directions per sub-token group (``per_group_directions``).
Pure tensor functions: no module state, no global RNG.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from velora.core.runtime import state_dtype
from velora.core.runtime import work_dtype as compute_dtype  # fp32 for half inputs, the input dtype otherwise


def num_groups(in_features: int, sub_token_size: int) -> int:
    return math.ceil(in_features / sub_token_size)


def group(x: torch.Tensor, sub_token_size: int) -> torch.Tensor:
    """(..., D) -> (T, G, M); zero-pads the last group when M does not divide D."""
    features = x.shape[-1]
    tokens = x.reshape(-1, features)  # (T, D)
    groups = num_groups(features, sub_token_size)
    if groups * sub_token_size != features:
        tokens = torch.nn.functional.pad(tokens, (0, groups * sub_token_size - features))  # (T, G*M)
    return tokens.view(tokens.shape[0], groups, sub_token_size)  # (T, G, M); G explicit, so T=0 works


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a no-op .to() still costs a dispatcher round trip; this op runs for every wrapped layer every step
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def z_storage_shift(dtype: torch.dtype, sub_token_size: int) -> int:
    """k such that z is stored as z·2⁻ᵏ: fp16 only, where |z| ≤ √M·max|x| can pass 65504 while x does not.

    2ᵏ > √M, so a stored coefficient is at most max|x|: what fits x fits z. A power of two keeps every
    significand bit (only values below fp16's normal range lose precision); bf16 and wider need no shift.
    """
    return sub_token_size.bit_length() // 2 + 1 if dtype == torch.float16 else 0


def compress(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """z = group(x) · V, kept in x's dtype, computed in fp32 for half inputs. (..., D) -> (T, G, r).

    ``directions`` (M, r) is shared by every group; (G, M, r) projects group g on its own V_g.
    For fp16 x the stored z is scaled by 2⁻ᵏ (``z_storage_shift``) so it cannot overflow; ``reconstruct`` and
    ``factored_weight_grad`` undo it.
    """
    sub_token_size, rank = directions.shape[-2:]
    work = compute_dtype(x.dtype)
    groups = group(x, sub_token_size)  # (T, G, M), a view when M divides D
    tokens, count = groups.shape[0], groups.shape[1]
    if directions.dim() == 3:  # per group: one batched (G, T, M) @ (G, M, r) matmul
        z = torch.bmm(_as(groups, work).transpose(0, 1), _as(directions, work))  # (G, T, r)
        z = z.transpose(0, 1).reshape(tokens * count, rank)  # (T·G, r)
    else:  # one (T·G, M) @ (M, r) matmul over all sub-tokens
        z = torch.mm(_as(groups.reshape(tokens * count, sub_token_size), work), _as(directions, work))  # (T·G, r)
    shift = z_storage_shift(x.dtype, sub_token_size)
    if shift:
        z = z.mul_(2.0 ** -shift)  # (T·G, r), exact: a power of two
    return _as(z, x.dtype).view(tokens, count, rank)  # (T, G, r)


def expand_z(z: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """z Vᵀ per group: (T, G, r) with V (M, r) or (G, M, r) -> (T, G, M), in the dtypes given."""
    if directions.dim() == 3:
        return torch.einsum("tgr,gmr->tgm", z, directions)  # (T, G, M)
    return torch.matmul(z, directions.t())  # (T, G, M)


def reconstruct(z: torch.Tensor, directions: torch.Tensor, in_features: int, scale: float = 1.0) -> torch.Tensor:
    """x̂ = scale · z Vᵀ, ungrouped: (T, G, r) -> (T, D), for z as ``compress`` stores it (fp16 z is shifted).
    Only tests and diagnostics materialise this."""
    scale = scale * 2.0 ** z_storage_shift(z.dtype, directions.shape[-2])  # undo compress's fp16 shift
    x_hat = expand_z(z.to(directions.dtype), directions)  # (T, G, M)
    x_hat = x_hat.reshape(z.shape[0], -1)[:, :in_features]  # (T, D)
    return (x_hat * scale).to(z.dtype)


def factored_weight_grad(
    grad_out: torch.Tensor, z: torch.Tensor, directions: torch.Tensor, in_features: int, scale: float = 1.0
) -> torch.Tensor:
    """grad_W = Gᵀ x̂ without forming x̂: grad_W.view(O, G, M) = (Gᵀ z).view(O, G, r) Vᵀ (V_gᵀ per group g).

    grad_out: (T, O); z: (T, G, r); directions: (M, r) or (G, M, r); returns (O, D) in grad_out's dtype.
    """
    tokens, out_features = grad_out.shape
    _, groups, rank = z.shape
    sub_token_size = directions.shape[-2]
    gz = grad_out.t().mm(_as(z, grad_out.dtype).reshape(tokens, groups * rank))  # (O, G*r), M× smaller than Gᵀ x̂
    if scale != 1.0:
        gz = gz * scale  # on (O, G*r), not on the M× larger (O, D) result
    v = _as(directions, grad_out.dtype)
    shift = z_storage_shift(z.dtype, sub_token_size)
    if shift:
        v = v * 2.0 ** shift  # (M, r) / (G, M, r): undo compress's fp16 shift on the small factor, exactly
    if v.dim() == 3:
        grad_w = expand_z(gz.view(out_features, groups, rank), v)  # (O, G, r) x (G, M, r) -> (O, G, M)
    elif rank == 1:
        grad_w = gz.unsqueeze(-1) * v.view(sub_token_size)  # (O, G, 1) * (M,) -> (O, G, M)
    else:
        grad_w = torch.matmul(gz.view(out_features, groups, rank), v.t())  # (O, G, r) @ (r, M) -> (O, G, M)
    grad_w = grad_w.reshape(out_features, groups * sub_token_size)  # (O, G*M), a view but per group (einsum)
    if grad_w.shape[1] != in_features:
        grad_w = grad_w[:, :in_features]  # drop the zero-padded tail
    return grad_w


# ---- initial directions -------------------------------------------------------------------------


def orthonormalise(directions: torch.Tensor) -> torch.Tensor:
    """(M,) or (M, r) -> (M, r) with orthonormal columns (sign of each column kept)."""
    if directions.dim() == 1:
        directions = directions.unsqueeze(1)
    work = directions.to(compute_dtype(directions.dtype))
    if work.shape[1] == 1:
        norm = work.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError("initial direction has zero or non-finite norm; pass a finite non-zero vector")
        return work / norm
    q, r = torch.linalg.qr(work)  # (M, r), (r, r)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    if (torch.diagonal(r).abs() < 1e-12 * max(1.0, float(r.abs().max()))).any():
        raise ValueError(f"initial directions of shape {tuple(directions.shape)} are linearly dependent; "
                         "pass r independent vectors")
    return q * signs


def subsample_rows(rows: torch.Tensor, max_rows: int) -> torch.Tensor:
    """A deterministic, evenly strided subset of at most ``max_rows`` rows (no RNG is consumed)."""
    if rows.shape[0] <= max_rows:
        return rows
    index = torch.linspace(0, rows.shape[0] - 1, max_rows, device=rows.device).round().long()
    return rows.index_select(0, index)


def top_right_singular(rows: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` right singular vectors of (N, M) rows, as (M, rank), deterministic signs.

    Directions the rows do not span (N < rank, or rank-deficient rows) are not left to LAPACK's arbitrary
    null-space vectors: they come from ``complete_basis``, so v always has ``rank`` orthonormal columns.
    """
    return complete_basis(_spanned_directions(rows, rank), rank)


def _spanned_directions(rows: torch.Tensor, rank: int) -> torch.Tensor:
    """The top right singular vectors of (N, M) rows with a non-zero singular value, at most ``rank``: (M, ≤rank)."""
    work = rows.to(state_dtype(rows.dtype))
    try:
        _, singular, vh = torch.linalg.svd(work, full_matrices=False)  # (k,), (k, M)
    except RuntimeError:  # ill-conditioned input: the Gram matrix is small (M×M) and eigh is robust
        values, vecs = torch.linalg.eigh(work.t() @ work)  # (M,), (M, M)
        singular, vh = values.flip(-1).clamp_min(0).sqrt(), vecs.flip(-1).t()
    spanned = 0
    if singular.numel():
        spanned = int((singular > singular.max() * torch.finfo(work.dtype).eps * max(work.shape)).sum())
    return canonical_signs(vh[: min(rank, spanned)].t())  # (M, ≤ rank)


def canonical_signs(v: torch.Tensor) -> torch.Tensor:
    """(..., M, r) directions with each column's largest-magnitude entry made positive, so an SVD's or eigh's
    arbitrary signs give one reproducible result (a zero column is left as it is)."""
    pivot = v.abs().argmax(dim=-2, keepdim=True)  # (..., 1, r)
    signs = torch.sign(v.gather(-2, pivot))  # (..., 1, r)
    return v * torch.where(signs == 0, torch.ones_like(signs), signs)  # (..., M, r)


def complete_basis(columns: torch.Tensor, rank: int) -> torch.Tensor:
    """(M, k) orthonormal columns -> (M, rank): each added column is the standard basis vector with the
    largest part outside the current span, orthogonalised (twice, for rounding) and normalised."""
    basis = columns
    while basis.shape[1] < rank:
        outside = torch.eye(basis.shape[0], dtype=basis.dtype, device=basis.device)  # (M, M), one e_j per column
        outside = outside - basis @ (basis.t() @ outside)  # (M, M), e_j minus its projection on the span
        best = outside[:, int(outside.norm(dim=0).argmax())]  # (M,)
        best = best - basis @ (basis.t() @ best)  # (M,)
        basis = torch.cat([basis, (best / best.norm()).unsqueeze(1)], dim=1)  # (M, k+1)
    return basis


def sub_token_rows(x: torch.Tensor, sub_token_size: int) -> torch.Tensor:
    """All sub-tokens of x as rows: (..., D) -> (T*G, M)."""
    return group(x, sub_token_size).reshape(-1, sub_token_size)


def mean_sub_token(x: torch.Tensor, sub_token_size: int) -> torch.Tensor:
    """Mean sub-token in fp32 (fp64 for fp64 input) without an fp32 copy of x. -> (M,)"""
    rows = sub_token_rows(x, sub_token_size)  # (T*G, M), a view when M divides D
    return rows.sum(0, dtype=compute_dtype(x.dtype)) / rows.shape[0]


def initial_directions(
    x: torch.Tensor,
    sub_token_size: int,
    rank: int,
    strategy: str,
    *,
    seed: int = 0,
    max_samples: int = 4096,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Directions V (M, rank) from the first training batch x (..., D), or from a seed.

    - ``batch_average_once`` / ``ema``: the normalised mean sub-token (paper default); for rank > 1
      the remaining directions are the top right-singular vectors of the sub-tokens with the mean
      direction projected out. A zero mean falls back to ``svd``; an all-zero batch to the uniform
      direction 1/sqrt(M).
    - ``svd``: top right-singular vectors of at most ``max_samples`` sub-tokens.
    - ``random``: a seeded Gaussian, orthonormalised (does not touch the global RNG).
    """
    work = compute_dtype(x.dtype)
    if strategy == "random":
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        raw = torch.randn(sub_token_size, rank, generator=generator, dtype=torch.float64, device="cpu")
        return orthonormalise(raw).to(device=x.device, dtype=work)

    if mean is None:  # (M,); a zero-token x (a rank with no tokens under DDP) has none: zeros, the svd gives uniform
        mean = mean_sub_token(x, sub_token_size) if x.numel() else torch.zeros(sub_token_size, device=x.device)
    if not torch.isfinite(mean).all():
        raise ValueError("the initialisation batch contains NaN/Inf; VeLoRA cannot build its projection "
                         "from it — check the inputs or the preceding layers")
    rows = subsample_rows(sub_token_rows(x, sub_token_size), max_samples).to(work)  # (N, M)

    if strategy == "svd":
        if rows.abs().sum() == 0:
            return uniform_directions(sub_token_size, rank, x.device, work)
        return top_right_singular(rows, rank)

    # batch_average_once / ema
    norm = mean.norm()
    # a mean this small next to the typical sub-token is rounding noise, not a direction
    typical = rows.norm(dim=1).mean() if rows.shape[0] else norm.new_zeros(())
    if norm <= max(float(torch.finfo(work).eps) * 10 * float(typical), float(torch.finfo(work).tiny)):
        if rows.abs().sum() == 0:
            return uniform_directions(sub_token_size, rank, x.device, work)
        return top_right_singular(rows, rank)
    first = (mean / norm).to(work)  # (M,)
    if rank == 1:
        return first.unsqueeze(1)
    residual = rows - (rows @ first).unsqueeze(1) * first  # (N, M), mean direction removed
    rest = _spanned_directions(residual, rank - 1)  # (M, ≤ rank-1), orthogonal to the mean
    # fewer sub-tokens than rank (or degenerate ones): complete the basis instead of shrinking v
    return complete_basis(orthonormalise(torch.cat([first.unsqueeze(1), rest], dim=1)), rank)


def uniform_directions(sub_token_size: int, rank: int, device, dtype) -> torch.Tensor:
    base = torch.eye(sub_token_size, rank, device=device, dtype=dtype)
    base[:, 0] = 1.0 / math.sqrt(sub_token_size)
    return orthonormalise(base)


# ---- coefficients kept at fewer bits (VeLoRAConfig.coefficient_bits) -----------------------------------

COEFFICIENT_BITS = (8, 4)
COEFFICIENT_SCALES = ("token_and_column", "token")  # VeLoRAConfig.coefficient_scales, the default first


class CoefficientFormat(NamedTuple):
    """How a VeLoRA op keeps z: ``bits`` (COEFFICIENT_BITS) and whether per-column scales come first."""

    bits: int
    columns: bool = True


class QuantisedCoefficients(NamedTuple):
    """What a VeLoRA op keeps for z (T, G, r) under ``coefficient_bits``."""

    codes: torch.Tensor  # (T, G·r) int8, or (T, ceil(G·r / 2)) uint8 holding two 4-bit codes a byte
    scales: torch.Tensor  # (T, 1): one step per token
    columns: torch.Tensor | None  # (1, G·r): each coefficient's RMS over the batch's tokens, or None (token only)


COLUMN_SAMPLE_TOKENS = 1024  # column scales read at most about this many evenly spaced tokens


def column_scales(flat: torch.Tensor) -> torch.Tensor:
    """(T, n) -> (1, n): each column's root mean square over the tokens (every ceil(T / 1024)-th token when
    T > 1024: a normalisation needs an estimate, and a full pass over z cost as much as the rounding itself); 1 for
    a column whose RMS is 0 or not finite (no tokens, all zeros, NaN/Inf: those stay to the per-token scale)."""
    sample = flat[:: max(1, -(-flat.shape[0] // COLUMN_SAMPLE_TOKENS))]  # (T', n), T' <= 1024 evenly spaced
    rms = torch.linalg.vector_norm(sample, dim=0, keepdim=True) / math.sqrt(max(sample.shape[0], 1))  # (1, n)
    return torch.where(torch.isfinite(rms) & (rms > 0), rms, torch.ones_like(rms))  # (1, n)


def quantise_coefficients(z: torch.Tensor, bits: int, columns: bool = True) -> QuantisedCoefficients:
    """z (T, G, r) -> codes and scales: symmetric round-to-nearest integers in [-q, q], q = 2^(bits-1) - 1.

    With ``columns`` (the default) each coefficient is first divided by its RMS over the batch's tokens
    (``column_scales``, G·r numbers; read off at most ~1024 evenly spaced tokens), so a feature that is large on
    every token (the outlier channels of pretrained LLMs) does not coarsen every other coefficient's step; then
    each token gets one scale, max|y_t| / q (fp32; fp64 for fp64 z). 8 bits: codes int8 (T, G·r); 4 bits: two
    codes per byte. A token whose z holds NaN/Inf gets a NaN scale, so all of its dequantised coefficients are NaN
    and the weight gradient says so (a finite gradient is never made up)."""
    if bits not in COEFFICIENT_BITS:
        raise ValueError(f"coefficient bits={bits!r} is not supported; use one of {COEFFICIENT_BITS}")
    tokens = z.shape[0]
    flat = _as(z.reshape(tokens, z.shape[1] * z.shape[2]), state_dtype(z.dtype))  # (T, G·r), T = 0 works
    scaled_columns = column_scales(flat) if columns else None  # (1, G·r)
    if scaled_columns is not None:
        flat = flat / scaled_columns  # (T, G·r), each column of RMS ~1 (a non-finite token stays non-finite)
    top = 2 ** (bits - 1) - 1
    if flat.shape[1]:  # max |z_t| in one pass; NaN in a token gives NaN, Inf gives Inf
        absmax = torch.linalg.vector_norm(flat, ord=math.inf, dim=1, keepdim=True)  # (T, 1)
    else:
        absmax = flat.new_zeros(tokens, 1)
    scales = absmax / top  # (T, 1)
    finite = torch.isfinite(scales)  # (T, 1)
    divisor = torch.where(finite & (absmax > 0), scales, torch.ones_like(scales))  # (T, 1), never 0, NaN or Inf
    # (T, G·r): in place only on the column-scaled copy (without columns, flat may be z itself)
    steps = flat.div_(divisor) if scaled_columns is not None else torch.div(flat, divisor)
    codes = steps.round_().clamp_(-top, top).to(torch.int8)  # (T, G·r); a non-finite token's
    scales = torch.where(finite, scales, torch.full_like(scales, math.nan))  # codes are moot: its scale is NaN
    return QuantisedCoefficients(_pack_nibbles(codes) if bits == 4 else codes, scales, scaled_columns)


def dequantise_coefficients(kept: QuantisedCoefficients, bits: int, shape: torch.Size,
                            dtype: torch.dtype) -> torch.Tensor:
    """The inverse of ``quantise_coefficients`` up to rounding: its codes and scales -> z (T, G, r) in ``dtype``."""
    count = shape[1] * shape[2]  # G·r
    codes = _unpack_nibbles(kept.codes, count) if bits == 4 else kept.codes  # (T, G·r) int8
    z = codes.to(kept.scales.dtype).mul_(kept.scales)  # (T, G·r), NaN for a token quantised from NaN/Inf
    if kept.columns is not None:
        z = z.mul_(kept.columns)  # (T, G·r)
    return _as(z, dtype).view(shape)  # (T, G, r)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-7, 7] (T, n) -> uint8 (T, ceil(n/2)): code + 8 in each half-byte, even columns low."""
    shifted = (codes + 8).to(torch.uint8)  # (T, n) in [1, 15]
    if shifted.shape[1] % 2:
        shifted = torch.nn.functional.pad(shifted, (0, 1), value=8)  # (T, n+1), the pad decodes to 0
    return shifted[:, 0::2] | (shifted[:, 1::2] << 4)  # (T, ceil(n/2))


def _unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 (T, ceil(n/2)) -> int8 codes (T, n)."""
    pairs = torch.stack((packed & 15, packed >> 4), dim=2)  # (T, ceil(n/2), 2)
    return pairs.reshape(packed.shape[0], 2 * packed.shape[1])[:, :count].to(torch.int8) - 8  # (T, n)
