"""Leak check: how many val / test images have a near-duplicate among the training images.

Random splits assume independent images. Overlapping crops of one photo, frames of one video or scans of
one patient are not: a val image whose near-copy is in SSL-train is partly memorised, and its score flatters.
This module measures it on raw pixels, with no model. Images are compared at WORK x WORK px. A window's
feature is its grid of CELL x CELL px averages (RGB), less the training images' mean feature and its own
mean, L2-normalised: the dot product of two features is a (Pearson) correlation of their pixels. A training
image is described by its centre window (WINDOW px, 75 % of the side); a query by its windows at every offset
up to SHIFT / 2 px from the centre (12.5 % of the side), so that shifted copies line up. Two stages keep it
fast: a chunked matmul of coarse features (4 x 4 cells, windows every 2 px) picks each query's CANDIDATES
nearest training images, and fine features (8 x 8 cells, every offset) score them. A query whose best score
reaches THRESHOLD is a near-duplicate, unless it is low-detail or repetitive: flat, smooth or tiled images match
themselves shifted by more than the check aligns (two of their own windows APART px or more apart reach LOW_DETAIL,
a margin below THRESHOLD, as a query's best match is the highest of many), so they would match any look-alike
(another strip of the same sky or wall) as well as a copy. Those are not judged: they are counted apart and left
out of the rate. The constants are calibrated in ``bench/leak_calibration.py``
(README, "When your images are not independent"). Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

WORK = 32  # images are compared at WORK x WORK px (resized once)
WINDOW = 24  # px: 75 % of WORK
SHIFT = WORK - WINDOW  # window offsets 0..SHIFT px per axis; the centre window is at SHIFT // 2
FINE, COARSE = 3, 6  # cell sizes: 8 x 8 cells (the score) and 4 x 4 cells (the candidate search)
CANDIDATES = 32  # training images scored with every window of a query
THRESHOLD = 0.99  # a query at or above this similarity to some training image is a near-duplicate
APART = SHIFT // 2 + 1  # px: more than the check aligns
LOW_DETAIL = 0.98  # a query with two own windows APART+ px apart (either axis) this similar is low-detail: not judged
WARN_RATE = 0.05  # the data summary warns above this leak rate
MAX_QUERIES = 2000  # more val + test images than this: a fixed random sample of them is checked
_BLOCK = 4096  # training images per block
_QUERY_BLOCK = 128  # query images per block


def _work(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` -> float ``[N, 3, WORK, WORK]``."""
    work = images.float()
    return work if work.shape[-1] == WORK else F.interpolate(work, size=(WORK, WORK), mode="bilinear", antialias=True)


def _raw(work: torch.Tensor, cell: int, step: int = 0) -> torch.Tensor:
    """The cell averages of windows ``[N, W, 3 (WINDOW / cell)^2]``: at every ``step`` px offset (0..SHIFT, each
    axis), or only the centre window when ``step`` is 0."""
    if not step:  # one window: non-overlapping pooling of it
        centre = SHIFT // 2
        return F.avg_pool2d(work[..., centre : centre + WINDOW, centre : centre + WINDOW], cell).flatten(1)[:, None]
    cells = F.avg_pool2d(work, cell, stride=1).contiguous()  # [N, 3, H, H]: every cell position
    count, side = SHIFT // step + 1, WINDOW // cell
    n, c, h, w = cells.stride()
    grid = cells.as_strided((len(work), 3, count, side, count, side), (n, c, h * step, h * cell, w * step, w * cell))
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(len(work), count**2, -1)


