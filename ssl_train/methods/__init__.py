"""Methods: the contract (:mod:`.base`), BYOL and SwAV, their heads and backbones; the registry by name.

``build_method`` is the one place the train loop looks a method up (``config.method``). Each method module
imports only :class:`~ssl_train.methods.base.SSLMethod`, so there is no import circle.
"""

from __future__ import annotations

from torch import nn

from ssl_train.config import ConfigError, TrainConfig
from ssl_train.methods.base import SSLMethod
from ssl_train.methods.byol import BYOL
from ssl_train.methods.swav import SwAV

METHODS: dict[str, type[SSLMethod]] = {"byol": BYOL, "swav": SwAV}


def build_method(backbone: nn.Module, config: TrainConfig) -> SSLMethod:
    """``config.method`` (BYOL or SwAV) around ``backbone``, which must have a ``feature_dim`` attribute."""
    if config.method not in METHODS:
        raise ConfigError(f"method={config.method!r} is not known; choose one of {sorted(METHODS)}")
    if not hasattr(backbone, "feature_dim"):
        raise TypeError(f"backbone {type(backbone).__name__} needs a 'feature_dim' attribute (its output width)")
    return METHODS[config.method](backbone, config)
