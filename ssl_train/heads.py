"""The MLP heads the methods put on the encoder: BYOL's projector g and predictor q, SwAV's projection head."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear - BatchNorm - ReLU - Linear, no BatchNorm after the last layer.

    BYOL's g and q (Grill et al. 2020, Sec. 3.3: 2048 -> 4096 -> 256) and SwAV's
    projection head (Caron et al. 2020: 2048 -> 2048 -> 128) have this shape.
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )
