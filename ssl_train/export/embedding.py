"""A trained backbone as the model people use: raw pixels in, embeddings out.

:class:`EmbeddingModel` holds the preprocessing (resize to the training size, the normalisation the
backbone was trained with), so a user feeds uint8 images ``[N, 3, H, W]`` of any size and gets
float32 embeddings ``[N, D]``. It is what the MLflow Model, ``ssl-tune embed`` and ``ssl-tune export``
hold.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ssl_train.augment.recipes import MEAN, STD


class EmbeddingModel(nn.Module):
    """uint8 images ``[N, 3, H, W]`` -> resize to ``image_size`` (bilinear, antialiased) -> normalise ->
    backbone -> embeddings ``[N, D]`` (the backbone in eval mode: BatchNorm uses its running statistics)."""

    def __init__(self, backbone: nn.Module, image_size: int) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.backbone((x - self.mean) / self.std).float().flatten(1)


def example_images(size: int) -> torch.Tensor:
    """A fixed batch of 2 uint8 images ``[2, 3, size, size]``: the MLflow input example and the ONNX trace input."""
    return torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def embed_batches(
    model: nn.Module, images: torch.Tensor, batch_size: int = 256, device: str | torch.device = "cpu",
    progress: bool = False,
) -> Iterator[torch.Tensor]:
    """The embeddings of uint8 ``images`` in batches (on ``device``), as CPU float32 tensors."""
    model = model.to(device).eval()
    batches = images.split(batch_size)
    for batch in tqdm(batches, desc="embedding", unit="batch", disable=not progress):
        yield model(batch.to(device)).cpu()


def export_onnx(model: EmbeddingModel, destination: str | Path) -> Path:
    """The embedding model as ONNX: uint8 ``images [N, 3, S, S]`` (S the training size, N any) -> ``embeddings``.

    Uses torch's exporter (``torch.onnx.export``, which needs the ``onnx`` and ``onnxscript`` packages).
    """
    destination = Path(destination)
    example = example_images(model.image_size)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        torch.onnx.export(model.eval(), (example,), str(destination), input_names=["images"],
                          output_names=["embeddings"], dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
    return destination
