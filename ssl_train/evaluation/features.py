"""Frozen features: a backbone's features of uint8 images, and the shape check every score shares."""

from __future__ import annotations

import torch
from torch import nn

from ssl_train.augment.recipes import normalize_batch


@torch.no_grad()
def extract_features(
    backbone: nn.Module, images: torch.Tensor, batch_size: int = 256, device: torch.device | str = "cpu",
    bf16: bool = False,
) -> torch.Tensor:
    """Backbone features of uint8 images ``[N, 3, S, S]`` as float32 ``[N, D]`` on the CPU.

    The backbone (already on ``device``) runs in eval mode, so BatchNorm uses its running
    statistics; its previous train/eval mode is restored afterwards. ``bf16``: under bf16 autocast, as the
    training step runs where bf16 is native (twice as fast on such a CPU; the features' cosine with float32's
    rounds to 1.0000). Batches go in channels-last (NHWC), 256 at a time: on a 2-core CPU in float32 that halves the
    time to extract the features of the demo's 3,500 evaluated images against contiguous batches of 512 (0.21 s
    against 0.38-0.43 s; a whole evaluation 1.6x faster, bench/RESULTS.md "Objective rank").
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            chunks = [
                backbone(normalize_batch(batch.to(device)).contiguous(memory_format=torch.channels_last))
                .float().flatten(1).cpu()
                for batch in images.split(batch_size)
            ]
    finally:
        backbone.train(was_training)
    return torch.cat(chunks)


def check_pair(features: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if features.dim() != 2 or labels.dim() != 1 or len(features) != len(labels):
        raise ValueError(
            f"{name}: features must be [N, D] and labels [N], got {list(features.shape)} and {list(labels.shape)}"
        )
