"""BYOL (Grill et al. 2020, arXiv 2006.07733): an online network predicts a slow-moving target's projection.

Online: encoder f, projector g, predictor q (parameters theta, trained). Target: f' and g'
(parameters xi), never trained by gradient; after each optimiser step
``xi <- tau * xi + (1 - tau) * theta`` with tau on a cosine schedule from ``tau_base`` to 1.

Choices, following the official JAX code (``byol_experiment.py``) and solo-learn:
- each view goes through the networks on its own, so BatchNorm statistics never mix views;
- the target runs in training mode (batch statistics), and the EMA moves parameters only:
  the target's BatchNorm running statistics are its own, updated by its own forward passes.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_train.config import TrainConfig
from ssl_train.methods.base import SSLMethod
from ssl_train.methods.heads import mlp


def tau_schedule(step: int, total_steps: int, tau_base: float) -> float:
    """``tau = 1 - (1 - tau_base) * (cos(pi * k / K) + 1) / 2``: tau_base at k = 0, 1 at k = K (paper Sec. 3.2)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be > 0")
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """In place, for every parameter pair: ``xi <- tau * xi + (1 - tau) * theta`` (paper eq. 1).

    Buffers (BatchNorm running statistics) are left alone, as in the official code.
    """
    target_params, online_params = list(target.parameters()), list(online.parameters())
    if len(target_params) != len(online_params) or any(
        t.shape != o.shape for t, o in zip(target_params, online_params, strict=True)
    ):
        raise ValueError("target and online networks must have the same architecture for the EMA update")
    torch._foreach_mul_(target_params, tau)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - tau)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(p, z)`` averaged over the batch; z is detached (stop-gradient, paper eq. 2)."""
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.detach().float(), dim=-1)
    return (2.0 - 2.0 * (p * z).sum(dim=-1)).mean()


class BYOL(SSLMethod):
    """Online f, g, q and target f', g' around ``backbone``; the loss is symmetrised over the two views."""

    def __init__(self, backbone: nn.Module, config: TrainConfig) -> None:
        super().__init__()
        cfg = config.byol
        self.tau_base = cfg.tau_base
        self.backbone = backbone
        self.projector = mlp(backbone.feature_dim, cfg.projector_hidden_dim, cfg.projector_out_dim)
        self.predictor = mlp(cfg.projector_out_dim, cfg.predictor_hidden_dim, cfg.projector_out_dim)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, views: list[torch.Tensor], step: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``L = l(q(g(f(v1))), g'(f'(v2))) + l(q(g(f(v2))), g'(f'(v1)))``; also the normalised z of view 1."""
        if len(views) != 2:
            raise ValueError(f"BYOL compares exactly 2 views, got {len(views)}; set augment.num_local_crops=0 for byol")
        online = [self.projector(self.backbone(view)) for view in views]
        with torch.no_grad():
            target = [self.target_projector(self.target_backbone(view)) for view in views]
        loss = byol_loss(self.predictor(online[0]), target[1]) + byol_loss(self.predictor(online[1]), target[0])
        return loss, F.normalize(online[0].detach().float(), dim=-1)

    def take_values(self, config: TrainConfig) -> None:
        self.tau_base = config.byol.tau_base

    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        """EMA of the target towards the online network with ``tau(step)``."""
        tau = tau_schedule(step, total_steps, self.tau_base)
        ema_update_(self.target_backbone, self.backbone, tau)
        ema_update_(self.target_projector, self.projector, tau)
        return {"tau": tau}
