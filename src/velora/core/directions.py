"""Where a VeLoRA layer's directions come from: the first batch (the paper), a seed or a given tensor, a running
mean (``init="ema"``) or a re-estimate every K training forwards (``reestimate_every``), shared by every sub-token
group (V: (M, r), the paper) or one set per group (``per_group_directions``, V: (G, M, r)).

Every data-dependent estimate uses every rank's batch: the mean sub-token (per group) is averaged over the ranks
whose batch has tokens, and ``svd`` directions are the top eigenvectors of the sub-tokens' Gram matrix summed over
the ranks (one all-reduce each); the finished directions are broadcast from the lowest rank with tokens, so all
ranks hold bit-identical v. No function here mutates a tensor it was given.
"""

from __future__ import annotations

import torch

from velora.core.config import VeLoRAConfig
from velora.core.layer_support import broadcast, distributed, first_rank_with_tokens, mean_over_ranks, sum_over_ranks
from velora.core.subtoken import (
    canonical_signs,
    complete_basis,
    compute_dtype,
    group,
    initial_directions,
    mean_sub_token,
    orthonormalise,
    state_dtype,
    sub_token_rows,
    subsample_rows,
    uniform_directions,
)

# ---- pure estimates ------------------------------------------------------------------------------------------


def group_means(x: torch.Tensor, sub_token_size: int, per_group: bool) -> torch.Tensor:
    """Mean sub-token of x in fp32 (fp64 for fp64 x): (M,) over all groups, or (G, M) per group. x has tokens."""
    if not per_group:
        return mean_sub_token(x, sub_token_size)  # (M,)
    groups = group(x, sub_token_size)  # (T, G, M), a view when M divides D
    return groups.sum(0, dtype=compute_dtype(x.dtype)) / groups.shape[0]  # (G, M)


