"""The method contract: what the train loop calls on a method, once per step.

A method is a small ``nn.Module`` around a backbone (BYOL: online and target networks, predictor;
SwAV: projection head, prototypes, queue) plus pure loss and target functions in its own module.
The train loop knows it only through :class:`SSLMethod`, as solo-learn's base methods and lightly's
modules keep the step generic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ssl_train.config import TrainConfig


class SSLMethod(nn.Module, ABC):
    """What the train loop calls, once per step, in this order::

        loss, embeddings = method(views, step, epoch)   # forward: the loss of a batch of views
        loss.backward(); method.before_optimizer_step(step)
        optimizer.step(); extras = method.after_optimizer_step(step, total_steps)   # EMA, projections

    ``backbone`` is the encoder f that evaluation and export use.
    """

    backbone: nn.Module

    @abstractmethod
    def forward(self, views: list[torch.Tensor], step: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of one batch of views at global ``step``, and embeddings for the collapse monitor."""

    def before_optimizer_step(self, step: int) -> None:
        """After the backward pass, before the optimiser step (SwAV drops frozen prototypes' gradient)."""

    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        """After the optimiser step (BYOL's EMA, SwAV's renormalisation); returns metrics to report."""
        return {}

    def take_values(self, config: TrainConfig) -> None:
        """Take up the method's schedulable values of ``config`` (``schedule:``) between epochs."""

    def on_resume(self, world_size: int, saved_world_size: int) -> str | None:
        """After a checkpoint is loaded into a group of ``world_size`` workers; returns a note for the log."""
        return None
