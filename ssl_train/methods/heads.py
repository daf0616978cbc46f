"""The heads the methods put on the encoder: BYOL's projector g and predictor q, SwAV's projection head
and prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class Prototypes(nn.Linear):
    """SwAV's K prototype vectors c_k, the rows of ``weight``: scores ``z . c_k`` (Caron et al. 2020, Sec. 3.1).

    Kept on the unit sphere after every step (:meth:`normalize_`), and frozen for the first
    ``frozen_steps`` optimiser steps (the paper: the first epoch), by dropping their gradient.
    """

    def __init__(self, dim: int, count: int, frozen_steps: int) -> None:
        super().__init__(dim, count, bias=False)
        self.frozen_steps = frozen_steps
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def drop_grad_while_frozen(self, step: int) -> None:
        if step < self.frozen_steps:
            self.weight.grad = None
