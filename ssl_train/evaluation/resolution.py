"""How precisely a val split measures a score: the standard error of a per-image mean, by bootstrap over groups.

Images tied by source (``data.group_by``) are not independent, so the bootstrap resamples whole groups (the
cluster bootstrap; Davison and Hinkley 1997, Sec. 3.8); without groups, images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

BOOTSTRAPS = 500  # resamples of a per-image mean (cheap: one gather)
SET_BOOTSTRAPS = 30  # resamples of a set statistic (one SVD each)


def bootstrap_se(per_image: np.ndarray, groups: np.ndarray | None = None, resamples: int = BOOTSTRAPS,
                 seed: int = 0) -> float:
    """Standard error of ``per_image.mean()``: the std of the means of ``resamples`` resamples with replacement
    of the groups (all of a drawn group's images) or, with ``groups`` None, of the images."""
    values = np.asarray(per_image, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"need a 1-D array of at least 2 per-image scores, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    if groups is None:
        draws = rng.integers(0, len(values), size=(resamples, len(values)))
        return float(values[draws].mean(axis=1).std(ddof=1))
    names, index = np.unique(np.asarray(groups), return_inverse=True)
    if len(names) < 2:
        return float("nan")  # one group: nothing to resample
    sums, counts = np.bincount(index, weights=values), np.bincount(index)
    draws = rng.integers(0, len(names), size=(resamples, len(names)))
    return float((sums[draws].sum(axis=1) / counts[draws].sum(axis=1)).std(ddof=1))


def bootstrap_statistic_se(features: torch.Tensor, statistic: Callable[[torch.Tensor], float],
                           groups: np.ndarray | None = None, resamples: int = SET_BOOTSTRAPS, seed: int = 0) -> float:
    """Standard error of a statistic of a whole set of features (RankMe, alpha-ReQ), by recomputing it on
    ``resamples`` resamples of the groups (or images) with replacement."""
    rng = np.random.default_rng(seed)
    if groups is None:
        draws = [rng.integers(0, len(features), len(features)) for _ in range(resamples)]
    else:
        names, index = np.unique(np.asarray(groups), return_inverse=True)
        if len(names) < 2:
            return float("nan")
        members = [np.flatnonzero(index == g) for g in range(len(names))]
        draws = [np.concatenate([members[g] for g in rng.integers(0, len(names), len(names))])
                 for _ in range(resamples)]
    values = np.array([statistic(features[torch.from_numpy(draw)]) for draw in draws], dtype=np.float64)
    return float(values[np.isfinite(values)].std(ddof=1)) if np.isfinite(values).sum() > 1 else float("nan")
