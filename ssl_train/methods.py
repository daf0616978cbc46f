"""The SSL methods by name (``config.method``): the one place the train loop looks them up."""

from __future__ import annotations

from torch import nn

from ssl_train.byol import BYOL
from ssl_train.config import ConfigError, TrainConfig
from ssl_train.swav import SwAV

METHODS: dict[str, type[nn.Module]] = {"byol": BYOL, "swav": SwAV}


def build_method(backbone: nn.Module, config: TrainConfig) -> nn.Module:
    """``config.method`` (BYOL or SwAV) around ``backbone``, which must have a ``feature_dim`` attribute."""
    if config.method not in METHODS:
        raise ConfigError(f"method={config.method!r} is not known; choose one of {sorted(METHODS)}")
    if not hasattr(backbone, "feature_dim"):
        raise TypeError(f"backbone {type(backbone).__name__} needs a 'feature_dim' attribute (its output width)")
    return METHODS[config.method](backbone, config)
