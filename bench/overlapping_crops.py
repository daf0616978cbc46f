"""A labeled image folder whose images are not independent: overlapping crops of a few source "photos".

Each source photo is a mosaic of 3 x 3 scikit-learn digits of one class (8 px each, so 24 px; resized to
``photo_scale`` x ``size``), and its images are ``crops_per_group`` distinct ``size`` x ``size`` crops at random
offsets: neighbouring crops share most of their pixels. The layout is ``class_<k>/<group>/<group>_<i>.png``
with group names ``c<k>g<j>``, so ``data.group_by`` can be ``level:1`` or ``regex:^(?P<group>[^_]+)_``.
Used by the tests of grouped splits and the leak check (``tests/test_groups.py``) and by the benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from sklearn.datasets import load_digits

MOSAIC = 3  # digits per side of a source photo


def mosaic_photos(classes: int, groups_per_class: int, side: int, seed: int) -> list[list[np.ndarray]]:
    """``[class][group]`` grey uint8 ``side`` x ``side`` mosaics; no digit is used twice while the class has unused
    ones (scikit-learn has about 180 per class: 20 photos of 9)."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    photos: list[list[np.ndarray]] = []
    for k in range(classes):
        pool = rng.permutation(np.flatnonzero(digits.target == k % 10))
        need = groups_per_class * MOSAIC**2
        chosen = np.resize(pool, need) if need > len(pool) else pool[:need]
        tiles = grey[chosen].reshape(groups_per_class, MOSAIC, MOSAIC, 8, 8).transpose(0, 1, 3, 2, 4)
        mosaics = torch.from_numpy(tiles.reshape(groups_per_class, 1, MOSAIC * 8, MOSAIC * 8).copy())
        photos.append(list(TF.resize(mosaics, [side, side], antialias=True)[:, 0].numpy()))
    return photos


def write_overlapping_crops(
    root: str | Path, classes: int = 3, groups_per_class: int = 4, crops_per_group: int = 20, size: int = 16,
    seed: int = 0, photo_scale: float = 1.5,
) -> Path:
    """Write ``classes x groups_per_class x crops_per_group`` PNG crops under ``root`` (see the module); returns it.

    A photo is ``round(photo_scale * size)`` px, so crops start at one of ``(photo - size + 1)^2`` offsets; the
    defaults (16 px crops of 24 px photos, 20 of 81 offsets) leave most crops 1-2 px from another one.
    """
    photos = mosaic_photos(classes, groups_per_class, round(photo_scale * size), seed)
    return write_photo_crops(root, photos, crops_per_group, size, seed)


def write_photo_crops(root: str | Path, photos: list[list[np.ndarray]], crops_per_group: int, size: int,
                      seed: int = 0) -> Path:
    """Write ``crops_per_group`` distinct ``size`` px crops of each grey square photo ``photos[class][group]`` as
    ``root/class_<k>/c<k>g<j>/c<k>g<j>_<i>.png``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed + 1)
    for k, group_photos in enumerate(photos):
        for j, photo in enumerate(group_photos):
            photo_side = photo.shape[0]
            offsets = (photo_side - size + 1) ** 2
            if crops_per_group > offsets:
                raise ValueError(f"crops_per_group={crops_per_group}: a {photo_side} px photo has {offsets} "
                                 f"{size} px crops")
            group = f"c{k}g{j}"
            folder = root / f"class_{k}" / group
            folder.mkdir(parents=True, exist_ok=True)
            for i, where in enumerate(rng.choice(offsets, size=crops_per_group, replace=False)):
                y, x = divmod(int(where), photo_side - size + 1)
                Image.fromarray(photo[y : y + size, x : x + size]).save(folder / f"{group}_{i:03d}.png")
    return root
