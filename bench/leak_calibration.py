"""Calibrate the leak check's threshold (``ssl_train/data/leaks.py``) and time it on 10,000 images.

1. Pairs: 32 px crops of three photos that ship with the dependencies (scikit-learn's ``china.jpg`` and
   ``flower.jpg``, matplotlib's ``grace_hopper.jpg``), each crop covering 32, 64 or 128 px of the photo, against
   a near-copy (the same region shifted by 1-8 px, zoomed out by 6-25 %, or shifted 2 px with its contrast and
   brightness changed) or against an independent image (a crop of another photo, or of the same photo with
   no overlap). A pair's similarity is the leak check's: best query window against the centre window.
2. The rate itself (each val/test image against every training image): the digits default (independent
   images: any rate is a false alarm), and a folder of overlapping crops (``bench/overlapping_crops.py``)
   split at random (near-copies everywhere) and by group (none).
3. The time of ``check_leaks`` on 10,000 random-ish 32 px images at the default fractions (best of 3).

Usage::

    python -m bench.leak_calibration              # ~1 min; appends its section to bench/RESULTS.md
    python -m bench.leak_calibration --print-only
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from collections.abc import Callable

import matplotlib.cbook
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_sample_images

from bench.common import append_section, machine, markdown_table
from bench.overlapping_crops import write_overlapping_crops
from ssl_train.config import DataConfig
from ssl_train.data import leaks, load_splits

THRESHOLDS = (0.95, 0.96, 0.97, 0.98, 0.99)
CROP = 32
PAIRS = 300


def photos() -> list[np.ndarray]:
    """The three photos: uint8 ``[H, W, 3]``."""
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as hopper:
        return [*load_sample_images().images, np.asarray(hopper.convert("RGB"))]


def crop(photo: np.ndarray, y: int, x: int, side: int) -> torch.Tensor:
    """The ``side`` px square at (y, x) of ``photo``, resized to CROP px: uint8 ``[3, CROP, CROP]``."""
    region = torch.from_numpy(np.ascontiguousarray(photo[y : y + side, x : x + side])).permute(2, 0, 1)
    resized = F.interpolate(region[None].float(), size=(CROP, CROP), mode="bilinear", antialias=True)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


Pair = Callable[[np.random.Generator, list[np.ndarray], int, int, int, int], torch.Tensor]


def shifted(pixels: int) -> Pair:
    def make(rng, images, p, y, x, side):  # noqa: ANN001, ANN202 - a Pair
        step, angle = pixels * side / CROP, rng.uniform(0, 2 * np.pi)
        return crop(images[p], y + round(step * np.sin(angle)), x + round(step * np.cos(angle)), side)
    return make


def zoomed(scale: float) -> Pair:
    def make(rng, images, p, y, x, side):  # noqa: ANN001, ANN202
        larger = round(side * scale)
        return crop(images[p], y - (larger - side) // 2, x - (larger - side) // 2, larger)
    return make


def jittered(rng, images, p, y, x, side):  # noqa: ANN001, ANN201
    copy = shifted(2)(rng, images, p, y, x, side).float()
    return ((copy - copy.mean()) * 1.2 + copy.mean() + 20).clamp(0, 255).to(torch.uint8)


def apart(rng, images, p, y, x, side):  # noqa: ANN001, ANN201
    height, width = images[p].shape[:2]
    while True:
        y2, x2 = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
        if abs(y2 - y) >= side or abs(x2 - x) >= side:
            return crop(images[p], y2, x2, side)


def other(rng, images, p, y, x, side):  # noqa: ANN001, ANN201
    q = (p + 1 + int(rng.integers(len(images) - 1))) % len(images)
    height, width = images[q].shape[:2]
    return crop(images[q], int(rng.integers(0, height - side)), int(rng.integers(0, width - side)), side)


def pair_similarities(make: Pair, images: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """PAIRS similarities of a crop (the query) and what ``make`` makes of it (the training image)."""
    rng = np.random.default_rng(seed)
    queries, copies = [], []
    for _ in range(PAIRS):
        p = int(rng.integers(len(images)))
        side = CROP * int(rng.choice([1, 2, 4]))
        height, width = images[p].shape[:2]
        y, x = int(rng.integers(side, height - 2 * side)), int(rng.integers(side, width - 2 * side))
        queries.append(crop(images[p], y, x, side))
        copies.append(make(rng, images, p, y, x, side))
    query, copy = torch.stack(queries), torch.stack(copies)
    mean = leaks.mean_feature(copy)
    windows = leaks.window_features(query, mean, 1)
    return torch.einsum("nwd,nd->nw", windows, leaks.centre_features(copy, mean)).amax(dim=1).numpy()


def exhaustive_similarity(queries: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """``leaks.nearest_similarity`` without its candidate stage: every window against every training image."""
    mean = leaks.mean_feature(reference)
    ref = leaks.centre_features(reference, mean)
    return np.concatenate([
        (leaks.window_features(queries[i : i + 64], mean, 1) @ ref.T).flatten(1).amax(1).numpy()
        for i in range(0, len(queries), 64)])


def rates(similarity: np.ndarray) -> dict[str, float]:
    return {f">= {t}": float(np.mean(similarity >= t)) for t in THRESHOLDS}


def pair_table() -> pd.DataFrame:
    images = photos()
    cases: dict[str, Pair] = {
        **{f"copy shifted {px} px ({px / CROP:.0%})": shifted(px) for px in (1, 2, 3, 4, 6, 8)},
        **{f"copy zoomed out {scale - 1:.0%}": zoomed(scale) for scale in (1.06, 1.125, 1.25)},
        "copy shifted 2 px, contrast x1.2, +20": jittered,
        "same photo, no overlap": apart,
        "another photo": other,
    }
    rows = []
    for name, make in cases.items():
        similarity = pair_similarities(make, images)
        rows.append({"pair": name, "median": float(np.median(similarity)),
                     "5 %": float(np.quantile(similarity, 0.05)), **rates(similarity)})
    return pd.DataFrame(rows)


def _set_rates(name: str, config: DataConfig) -> dict[str, object]:
    splits = load_splits(DataConfig(**{**config.__dict__, "leak_check": False}))
    queries = torch.cat([splits.val.images, splits.test.images])
    similarity = leaks.nearest_similarity(queries, splits.ssl_train.images).numpy()
    exhaustive = exhaustive_similarity(queries, splits.ssl_train.images)
    return {"set": name, "val+test images": len(queries), "median": float(np.median(similarity)), **rates(similarity),
            f"exhaustive >= {leaks.THRESHOLD}": float(np.mean(exhaustive >= leaks.THRESHOLD))}


def rate_table() -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        crops = str(write_overlapping_crops(tmp, classes=3, groups_per_class=8, crops_per_group=20, size=16))
        return pd.DataFrame([
            _set_rates("digits default (independent)", DataConfig()),
            _set_rates("overlapping crops, random split", DataConfig(source="folder", path=crops, image_size=16)),
            _set_rates("overlapping crops, group_by=level:1",
                       DataConfig(source="folder", path=crops, image_size=16, group_by="level:1")),
        ])


def timing(count: int = 10_000, repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` seconds on ``count`` random-ish 32 px images (smooth colour blobs plus noise) split at the
    default fractions: ``check_leaks`` as ``load_splits`` runs it (a sample of MAX_QUERIES val+test images when
    there are more), and every val+test image."""
    generator = torch.Generator().manual_seed(0)
    blobs = F.interpolate(torch.rand(count, 3, 4, 4, generator=generator) * 255, size=(CROP, CROP), mode="bicubic")
    images = (blobs + 20 * torch.randn(count, 3, CROP, CROP, generator=generator)).clamp(0, 255).to(torch.uint8)
    config = DataConfig()
    test = round(count * config.test_fraction)
    val = round((count - test) * config.val_fraction)
    val_set, test_set, training = images[:val], images[val : val + test], images[val + test :]
    runs = {"check_leaks": lambda: leaks.check_leaks(val_set, test_set, training),
            "all val+test": lambda: leaks.nearest_similarity(images[: val + test], training)}
    best = {}
    for name, run in runs.items():
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        best[name] = min(seconds)
    return {**best, "queries": val + test, "training": len(training)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print-only", action="store_true", help="print the section; do not append it")
    args = parser.parse_args()
    times = timing()
    section = (
        f"## Leak check calibration ({datetime.date.today()}, {machine()})\n\n"
        f"`python -m bench.leak_calibration`. Features at {leaks.WORK} px: the {leaks.WINDOW} px window's "
        f"{leaks.FINE} px cells (RGB), the training images' mean and each window's mean subtracted, L2-normalised; "
        f"a query's windows at every offset up to {leaks.SHIFT // 2} px from the centre, scored against its "
        f"{leaks.CANDIDATES} candidates (coarse {leaks.COARSE} px cells). Shipped threshold: {leaks.THRESHOLD}.\n\n"
        f"Pairs ({PAIRS} each, {CROP} px crops of 3 photos): share of pairs at or above each similarity\n\n"
        f"{markdown_table(pair_table())}\n\n"
        "Each val/test image against every SSL-train image (the leak rate at each threshold; the last column "
        "without the candidate stage)\n\n"
        f"{markdown_table(rate_table())}\n\n"
        f"Time on 10,000 random-ish 32 px images ({times['queries']} val+test, {times['training']} SSL-train; best of "
        f"3, {os.getloadavg()[0]:.1f} load average at the end): `check_leaks` (a sample of {leaks.MAX_QUERIES}) "
        f"{times['check_leaks']:.2f} s, all {times['queries']} val+test images {times['all val+test']:.2f} s\n"
    )
    print(section)
    if not args.print_only:
        append_section(section)


if __name__ == "__main__":
    main()
