"""Calibrate the leak check's threshold (``ssl_train/data/leaks.py``) and time it on 10,000 images.

1. Pairs: 32 px crops of three photos that ship with the dependencies (scikit-learn's ``china.jpg`` and
   ``flower.jpg``, matplotlib's ``grace_hopper.jpg``), each crop covering 32, 64 or 128 px of the photo, against
   a near-copy (the same region shifted by 1-8 px, zoomed out by 6-25 %, or shifted 2 px with its contrast and
   brightness changed) or against an independent image (a crop of another photo, or of the same photo with
   no overlap). A pair's similarity is the leak check's: best query window against the centre window.
2. The rate itself (each val/test image against every training image): the digits default (independent
   images: any rate is a false alarm), and a folder of overlapping crops (``bench/overlapping_crops.py``)
   split at random (near-copies everywhere) and by group (none).
3. Low-detail and periodic scenes, generated here (smooth gradients with noise, near-flat skies, smooth grey
   "moon" surfaces, brick walls whose bricks vary in tone, and identical tiles), 512 px each, cut as in a grouped
   split: 8 vertical strips, 12 crops of 48 px inside each strip (no crop shares a pixel with another strip). Crops
   of 2 strips of each scene are checked against those of the other 6 strips (other groups of the same scene), crops
   of 3 scenes against those of 3 other scenes, and crops against 2 px shifted copies of themselves (true copies).
   Every match across strips or scenes is a false positive; the check leaves low-detail and repetitive images
   (own windows ``leaks.APART`` px or more apart at ``leaks.LOW_DETAIL``) unjudged. Then such scenes and 2 photos
   as the labeled folder of the report of issue 36: 10 classes, each one scene in 8 strips,
   ``data.group_by=level:1``, through ``load_splits``.
4. The time of ``check_leaks`` on 10,000 random-ish 32 px images at the default fractions (best of 3).

Usage::

    python -m bench.leak_calibration              # ~2 min; appends its section to bench/RESULTS.md
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


def pair_similarities(make: Pair, images: list[np.ndarray], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """PAIRS similarities of a crop (the query) and what ``make`` makes of it (the training image), and each
    query's own similarity (``leaks.nearest_similarity``: low-detail at ``leaks.LOW_DETAIL`` and above)."""
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
    similarity = torch.einsum("nwd,nd->nw", windows, leaks.centre_features(copy, mean)).amax(dim=1)
    return similarity.numpy(), leaks.own_similarity(windows).numpy()


