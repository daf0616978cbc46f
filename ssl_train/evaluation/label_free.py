"""Scores that need no labels: RankMe and the collapse monitor's embedding spread."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def embedding_std(embeddings: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalised embeddings times sqrt(d).

    Spread embeddings have std about 1/sqrt(d) per dimension, so this is about 1; a collapsed
    representation drives it to 0 (BYOL/SimSiam collapse monitor).
    """
    if embeddings.dim() != 2 or len(embeddings) < 2:
        raise ValueError(f"embeddings must be [N >= 2, d], got {list(embeddings.shape)}")
    z = F.normalize(embeddings.float(), dim=1)
    return (z.std(dim=0).mean() * math.sqrt(z.shape[1])).item()


def effective_rank(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023, eq. 1): exp(-sum p_k log p_k), p_k = sigma_k / ||sigma||_1 + eps, sigma the
    singular values of the embedding matrix.

    Lies in [1, min(N, D)]: 1 for a collapsed (rank-one) representation, r for r equal non-zero singular values.
    """
    if features.dim() != 2 or features.numel() == 0:
        raise ValueError(f"features must be a non-empty [N, D] matrix, got {list(features.shape)}")
    singular = torch.linalg.svdvals(features.double())
    p = singular / singular.sum().clamp_min(eps) + eps
    return (-(p * p.log()).sum()).exp().item()


RANKME_SAMPLES = 2048  # images RankMe is computed on (the paper uses ~25,600; the rank is at most min(N, D))


def rankme_sample(count: int, limit: int = RANKME_SAMPLES) -> torch.Tensor:
    """Fixed indices (seed 0, sorted) of at most ``limit`` of ``count`` images: every epoch of every trial scores
    RankMe on the same images, so the values compare."""
    if count <= limit:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(0))[:limit].sort().values


def eigenspectrum(features: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the features' covariance matrix, largest first (float64)."""
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"features must be [N >= 2, D], got {list(features.shape)}")
    centred = features.double() - features.double().mean(dim=0)
    singular = torch.linalg.svdvals(centred)
    return singular**2 / (len(features) - 1)


def alpha_exponent(features: torch.Tensor, floor: float = 1e-10) -> float:
    """alpha-ReQ's alpha (Agrawal et al. 2022, eq. 3): the decay of the covariance eigenspectrum, lambda_k ~ k^-alpha,
    fitted by least squares on (log k, log lambda_k) over the eigenvalues above ``floor`` times the largest.

    Alpha near 1 goes with good linear readout; well below 1 the features are spread like noise, well above they
    decay like a collapsing representation."""
    spectrum = eigenspectrum(features)
    kept = spectrum[spectrum > floor * spectrum[0].clamp_min(1e-300)]
    if len(kept) < 3:
        return float("inf")  # (near) rank one: collapsed, as steep as it gets
    log_k = torch.arange(1, len(kept) + 1, dtype=torch.float64).log()
    slope = torch.linalg.lstsq(torch.stack([log_k, torch.ones_like(log_k)], dim=1), kept.log()[:, None]).solution[0]
    return float(-slope)


def alpha_req_score(alpha: float) -> float:
    """alpha-ReQ as a score to maximise: ``-|alpha - 1|`` (0 at the ideal decay, lower either way)."""
    return -abs(alpha - 1.0)
