"""The model out of a run: an MLflow Model with a signature in the registry, `ssl-tune embed`, ONNX export."""

from __future__ import annotations

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from test_loop import TINY

from ssl_train.config import load_config
from ssl_train.data import load_images
from ssl_train.evaluation.features import extract_features
from ssl_train.export.embedding import EmbeddingModel
from ssl_train.training.run import load_backbone, load_embedding_model
from tuning.cli import main


@pytest.fixture(scope="module")
def registered_run(tmp_path_factory):
    """One tiny `ssl-tune train --register` run: (run directory, tracking URI)."""
    tmp_path = tmp_path_factory.mktemp("registered")
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = sum((["--set", o] for o in [*TINY, "optim.epochs=1", "optim.warmup_epochs=0"]), [])
    assert main(["train", "--output", str(out), "--tracking-uri", uri, "--register", "digits-byol", *overrides]) == 0
    return out, uri


def _image_folder(root, count: int = 6):
    for k in range(2):
        (root / f"class_{k}").mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (10 + i, 12), (40 * i, 200 * k, 90)).save(root / f"class_{k}" / f"{i}.png")
    (root / "class_0" / "broken.png").write_bytes(b"not a png")
    return root


def test_train_registers_an_mlflow_model_with_a_signature(registered_run):
    out, uri = registered_run
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("digits-byol", "best")
    assert {"val_knn_acc", "test_knn_acc"} <= set(version.tags)
    info = mlflow.models.get_model_info("models:/digits-byol@best")
    (inputs,) = info.signature.inputs.inputs
    assert inputs.type == np.dtype("uint8") and tuple(inputs.shape) == (-1, 3, 8, 8)  # raw pixels in
    (outputs,) = info.signature.outputs.inputs
    assert outputs.type == np.dtype("float32") and outputs.shape[-1] == load_backbone(out).feature_dim
    # The same weights through a run directory, an MLflow run id and the registry alias.
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = EmbeddingModel(load_backbone(out), 8)(x)
    for source in (out, version.run_id, "models:/digits-byol@best"):
        assert torch.equal(load_embedding_model(source, uri)(x), expected)
    # The pytorch flavour serves the same embeddings from raw pixels (its preprocessing inside).
    mlflow.set_tracking_uri(uri)
    served = mlflow.pytorch.load_model("models:/digits-byol@best")(x)
    assert torch.allclose(served, expected, atol=1e-6)


def test_embed_writes_the_backbones_features_and_skips_unreadable_files(registered_run, tmp_path, capsys):
    out, uri = registered_run
    folder = _image_folder(tmp_path / "images")
    target = tmp_path / "emb.parquet"
    assert main(["embed", "models:/digits-byol@best", str(folder), "--out", str(target), "--tracking-uri", uri,
                 "--batch-size", "5"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 12 embeddings" in printed and "skipped 1 unreadable" in printed
    table = pq.read_table(target)
    assert table.num_rows == 12 and table.column("label").to_pylist() == [0] * 6 + [1] * 6
    assert all(path.endswith(".png") and "broken" not in path for path in table.column("path").to_pylist())
    embeddings = torch.tensor(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)))
    images, _, skipped = load_images(str(folder), 8)
    assert len(skipped) == 1
    features = extract_features(load_backbone(out), images.images)  # the evaluation's own feature path
    assert torch.allclose(embeddings, features, atol=1e-5)


def test_onnx_export_matches_pytorch(registered_run, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    out, _ = registered_run
    target = tmp_path / "model.onnx"
    assert main(["export", str(out), "--onnx", str(target)]) == 0
    x = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    (onnx_out,) = onnxruntime.InferenceSession(str(target)).run(None, {"images": x.numpy()})
    expected = load_embedding_model(out)(x).detach().numpy()
    assert onnx_out.shape == expected.shape and np.abs(onnx_out - expected).max() < 1e-4
    assert load_config(out / "config.yaml").data.image_size == 8