def exhaustive_similarity(queries: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """``leaks.nearest_similarity`` without its candidate stage: every window against every training image."""
    mean = leaks.mean_feature(reference)
    ref = leaks.centre_features(reference, mean)
    return np.concatenate([
        (leaks.window_features(queries[i : i + 64], mean, 1) @ ref.T).flatten(1).amax(1).numpy()
        for i in range(0, len(queries), 64)])


def rates(similarity: np.ndarray) -> dict[str, float]:
    return {f">= {t}": float(np.mean(similarity >= t)) for t in THRESHOLDS}


def judged(similarity: np.ndarray, own: np.ndarray) -> dict[str, float]:
    """The share of queries left unjudged (low-detail or repetitive) and the shares flagged by the shipped rule, among
    all queries and among the judged ones (the leak rate)."""
    low = own >= leaks.LOW_DETAIL
    flagged = (similarity >= leaks.THRESHOLD) & ~low
    return {"low-detail": float(low.mean()), f"flagged (>= {leaks.THRESHOLD}, judged)": float(flagged.mean()),
            "rate (of judged)": float(flagged.sum() / max((~low).sum(), 1))}


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
        similarity, own = pair_similarities(make, images)
        low = own >= leaks.LOW_DETAIL
        rows.append({"pair": name, "median": float(np.median(similarity)),
                     "5 %": float(np.quantile(similarity, 0.05)), **rates(similarity),
                     "low-detail": float(low.mean()),
                     f">= {leaks.THRESHOLD}, judged": float(np.mean((similarity >= leaks.THRESHOLD) & ~low))})
    return pd.DataFrame(rows)


def _set_rates(name: str, config: DataConfig) -> dict[str, object]:
    splits = load_splits(DataConfig(**{**config.__dict__, "leak_check": False}))
    queries = torch.cat([splits.val.images, splits.test.images])
    similarity, own = (part.numpy() for part in leaks.nearest_similarity(queries, splits.ssl_train.images))
    exhaustive = exhaustive_similarity(queries, splits.ssl_train.images)
    return {"set": name, "val+test images": len(queries), "median": float(np.median(similarity)), **rates(similarity),
            f"exhaustive >= {leaks.THRESHOLD}": float(np.mean(exhaustive >= leaks.THRESHOLD)),
            **judged(similarity, own)}


def rate_table() -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        crops = str(write_overlapping_crops(tmp, classes=3, groups_per_class=8, crops_per_group=20, size=16))
        return pd.DataFrame([
            _set_rates("digits default (independent)", DataConfig()),
            _set_rates("overlapping crops, random split", DataConfig(source="folder", path=crops, image_size=16)),
            _set_rates("overlapping crops, group_by=level:1",
                       DataConfig(source="folder", path=crops, image_size=16, group_by="level:1")),
        ])


# ---------------------------------------------------------------- low-detail and periodic scenes

Scene = Callable[[np.random.Generator, int], np.ndarray]
SCENE_SIDE, STRIPS, STRIP_CROPS, STRIP_CROP = 512, 8, 12, 48  # px; the crops are resized to CROP px
HELD = (1, 5)  # the strips of each scene that are checked (the held-out groups)


def _smooth(rng: np.random.Generator, side: int, cells: int) -> np.ndarray:
    """A smooth random field ``[side, side]`` (std about 1): ``cells`` x ``cells`` normal values, bicubic."""
    low = torch.from_numpy(rng.normal(size=(1, 1, cells, cells))).float()
    return F.interpolate(low, size=(side, side), mode="bicubic", align_corners=False)[0, 0].numpy()


def _pixels(colour: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """``colour`` ``[side, side, 3]`` with pixel noise of std ``noise``: uint8."""
    return np.clip(colour + rng.normal(0, noise, colour.shape), 0, 255).astype(np.uint8)


def _tinted(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``grey`` ``[side, side]`` as a slightly tinted colour ``[side, side, 3]``."""
    return grey[..., None] * rng.uniform(0.8, 1.1, size=3)


def gradient_scene(rng: np.random.Generator, side: int) -> np.ndarray:
    """A smooth gradient in a random direction with a faint low-frequency blob and noise."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    angle = rng.uniform(0, 2 * np.pi)
    grey = (np.cos(angle) * xx + np.sin(angle) * yy) * rng.uniform(20, 80) + _smooth(rng, side, 3) * rng.uniform(5, 25)
    return _pixels(_tinted(grey + rng.uniform(60, 170), rng), rng, rng.uniform(2, 8))


def sky_scene(rng: np.random.Generator, side: int) -> np.ndarray:
    """A near-flat blue sky: a faint vertical gradient and fine noise."""
    yy = np.mgrid[0:side, 0:side][0] / side
    blue = np.array([rng.uniform(80, 140), rng.uniform(130, 190), rng.uniform(200, 250)])
    return _pixels(blue + (yy * rng.uniform(-25, 25))[..., None], rng, rng.uniform(1, 4))


def moon_scene(rng: np.random.Generator, side: int) -> np.ndarray:
    """A smooth grey surface: smooth fields at 5 scales, low contrast, little noise."""
    field = sum(_smooth(rng, side, cells) * weight
                for cells, weight in ((3, 1), (6, 0.6), (12, 0.3), (24, 0.15), (48, 0.08)))
    grey = rng.uniform(90, 160) + field * rng.uniform(10, 30)
    return _pixels(np.repeat(grey[..., None], 3, axis=2), rng, 1.5)


def brick_scene(rng: np.random.Generator, side: int, tone: float = 8.0, noise: float = 6.0) -> np.ndarray:
    """A brick wall: staggered bricks 10-40 px high, 2-3 times as long, mortar lines; each brick's tone varies by
    ``tone`` (std); pixel noise ``noise``."""
    height = int(rng.integers(10, 41))
    length, mortar = int(height * rng.uniform(2, 3)), max(1, height // 6)
    yy, xx = np.mgrid[0:side, 0:side]
    row = yy // height
    xs = xx + (row % 2) * (length // 2)
    col = xs // length
    base, contrast = rng.uniform(90, 170), rng.uniform(15, 40)
    tones = rng.normal(0, tone, size=(row.max() + 1, col.max() + 1))
    grey = np.where((yy % height < mortar) | (xs % length < mortar), base - contrast, base + tones[row, col])
    return _pixels(_tinted(grey, rng), rng, noise)


def tiled_scene(rng: np.random.Generator, side: int) -> np.ndarray:
    """Identical bricks (no tone variation, little noise): a perfect tiling, the limit of what pixels can tell."""
    return brick_scene(rng, side, tone=0.0, noise=3.0)


SCENES: dict[str, Scene] = {"gradient": gradient_scene, "sky": sky_scene, "moon": moon_scene, "brick": brick_scene,
                            "identical tiles": tiled_scene}


def strip_crops(scene: np.ndarray, rng: np.random.Generator, per_strip: int = STRIP_CROPS
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of a square ``scene`` cut in STRIPS vertical strips, ``per_strip`` inside each (STRIP_CROP px or 3/4 of
    a strip, resized to CROP px): ``[STRIPS, per_strip, 3, CROP, CROP]``, and a copy of each shifted 2 px (at CROP
    px) within its strip."""
    side = scene.shape[0]
    width = side // STRIPS
    size = min(STRIP_CROP, width * 3 // 4)
    shift = round(2 * size / CROP)
    crops, copies = [], []
    for strip in range(STRIPS):
        for _ in range(per_strip):
            y = int(rng.integers(0, side - size - shift))
            x = strip * width + int(rng.integers(shift, width - size + 1))
            crops.append(crop(scene, y, x, size))
            copies.append(crop(scene, y + shift, x - shift, size))
    shape = (STRIPS, per_strip, 3, CROP, CROP)
    return torch.stack(crops).view(shape), torch.stack(copies).view(shape)


def _scene_row(scene: str, pairs: str, queries: torch.Tensor, reference: torch.Tensor) -> dict[str, object]:
    similarity, own = (part.numpy() for part in leaks.nearest_similarity(queries, reference))
    return {"scene": scene, "checked against": pairs, "queries": len(queries),
            f"before (>= {leaks.THRESHOLD})": float(np.mean(similarity >= leaks.THRESHOLD)), **judged(similarity, own)}


def scene_table(sources: int = 6, seed: int = 0) -> pd.DataFrame:
    """Per scene kind, ``sources`` scenes: held strips against the other strips (other groups), half the scenes
    against the other half (other sources), and held strips against their 2 px shifted copies (true copies)."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, make in SCENES.items():
        crops, copies = zip(*(strip_crops(make(rng, SCENE_SIDE), rng) for _ in range(sources)), strict=True)
        crops, copies = torch.stack(crops), torch.stack(copies)  # [sources, STRIPS, per_strip, 3, CROP, CROP]
        rest = [strip for strip in range(STRIPS) if strip not in HELD]
        held = crops[:, list(HELD)].flatten(0, 2)
        others = crops[:, rest].flatten(0, 2)
        half = sources // 2
        rows += [
            _scene_row(name, "other strips (groups)", held, others),
            _scene_row(name, "other scenes", crops[:half].flatten(0, 2), crops[half:].flatten(0, 2)),
            _scene_row(name, "copies shifted 2 px", held, torch.cat([others, copies[:, list(HELD)].flatten(0, 2)])),
        ]
    return pd.DataFrame(rows)


def false_positives(scenes: pd.DataFrame) -> str:
    """One line: the false-positive rate of the scene table's distinct pairs (other strips, other scenes), all
    kinds together and without the identical tiles, before and now."""
    lines = []
    for name, rows in (("all kinds", scenes), ("without identical tiles", scenes[scenes.scene != "identical tiles"])):
        rows = rows[rows["checked against"] != "copies shifted 2 px"]
        queries = int(rows.queries.sum())
        columns = (f"before (>= {leaks.THRESHOLD})", "low-detail", f"flagged (>= {leaks.THRESHOLD}, judged)")
        before, low, now = (float((rows[column] * rows.queries).sum() / queries) for column in columns)
        lines.append(f"{name} ({queries} distinct queries): {before:.1%} flagged before, {now:.1%} now "
                     f"({now / max(1 - low, 1e-9):.1%} of the judged), {low:.1%} left unjudged")
    return "False positives of the distinct pairs: " + "; ".join(lines)


def issue_folder(root: str, seed: int = 0) -> str:
    """The labeled folder of the report: 10 classes, each the crops of one scene (2 gradients, 2 skies, 2 moons,
    2 brick walls, and the 2 scikit-learn photos, centre squares) in STRIPS strips, ``class_<k>/s<j>/<i>.png``."""
    rng = np.random.default_rng(seed)
    scenes = [SCENES[kind](rng, SCENE_SIDE) for kind in ("gradient", "sky", "moon", "brick") for _ in range(2)]
    for photo in load_sample_images().images:
        side = min(photo.shape[:2])
        top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
        scenes.append(np.ascontiguousarray(photo[top : top + side, left : left + side]))
    for k, scene in enumerate(scenes):
        crops, _ = strip_crops(scene, rng, per_strip=20)
        for strip, strip_images in enumerate(crops):
            folder = os.path.join(root, f"class_{k}", f"s{strip}")
            os.makedirs(folder)
            for i, image in enumerate(strip_images):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:02d}.png"))
    return root


def issue_case() -> tuple[dict[str, object], str]:
    """The report's folder through ``load_splits`` with ``data.group_by=level:1``: the rates before (every match at
    the threshold) and now, and the leak check's own lines."""
    with tempfile.TemporaryDirectory() as tmp:
        config = DataConfig(source="folder", path=issue_folder(tmp), image_size=CROP, group_by="level:1")
        splits = load_splits(config)
    queries = torch.cat([splits.val.images, splits.test.images])
    training = splits.ssl_train.images  # eval-train is part of SSL-train here (no data.labeled_path)
    similarity, own = (part.numpy() for part in leaks.nearest_similarity(queries, training))
    row = {"set": "10 scenes x 8 strips, group_by=level:1", "val+test images": len(queries),
           f"before (>= {leaks.THRESHOLD})": float(np.mean(similarity >= leaks.THRESHOLD)), **judged(similarity, own)}
    lines = splits.leaks.describe() + "\n" + (splits.leaks.warning() or "(no warning)")
    return row, lines


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
    scenes = scene_table()
    issue_row, issue_lines = issue_case()
    section = (
        f"## Leak check calibration ({datetime.date.today()}, {machine()})\n\n"
        f"`python -m bench.leak_calibration`. Features at {leaks.WORK} px: the {leaks.WINDOW} px window's "
        f"{leaks.FINE} px cells (RGB), the training images' mean and each window's mean subtracted, L2-normalised; "
        f"a query's windows at every offset up to {leaks.SHIFT // 2} px from the centre, scored against its "
        f"{leaks.CANDIDATES} candidates (coarse {leaks.COARSE} px cells). Shipped threshold: {leaks.THRESHOLD}; "
        f"low-detail (not judged): two of a query's own windows {leaks.APART}+ px apart >= {leaks.LOW_DETAIL}.\n\n"
        f"Pairs ({PAIRS} each, {CROP} px crops of 3 photos): share of pairs at or above each similarity\n\n"
        f"{markdown_table(pair_table())}\n\n"
        "Each val/test image against every SSL-train image (the leak rate at each threshold; the last column "
        "without the candidate stage)\n\n"
        f"{markdown_table(rate_table())}\n\n"
        f"Low-detail and periodic scenes, generated ({len(SCENES)} kinds x 6 scenes of {SCENE_SIDE} px, {STRIPS} "
        f"strips x {STRIP_CROPS} crops of {STRIP_CROP} px at {CROP} px; strips {HELD} of each scene checked): the "
        f"share flagged by the threshold alone (before), left unjudged as low-detail or repetitive (own windows "
        f"{leaks.APART}+ px apart >= {leaks.LOW_DETAIL}), flagged now, and the rate among the judged. Matches across "
        "strips or scenes are false positives; the copies are true ones\n\n"
        f"{markdown_table(scenes)}\n\n{false_positives(scenes)}\n\n"
        "The labeled folder of the report (10 classes, each one scene in 8 strips of 20 crops; 2 gradients, 2 skies, "
        "2 moons, 2 brick walls, scikit-learn's 2 photos), `load_splits` with `data.group_by=level:1`\n\n"
        f"{markdown_table(pd.DataFrame([issue_row]))}\n\n```\n{issue_lines}\n```\n\n"
        f"Time on 10,000 random-ish 32 px images ({times['queries']} val+test, {times['training']} SSL-train; best of "
        f"3, {os.getloadavg()[0]:.1f} load average at the end): `check_leaks` (a sample of {leaks.MAX_QUERIES}) "
        f"{times['check_leaks']:.2f} s, all {times['queries']} val+test images {times['all val+test']:.2f} s\n"
    )
    print(section)
    if not args.print_only:
        append_section(section)


if __name__ == "__main__":
    main()
