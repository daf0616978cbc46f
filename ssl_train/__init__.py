"""ssl_train: faithful BYOL and SwAV training, in one process or under Ray Train.

``from ssl_train import load_config, train`` is the Python entry point; names are
imported on first use so that ``import ssl_train.config`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "ssl_train.config",
    "TrainConfig": "ssl_train.config",
    "load_config": "ssl_train.config",
    "RunOutcome": "ssl_train.training.loop",
    "load_backbone": "ssl_train.training.run",
    "load_embedding_model": "ssl_train.training.run",
    "train": "ssl_train.training.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ssl_train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