def estimate(x: torch.Tensor, sub_token_size: int, rank: int, strategy: str, *, per_group: bool,
             max_samples: int, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Directions from the batch x (..., D): (M, r), or (G, M, r) with each group's from that group's sub-tokens
    alone (at most ``max_samples`` of them for ``svd``). ``mean``: the mean sub-token to use, (M,) or (G, M)."""
    if not per_group:
        return initial_directions(x, sub_token_size, rank, strategy, max_samples=max_samples, mean=mean)
    if strategy != "svd" and rank == 1 and x.numel():  # the paper's rule in one pass over all groups
        mean = group_means(x, sub_token_size, True) if mean is None else mean  # (G, M)
        directions = _normalised_means(group(x, sub_token_size), mean, max_samples)
        if directions is not None:
            return directions
    if strategy == "svd" and x.numel():  # every group's SVD in one batched call
        directions = _batched_top_singular(group(x, sub_token_size), rank, max_samples)
        if directions is not None:
            return directions
    rows = group(x, sub_token_size).transpose(0, 1)  # (G, T, M), group g's sub-tokens in rows[g]
    return torch.stack([
        initial_directions(rows[index], sub_token_size, rank, strategy, max_samples=max_samples,
                           mean=None if mean is None else mean[index])
        for index in range(rows.shape[0])
    ])  # (G, M, r)


def _normalised_means(groups: torch.Tensor, mean: torch.Tensor, max_samples: int) -> torch.Tensor | None:
    """Each group's normalised mean sub-token (G, M, 1), as ``initial_directions`` builds it for one group; None
    when some group's mean is rounding noise next to its typical sub-token (the per-group fallback handles it)."""
    if not torch.isfinite(mean).all():
        raise ValueError("the initialisation batch contains NaN/Inf; VeLoRA cannot build its projection "
                         "from it — check the inputs or the preceding layers")
    work = mean.dtype
    sample = subsample_rows(groups, max_samples).to(work)  # (N, G, M), the tokens the one-group rule looks at
    typical = sample.norm(dim=-1).mean(dim=0)  # (G,)
    norm = mean.norm(dim=-1)  # (G,)
    floor = (typical * float(torch.finfo(work).eps) * 10).clamp_min(float(torch.finfo(work).tiny))  # (G,)
    if not bool((norm > floor).all()):  # one host sync per estimate
        return None
    return (mean / norm.unsqueeze(-1)).unsqueeze(-1)  # (G, M, 1)


def _batched_top_singular(groups: torch.Tensor, rank: int, max_samples: int) -> torch.Tensor | None:
    """Each group's top-``rank`` right singular vectors (G, M, r), signs as ``top_right_singular`` sets them, from
    one batched SVD of (T, G, M) sub-tokens; None when some group spans fewer than ``rank`` directions or holds
    NaN/Inf (NaN singular values fail the check below; the per-group fallback completes the basis or raises)."""
    work = state_dtype(groups.dtype)
    sample = subsample_rows(groups, max_samples).to(work).transpose(0, 1)  # (G, N, M)
    try:
        _, singular, vh = torch.linalg.svd(sample, full_matrices=False)  # (G, k), (G, k, M)
    except RuntimeError:  # ill-conditioned: the per-group path falls back to eigh
        return None
    floor = singular[:, :1] * torch.finfo(work).eps * max(sample.shape[1:])  # (G, 1)
    if singular.shape[1] < rank or not bool((singular[:, rank - 1:rank] > floor).all()):  # one host sync
        return None
    return canonical_signs(vh[:, :rank].transpose(1, 2))  # (G, M, r)


def seeded_directions(sub_token_size: int, rank: int, groups: int | None, seed: int) -> torch.Tensor:
    """The ``init="random"`` directions on the CPU: (M, r), or (G, M, r) with an independent draw per group."""
    if groups is None:
        return initial_directions(torch.zeros(1, sub_token_size), sub_token_size, rank, "random", seed=seed)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    raw = torch.randn(groups, sub_token_size, rank, generator=generator, dtype=torch.float64)  # (G, M, r)
    return torch.stack([orthonormalise(draw) for draw in raw]).float()  # (G, M, r)


def given_directions(init: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """A user's (M,) / (M, r) tensor as orthonormal directions of ``shape`` ((M, r), or (G, M, r): every group
    starts from the same directions), on the CPU."""
    size, rank = shape[-2:]
    if init.shape[0] != size or (init.dim() == 2 and init.shape[1] != rank):
        raise ValueError(f"init tensor of shape {tuple(init.shape)} does not fit {name!r} "
                         f"(expects ({size},) or ({size}, {rank}))")
    directions = orthonormalise(init.detach().to("cpu"))  # (M, r)
    return directions.expand(shape).contiguous()  # (M, r) / (G, M, r)


def normalised_running_mean(running: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """EMA directions: running (M,) or (G, M) normalised to (M, 1) / (G, M, 1); a zero-norm row keeps its old v."""
    norm = running.norm(dim=-1, keepdim=True)  # (1,) / (G, 1)
    unit = running / torch.where(norm > 0, norm, torch.ones_like(norm))  # (M,) / (G, M)
    return torch.where(norm > 0, unit, previous.squeeze(-1).to(unit)).unsqueeze(-1)  # (M, 1) / (G, M, 1)


def top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` eigenvectors of a Gram matrix XᵀX, (M, M) -> (M, r) or (G, M, M) -> (G, M, r): the top right
    singular vectors of X, signs as ``top_right_singular`` sets them (largest-magnitude entry positive); directions
    X does not span are completed by ``complete_basis``, an all-zero X gets the uniform directions (as in
    ``initial_directions``)."""
    if not torch.isfinite(gram).all():
        raise ValueError("the batch contains NaN/Inf; VeLoRA cannot build its projection from it — check the "
                         "inputs or the preceding layers")
    try:
        values, vectors = torch.linalg.eigh(gram)  # (..., M) ascending, (..., M, M)
    except RuntimeError as err:  # did not converge: the same on every rank (they hold the same summed matrix)
        raise ValueError(f"the eigendecomposition of the batch's sub-token Gram matrix failed ({err})") from None
    values, v = values.flip(-1), canonical_signs(vectors.flip(-1)[..., :rank])  # descending; (..., M, r)
    floor = values[..., :1].clamp_min(0) * torch.finfo(gram.dtype).eps * gram.shape[-1]  # (..., 1)
    spanned = (values[..., :rank] > floor).sum(-1)  # (...,) directions X spans, at most r
    if bool((spanned == rank).all()):  # one host sync
        return v
    flat, counts = v.reshape(-1, *v.shape[-2:]), spanned.reshape(-1).tolist()  # (B, M, r)
    # B x (M, r); an all-zero block gets the uniform directions, as the one-process rule gives it
    completed = [complete_basis(block[:, :count], rank) if count
                 else uniform_directions(block.shape[0], rank, v.device, v.dtype) for block, count in zip(flat, counts)]
    return torch.stack(completed).reshape(v.shape)


def _pooled_svd(x: torch.Tensor, config: VeLoRAConfig, sub_token_size: int) -> torch.Tensor:
    """``svd`` directions from every rank's batch: each rank's sub-token Gram matrix summed over the ranks, then its
    top eigenvectors — the top right singular vectors of all ranks' sub-tokens stacked, as one process on the whole
    batch would take while each rank's batch is within ``svd_max_samples`` (sub-tokens for the shared (M, M)
    matrix, tokens for the per-group (G, M, M) ones; a rank samples as one process does, so above it the ranks
    together use up to world × that many). A rank without tokens adds zeros. The Gram matrices are float64 (no
    overflow below |x| ~ 1e150, and the eigenvalues resolve what an SVD of the rows would); NaN/Inf anywhere in a
    rank's batch, sampled or not, makes every rank's summed matrix NaN, so all ranks raise the same error."""
    if config.per_group_directions:
        sample = subsample_rows(group(x, sub_token_size), config.svd_max_samples).double()  # (N, G, M)
        gram = torch.einsum("ngm,ngk->gmk", sample, sample)  # (G, M, M)
    else:
        rows = subsample_rows(sub_token_rows(x, sub_token_size), config.svd_max_samples).double()  # (N, M)
        gram = rows.t() @ rows  # (M, M)
    gram = torch.where(torch.isfinite(x).all(), gram, torch.full_like(gram, float("nan")))  # no host sync
    return top_eigenvectors(sum_over_ranks(gram, True), config.rank).to(state_dtype(x.dtype))


# ---- synchronised across ranks --------------------------------------------------------------------------------


def _mean_over_ranks(x: torch.Tensor, config: VeLoRAConfig, sub_token_size: int,
                     has_tokens: bool) -> torch.Tensor | None:
    """The per-rank mean sub-token ((M,) or (G, M)) averaged over the ranks with tokens; None when none has."""
    per_group = config.per_group_directions
    if has_tokens:
        local = group_means(x, sub_token_size, per_group)  # (M,) / (G, M)
    else:
        groups = group(x, sub_token_size).shape[1]
        local = torch.zeros((groups, sub_token_size) if per_group else (sub_token_size,), device=x.device,
                            dtype=compute_dtype(x.dtype))  # (M,) / (G, M), weight 0 below
    mean = mean_over_ranks(local.reshape(-1), has_tokens, config.sync_across_ranks)  # (M,) / (G·M,)
    return None if mean is None else mean.view(local.shape)


def from_batch(x: torch.Tensor, config: VeLoRAConfig,
               sub_token_size: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(directions, mean sub-token) from this batch, identical on every rank; None when no rank's batch has a
    sub-token (a zero-token batch: v stays as it is). Under ``svd`` the directions are the top singular vectors of
    all ranks' sub-tokens together (``_pooled_svd``; the mean is None); otherwise the normalised mean over ranks
    (rank > 1: plus the lowest rank-with-tokens' residual singular vectors). All ranks must call it together."""
    x, has_tokens, sync = x.detach(), x.numel() > 0, config.sync_across_ranks
    source = first_rank_with_tokens(has_tokens, x.device, sync)
    if source is None:
        return None
    strategy = "svd" if config.init == "svd" else "batch_average_once"
    if strategy == "svd" and distributed(sync):  # every rank's sub-tokens, not the source rank's alone
        return broadcast(_pooled_svd(x, config, sub_token_size), sync, source), None
    mean = None if strategy == "svd" else _mean_over_ranks(x, config, sub_token_size, has_tokens)  # (M,) / (G, M)
    directions = estimate(x, sub_token_size, config.rank, strategy, per_group=config.per_group_directions,
                          max_samples=config.svd_max_samples, mean=mean)
    return broadcast(directions, sync, source), mean


def ema_mean(x: torch.Tensor, config: VeLoRAConfig, sub_token_size: int) -> torch.Tensor | None:
    """This batch's mean sub-token over ranks for an EMA step ((M,) or (G, M)); None for no tokens anywhere."""
    return _mean_over_ranks(x.detach(), config, sub_token_size, x.numel() > 0)
