"""The MLflow edge for trained models: a backbone logged as an MLflow Model, and found again.

:func:`log_embedding_model` logs :class:`~ssl_train.export.embedding.EmbeddingModel` with MLflow's pytorch
flavour, a signature (uint8 images ``[N, 3, S, S]`` in, float32 embeddings ``[N, D]`` out) and an input
example, next to the run's plain ``backbone.pt`` and ``config.yaml``; ``register=NAME`` makes it a version
of a registered model with the alias ``best``. :func:`fetch_run_files` resolves an MLflow run id or a
``models:/NAME@alias`` / ``models:/NAME/VERSION`` URI to those two files, which
:func:`ssl_train.training.run.load_backbone` loads with ``weights_only=True`` (the flavour's pickle is not needed).
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from torch import nn

from ssl_train.config import TrainConfig
from ssl_train.data import uris
from ssl_train.export.embedding import EmbeddingModel, example_images

MODEL_NAME = "model"  # the MLflow Model's name in its run
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def log_embedding_model(
    tracking_uri: str, run_id: str, backbone: nn.Module, config: TrainConfig, register: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log the backbone as an MLflow Model in run ``run_id``; returns its URI (``models:/NAME/VERSION`` when
    registered, else ``runs:/RUN/model``)."""
    model = EmbeddingModel(backbone.cpu(), config.data.image_size)
    example = example_images(model.image_size)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model, name=MODEL_NAME, signature=signature, input_example=example.numpy(),
            registered_model_name=register, pip_requirements=["torch", "torchvision", "ssl-tune"],
        )
    if register is None:
        return f"runs:/{run_id}/{MODEL_NAME}"
    client = MlflowClient(tracking_uri)
    version = str(info.registered_model_version)
    client.set_registered_model_alias(register, "best", version)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(register, version, key, value)
    return f"models:/{register}/{version}"


def fetch_run_files(source: str, tracking_uri: str | None, folder: Path) -> Path:
    """``config.yaml`` and ``backbone.pt`` of an MLflow run id or a ``models:/`` URI, downloaded into ``folder``.

    A local store that does not exist is refused (MLflow would create an empty one); a run, model or alias
    it does not hold is a LookupError naming ``source`` and the store.
    """
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    if not source.startswith(("models:/", "runs:/")) and not RUN_ID.match(source):
        raise FileNotFoundError(f"'{source}' is not a run directory, an MLflow run id, runs:/ID/model or a "
                                "models:/NAME@alias URI")
    uris.check_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        run_id = source
        if source.startswith("models:/"):
            name, _, ref = source.removeprefix("models:/").partition("@")
            if ref:
                version = client.get_model_version_by_alias(name, ref)
            else:
                name, _, number = name.partition("/")
                version = client.get_model_version(name, number)
            run_id = version.run_id
        elif source.startswith("runs:/"):
            run_id = source.removeprefix("runs:/").partition("/")[0]
        for name in ("config.yaml", "backbone.pt"):
            client.download_artifacts(run_id, name, str(folder))
    except MlflowException as error:
        raise LookupError(f"'{source}': {error.message} in the MLflow store {tracking_uri}") from None
    return folder
