"""Optimisers and the learning-rate schedule: SGD, LARS (You et al. 2017, as BYOL/SwAV) or AdamW; warm-up + cosine."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ssl_train.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio, as the official BYOL (optax) and SimCLR code.

    For each parameter w with gradient g: ``u = g + wd * w``;
    ``u <- u * eta * ||w|| / ||u||`` (1 where either norm is 0); ``m <- momentum * m + u``;
    ``w <- w - lr * m``. Groups with ``lars_exclude=True`` (biases, norm layers) skip both the
    weight decay and the trust ratio (BYOL paper, Appendix C.1).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 1e-3,
        lars_exclude: bool = False,
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay} or eta={eta}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "lars_exclude": lars_exclude,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if not group["lars_exclude"]:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(param)
                    update_norm = torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0), group["eta"] * param_norm / update_norm, 1.0
                    )
                    update = update * trust
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                param.add_(buffer, alpha=-group["lr"])
        return loss


def base_lr(config: OptimConfig) -> float:
    """``optim.lr``, times ``batch_size / 256`` when ``scale_lr_by_batch`` (the BYOL/SimCLR rule)."""
    return config.lr * config.batch_size / 256 if config.scale_lr_by_batch else config.lr


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """``optim.optimizer`` over the trainable parameters of ``model``.

    With ``exclude_bias_and_norm``, 1-d parameters (biases, BatchNorm/LayerNorm weights) form a
    group with no weight decay, flagged ``lars_exclude`` (no LARS adaptation either).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if config.exclude_bias_and_norm:
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay, "lars_exclude": False},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True},
        ]
    else:
        groups = [{"params": params, "weight_decay": config.weight_decay, "lars_exclude": False}]
    groups = [group for group in groups if group["params"]]
    lr = base_lr(config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    if config.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=config.momentum)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optim.optimizer={config.optimizer!r} is not known; choose one of sgd, lars, adamw")


class WarmupCosine:
    """lr factor at optimiser step k, for start factor s and final factor f (both relative to the base lr):
    ``s + (1 - s) k / W`` for k < W, then ``f + (1 - f) (1 + cos(pi (k - W) / (T - W))) / 2``, f from T on.

    With s = f = 0 this is the official BYOL schedule (``schedules.learning_schedule``); SwAV's
    ``main_swav.py`` warms up from ``start_warmup`` and decays to ``final_lr``. A class, not a
    lambda, so ``LambdaLR.state_dict`` saves it.
    """

    def __init__(self, warmup_steps: int, total_steps: int, start: float = 0.0, final: float = 0.0) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.start = start
        self.final = final

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start + (1.0 - self.start) * step / self.warmup_steps
        if step >= self.total_steps:
            return self.final
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_epochs`` from ``warmup_start_lr`` to the base lr, then cosine decay to
    ``final_lr`` at ``epochs`` (both 0 by default: BYOL's schedule)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
    base = base_lr(config)
    schedule = WarmupCosine(config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch,
                            start=config.warmup_start_lr / base, final=config.final_lr / base)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