def _unit(raw: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    centred = raw - mean
    return F.normalize(centred - centred.mean(dim=-1, keepdim=True), dim=-1)


def mean_feature(reference: torch.Tensor, cell: int = FINE) -> torch.Tensor:
    """The mean raw feature of the centre windows of ``reference`` (the training images)."""
    raw = [_raw(_work(reference[i : i + _BLOCK]), cell)[:, 0] for i in range(0, len(reference), _BLOCK)]
    return torch.cat(raw).mean(dim=0)


def window_features(images: torch.Tensor, mean: torch.Tensor, step: int = 0, cell: int = FINE) -> torch.Tensor:
    """Unit features ``[N, W, D]`` of the windows of ``images`` (every ``step`` px; 0: the centre one), centred
    on ``mean``."""
    return _unit(_raw(_work(images), cell, step), mean)


def centre_features(images: torch.Tensor, mean: torch.Tensor, cell: int = FINE) -> torch.Tensor:
    """Unit features ``[N, D]`` of the centre windows."""
    return window_features(images, mean, 0, cell)[:, 0]


def _candidates(queries: torch.Tensor, reference: torch.Tensor, count: int) -> torch.Tensor:
    """Indices ``[N, count]`` of the reference features most similar to any window ``[N, W, D]`` of each query."""
    best = torch.full((len(queries), 0), -2.0)
    index = torch.zeros((len(queries), 0), dtype=torch.long)
    rows = queries.flatten(0, 1)
    for start in range(0, len(reference), _BLOCK):
        similarity = (rows @ reference[start : start + _BLOCK].T).view(len(queries), queries.shape[1], -1).amax(1)
        top = similarity.topk(min(count, similarity.shape[1]), dim=1)
        best, order = torch.cat([best, top.values], 1).topk(min(count, best.shape[1] + top.values.shape[1]), dim=1)
        index = torch.cat([index, top.indices + start], 1).gather(1, order)
    return index


def own_similarity(windows: torch.Tensor) -> torch.Tensor:
    """Each image's highest similarity between two of its own windows ``[B, W, D]`` (every offset, 1 px apart) that
    are APART px or more apart on either axis ``[B]``: near 1 for flat, smooth and tiled images."""
    count = SHIFT + 1
    offset = torch.arange(count**2)
    y, x = offset // count, offset % count
    far = torch.maximum((y[:, None] - y).abs(), (x[:, None] - x).abs()) >= APART
    return (windows @ windows.transpose(1, 2)).masked_fill(~far, -2.0).flatten(1).amax(1)


@torch.no_grad()
def nearest_similarity(queries: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query image, its highest similarity to a reference image over its windows (float ``[N]``; -1 when
    there is no reference image), and its own similarity (float ``[N]``: its windows APART px or more apart; a
    query at LOW_DETAIL or above is low-detail or repetitive, and its match says nothing)."""
    best, own = torch.full((len(queries),), -1.0), torch.full((len(queries),), -1.0)
    if not len(queries) or not len(reference):
        return best, own
    raw = {cell: [] for cell in (FINE, COARSE)}
    for start in range(0, len(reference), _BLOCK):
        work = _work(reference[start : start + _BLOCK])
        for cell, parts in raw.items():
            parts.append(_raw(work, cell)[:, 0])
    means = {cell: torch.cat(parts).mean(dim=0) for cell, parts in raw.items()}
    fine, coarse = (_unit(torch.cat(raw[cell]), means[cell]) for cell in (FINE, COARSE))
    for start in range(0, len(queries), _QUERY_BLOCK):
        work = _work(queries[start : start + _QUERY_BLOCK])
        near = _candidates(_unit(_raw(work, COARSE, 2), means[COARSE]), coarse, CANDIDATES)
        windows = _unit(_raw(work, FINE, 1), means[FINE])  # [B, W, D]
        best[start : start + len(work)] = torch.einsum("bwd,bkd->bwk", windows, fine[near]).flatten(1).amax(1)
        own[start : start + len(work)] = own_similarity(windows)
    return best, own


@dataclass(frozen=True)
class LeakCheck:
    """How many val and test images have a near-duplicate among the training images.

    ``*_checked`` counts the images judged; the low-detail or repetitive ones (``*_low_detail``) are not, and are
    not in the rate. ``group_by`` is the split's ``data.group_by`` (None: a random split)."""

    val_flagged: int
    val_checked: int
    test_flagged: int
    test_checked: int
    total: int  # val + test images (more than checked when a sample was checked)
    val_low_detail: int = 0
    test_low_detail: int = 0
    group_by: str | None = None
    threshold: float = THRESHOLD

    @property
    def rate(self) -> float:
        """The share of judged val + test images that are near-duplicates (the metric ``leak_rate``)."""
        return (self.val_flagged + self.test_flagged) / max(self.val_checked + self.test_checked, 1)

    def describe(self) -> str:
        checked, low = self.val_checked + self.test_checked, self.val_low_detail + self.test_low_detail
        which = "val+test" if self.test_checked + self.test_low_detail else "val"
        sample = f", on a sample of {checked + low} of {self.total}" if checked + low < self.total else ""
        unjudged = (f"too low-detail or repetitive to tell a copy from a look-alike (flat, smooth or tiled: each "
                    f"matches itself shifted {APART}+ px at >= {LOW_DETAIL})")
        if not checked:
            return f"leak check: no {which} image could be judged{sample}: all {low} are {unjudged}"
        val, test = self.val_flagged / max(self.val_checked, 1), self.test_flagged / max(self.test_checked, 1)
        parts = f"val {val:.1%}, test {test:.1%}; " if self.test_checked else ""
        text = (f"leak check: {self.rate:.1%} of the {checked} judged {which} images have a near-duplicate in the "
                f"training images ({parts}pixel similarity >= {self.threshold}{sample})")
        return f"{text}; not judged: {low} image(s) {unjudged}" if low else text

    def warning(self) -> str | None:
        """One line when the rate is above WARN_RATE, else None."""
        if self.rate <= WARN_RATE:
            return None
        if self.group_by is not None:
            return (f"WARNING: {self.rate:.0%} of val/test images are near-copies of training images of other groups "
                    f"(data.group_by={self.group_by!r}). Either the groups do not capture what ties the images (one "
                    "photo, video or patient under several groups: use a coarser data.group_by) or the images look "
                    "alike without being copies (plain, smooth or repetitive images the check could not set apart); "
                    "look at some of them before trusting val/test scores (README: 'When your images are not "
                    "independent')")
        return (f"WARNING: {self.rate:.0%} of val/test images are near-copies of training images, so val/test "
                "scores reward memorising them (a random split of images that are not independent: crops of one "
                "photo, frames of one video, one patient's scans). Set data.group_by so that each source stays "
                "in one split (README: 'When your images are not independent')")


def check_leaks(
    val: torch.Tensor, test: torch.Tensor, reference: torch.Tensor, seed: int = 0, group_by: str | None = None
) -> LeakCheck:
    """The near-duplicates of ``val`` and ``test`` images (uint8 ``[N, 3, S, S]``) in ``reference``; above
    MAX_QUERIES val + test images, a fixed random sample of each, in proportion to their sizes. Low-detail or
    repetitive images are counted apart. ``group_by``: the ``data.group_by`` that made the split, if any."""
    total = len(val) + len(test)
    generator = torch.Generator().manual_seed(seed)
    counts: dict[str, int] = {}
    for name, images in (("val", val), ("test", test)):
        keep = len(images) if total <= MAX_QUERIES else round(MAX_QUERIES * len(images) / total)
        sample = images[torch.randperm(len(images), generator=generator)[:keep]] if keep < len(images) else images
        best, own = nearest_similarity(sample, reference)
        low = own >= LOW_DETAIL
        counts |= {f"{name}_flagged": int(((best >= THRESHOLD) & ~low).sum()), f"{name}_checked": keep - int(low.sum()),
                   f"{name}_low_detail": int(low.sum())}
    return LeakCheck(**counts, total=total, group_by=group_by)
