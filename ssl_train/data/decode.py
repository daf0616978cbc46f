"""Decoding: one image file or bytes -> a uint8 RGB tensor; undecoded records -> an ImageSet (unreadable ones
skipped and counted)."""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from tqdm import tqdm

from ssl_train.data.sets import DataError, Decoding, ImageSet

logger = logging.getLogger("ssl_train.data")

# Largest image accepted (16384 x 16384). JPEGs are decoded at 1/2..1/8 scale via draft(), so
# even this size costs little memory; PIL's own decompression-bomb limit is raised to match.
MAX_PIXELS = 16384 * 16384
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
PROGRESS_DELAY_S = 2.0  # a decoding that lasts longer shows a progress bar (on stderr, when it is a terminal)

ImageSource = Union[bytes, str, Path]


def _allow_large_images() -> None:
    """Raise PIL's decompression-bomb limit to MAX_PIXELS (idempotent, so thread-safe in effect)."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def _describe(source: ImageSource) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray)) else f"'{source}'"


def _to_8bit(img: Image.Image) -> Image.Image:
    """Any PIL mode -> L, RGB, or RGBA (when the image has transparency)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        # 16-bit grey (Pillow also opens some 16-bit files as 32-bit "I"): scale 0..65535 -> 0..255.
        values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")
    if img.has_transparency_data:
        return img.convert("RGBA")
    return img if img.mode in ("L", "RGB") else img.convert("RGB")


def decode_image(source: ImageSource, image_size: int) -> torch.Tensor:
    """Encoded image (bytes or a file path) -> uint8 ``[3, S, S]`` RGB.

    The shorter side is resized to S and the centre cropped (one resize of the centre square).
    JPEGs are decoded at reduced scale first; transparency is composited on white; 16-bit images
    are scaled, not clipped, to 8 bits. Raises DataError when the input is not a readable image.
    """
    _allow_large_images()
    where = _describe(source)
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with Image.open(stream) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise DataError(
                    f"image {where} is {width}x{height} = {width * height} pixels, over the limit of {MAX_PIXELS}; "
                    "downscale it before training"
                )
            short = min(width, height)
            img.draft(None, (-(-width * image_size // short), -(-height * image_size // short)))
            ImageOps.exif_transpose(img, in_place=True)
            img = _to_8bit(img)
            width, height = img.size
            short = min(width, height)
            left, top = (width - short) // 2, (height - short) // 2
            fitted = img.resize(
                (image_size, image_size), Image.Resampling.BICUBIC,
                box=(left, top, left + short, top + short), reducing_gap=3.0,
            )
    except DataError:
        raise
    except _DECODE_ERRORS as error:
        raise DataError(f"cannot decode image {where}: {error}") from error
    if fitted.mode == "RGBA":
        fitted = Image.alpha_composite(Image.new("RGBA", fitted.size, "white"), fitted)
    return TF.pil_to_tensor(fitted.convert("RGB"))


@dataclass
class _Records:
    """Images not yet decoded: file paths or bytes (None: an empty parquet cell), labels (-1 = none), groups."""

    sources: list[Optional[ImageSource]]
    names: list[str]
    labels: np.ndarray
    num_classes: int
    where: str
    groups: Optional[np.ndarray] = None  # str, one per record (data.group_by); None = each image its own group
    class_names: list[str] = field(default_factory=list)  # label k is class_names[k]


def _try_decode(source: Optional[ImageSource], image_size: int) -> Union[torch.Tensor, str]:
    if source is None:
        return "empty image cell"
    try:
        return decode_image(source, image_size)
    except DataError as error:
        return str(error)


def _decode_all(sources: Sequence[Optional[ImageSource]], image_size: int) -> Iterator[Union[torch.Tensor, str]]:
    """Each source decoded, or why it could not be, in order (threads: PIL releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        yield from pool.map(partial(_try_decode, image_size=image_size), sources)


def _decode_records(records: _Records, image_size: int, skipped: list[str]) -> ImageSet:
    """Decode every record, with a progress bar after PROGRESS_DELAY_S (on stderr, only when it is a terminal);
    unreadable ones go to ``skipped``. The set's ``decoding`` says how long it took."""
    out = torch.empty((len(records.sources), 3, image_size, image_size), dtype=torch.uint8)
    kept: list[int] = []
    reasons: list[str] = []
    started = time.perf_counter()
    with tqdm(total=len(records.sources), desc=f"decoding {records.where}", unit="img", delay=PROGRESS_DELAY_S,
              disable=None, leave=False) as progress:
        for i, result in enumerate(_decode_all(records.sources, image_size)):
            progress.update()
            if isinstance(result, str):
                skipped.append(records.names[i])
                reasons.append(f"{records.names[i]}: {result}")
            else:
                out[len(kept)] = result
                kept.append(i)
    decoding = Decoding(len(records.sources), time.perf_counter() - started)
    if not kept:
        raise DataError(
            f"none of the {len(records.sources)} images under '{records.where}' could be decoded "
            f"(e.g. {reasons[0]}); check the files are images"
        )
    if reasons:
        logger.warning("skipped %d unreadable images under '%s', e.g. %s", len(reasons), records.where, reasons[0])
    images = out[: len(kept)].clone() if len(kept) < len(out) else out
    groups = None if records.groups is None else records.groups[kept]
    return ImageSet(images, torch.as_tensor(records.labels[kept], dtype=torch.long), groups, decoding)
