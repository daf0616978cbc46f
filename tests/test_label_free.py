"""No labels needed: RankMe (Garrido et al. 2023, eq. 1), unlabeled data, and sweeps that select by RankMe.

RankMe(Z) = exp(-sum_k p_k log p_k), p_k = sigma_k / ||sigma||_1 + eps, sigma the singular values of Z.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from test_tune import TINY, children

from ssl_train.config import DataConfig, load_config
from ssl_train.data import folder_to_parquet, load_splits
from ssl_train.evaluation.label_free import RANKME_SAMPLES, effective_rank, rankme_sample
from ssl_train.training.run import train
from tuning.cli import main
from tuning.confirm import Confirmation, metric_on_test
from tuning.tracking import LABELS_TAG, NO_LABELS, STATUS_TAG

SPACE = """
description: test space - BYOL, two sane learning rates
fixed:
  method: byol
  optim.optimizer: sgd
  optim.warmup_epochs: 0
params:
  optim.lr: {choice: [0.03, 0.1]}
  augment.strength: {uniform: [0.0, 1.0]}
"""
CROSS_METHOD = SPACE.replace("  method: byol\n", "").replace("params:\n", "params:\n  method: {choice: [byol, swav]}\n")


# ---------------------------------------------------------------- the formula


def _with_singular_values(values: list[float], rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """A ``rows x columns`` matrix U diag(values) V^T, U and V random orthonormal: singular values ``values``."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, len(values), generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(columns, len(values), generator=generator, dtype=torch.float64))[0]
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("r", [1, 3, 10, 32])
def test_r_equal_nonzero_singular_values_give_rank_r(r):
    """p_k = 1/r + eps for the r non-zero values and eps for the others: exp(H) = r up to eps log eps terms."""
    z = _with_singular_values([2.5] * r, rows=200, columns=64)
    eps = 1e-7
    p = np.array([1 / r + eps] * r + [eps] * (64 - r))
    by_hand = math.exp(-(p * np.log(p)).sum())
    assert effective_rank(z) == pytest.approx(by_hand, rel=1e-6)
    assert effective_rank(z) == pytest.approx(r, rel=1e-4, abs=1e-3)  # the eps terms move it by < 1e-4 r + 1e-4


def test_unequal_singular_values_by_hand():
    # sigma = (4, 2, 2): p = (1/2, 1/4, 1/4), H = 1/2 ln 2 + 2 * 1/4 ln 4 = 3/2 ln 2, exp(H) = 2^1.5 = 2.8284
    z = _with_singular_values([4.0, 2.0, 2.0], rows=50, columns=20)
    assert effective_rank(z) == pytest.approx(2**1.5, abs=1e-3)  # 17 zero values add eps terms of ~3e-5
    assert effective_rank(3.0 * z) == pytest.approx(effective_rank(z), rel=1e-9)  # scale-free


@pytest.mark.parametrize(("rows", "columns"), [(20000, 64), (60, 1000)])
def test_a_large_isotropic_gaussian_sample_has_nearly_full_rank(rows, columns):
    """Singular values of an N x D Gaussian lie near sqrt(N) +- sqrt(D): nearly equal, RankMe near min(N, D)."""
    z = torch.randn(rows, columns, generator=torch.Generator().manual_seed(0))
    full = min(rows, columns)
    assert 0.95 * full < effective_rank(z) <= full


def test_the_rankme_sample_is_fixed_and_bounded():
    assert torch.equal(rankme_sample(300), torch.arange(300))
    sample = rankme_sample(10_000)
    assert len(sample) == RANKME_SAMPLES == len(set(sample.tolist())) and bool((sample.diff() > 0).all())
    assert torch.equal(sample, rankme_sample(10_000)) and int(sample.max()) > 9000  # the same images, spread out


# ---------------------------------------------------------------- unlabeled data


def write_unlabeled_folder(root: Path, count: int = 200, groups: int = 10, size: int = 12) -> Path:
    """``root/g<k>_<i>.png``: a flat folder (no class sub-folders) of blobs on noise, group k every ``groups``-th."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        y, x = rng.integers(0, size - 4, 2)
        pixels[y : y + 4, x : x + 4] = rng.integers(120, 255, 3, dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"g{i % groups}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory) -> Path:
    return write_unlabeled_folder(tmp_path_factory.mktemp("unlabeled") / "images")


def test_an_unlabeled_folder_or_parquet_holds_out_a_val_sample_and_no_test(unlabeled, tmp_path):
    config = DataConfig(source="folder", path=str(unlabeled), image_size=8)
    splits = load_splits(config)
    assert not splits.labeled and splits.num_classes == 0 and splits.eval_train is None and splits.test is None
    assert len(splits.val) == 40 and len(splits.ssl_train) == 160  # data.val_fraction=0.2 of the 200 images
    summary = splits.summary()
    assert "no labels: no accuracy can be measured" in summary and "0.0% of the 40 judged val images" in summary
    parquet = folder_to_parquet(unlabeled, tmp_path / "unlabeled.parquet")
    assert parquet == 200 and pq.read_table(tmp_path / "unlabeled.parquet").column("label").null_count == 200
    from_parquet = load_splits(DataConfig(source="parquet", path=str(tmp_path / "unlabeled.parquet"), image_size=8))
    assert torch.equal(from_parquet.val.images, splits.val.images) and from_parquet.test is None

    grouped = load_splits(DataConfig(source="folder", path=str(unlabeled), image_size=8,
                                     group_by=r"regex:^(?P<group>g\d+)_"))
    assert not set(grouped.val.groups) & set(grouped.ssl_train.groups) and len(set(grouped.val.groups)) == 2
    assert "groups: 8 SSL-train, 2 val" in grouped.summary()


def test_training_without_labels_reports_rankme_and_never_a_test_metric(unlabeled, tmp_path):
    config = load_config(overrides=["data.source=folder", f"data.path={unlabeled}", "data.image_size=8",
                                    "optim.epochs=2", "optim.batch_size=64", "optim.warmup_epochs=0",
                                    "backbone.width=8", "eval.linear_probe=true", f"output_dir={tmp_path / 'run'}"])
    assert config.eval.test_at_end
    outcome = train(config)
    assert outcome.status == "finished" and outcome.backbone_path.exists()
    for epoch in outcome.history:
        assert 1.0 <= epoch["val_rankme"] <= 40  # at most the 40 val images
        assert not [key for key in epoch if key.startswith("test_") or "knn" in key or "linear" in key]


# ---------------------------------------------------------------- confirmation


def _confirmation_runs(tests: list[float | None]) -> pd.DataFrame:
    """trial_a has the higher val RankMe, the default the higher test accuracy (when there is one)."""
    return pd.DataFrame([
        {"candidate": name, "seed": seed, "val": val + seed, "test": test, "status": "finished"}
        for name, val, test in (("trial_a", 40.0, tests[0]), ("default", 30.0, tests[1])) for seed in range(3)
    ])


def test_confirmation_by_rankme_picks_on_val_and_reads_knn_accuracy_on_test_when_there_are_labels():
    assert metric_on_test("rankme") == "knn_acc" and metric_on_test("linear_acc") == "linear_acc"
    with_labels = Confirmation(_confirmation_runs([0.80, 0.90]), "rankme")
    assert with_labels.accuracy_measured and with_labels.winner == "trial_a"  # by val RankMe, never by test
    assert with_labels.margin().difference == pytest.approx(-0.10)
    text = with_labels.format({})
    assert "winner (best mean val rankme): trial_a; margin over the default on test knn_acc: -0.1000" in text
    assert "val_rankme_mean" in text and "test_knn_acc_mean" in text


def test_confirmation_without_labels_reports_rankme_and_says_no_accuracy_was_measured():
    without = Confirmation(_confirmation_runs([None, None]), "rankme")
    assert not without.accuracy_measured and without.winner == "trial_a" and without.margin() is None
    text = without.format({})
    assert "winner (best mean val rankme): trial_a, rankme 41.00 ± 1.00 over 3 seeds" in text
    assert "no accuracy was measured" in text and "test" not in without.table()


# ---------------------------------------------------------------- sweeps


def _tune(tmp_path: Path, space: Path, *extra: str) -> list[str]:
    return ["tune", "--space", str(space), "--objective", "rankme", "--storage", str(tmp_path / "sweeps"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", "ssl-tune-test", *extra]


def test_a_space_that_searches_the_method_is_refused_with_rankme(tmp_path, capsys):
    space = tmp_path / "both_methods.yaml"
    space.write_text(CROSS_METHOD)
    assert main(_tune(tmp_path, space, "--name", "mixed")) == 2
    error = capsys.readouterr().err
    assert f"{space}: method: searched over ['byol', 'swav']" in error and "--objective rankme" in error
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()  # refused before anything


def test_an_accuracy_objective_on_unlabeled_data_is_refused_before_ray(unlabeled, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    command = _tune(tmp_path, space, "--name", "nolabels", "--set", "data.source=folder", "--set",
                    f"data.path={unlabeled}")
    command[command.index("rankme")] = "knn_acc"
    assert main(command) == 2
    assert "--objective knn_acc needs labels" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


def test_an_unlabeled_folder_sweeps_and_confirms_by_rankme_chosen_by_auto_without_a_test_metric(
    ray_cluster, unlabeled, tmp_path, capsys
):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    overrides = sum((["--set", o] for o in [*TINY, "optim.batch_size=64", "data.source=folder",
                                            f"data.path={unlabeled}"]), [])
    command = _tune(tmp_path, space, "--name", "unlabeled", "--trials", "3", "--epochs", "2", "--scheduler", "none",
                    "--concurrency", "2", "--confirm-top", "1", "--confirm-seeds", "2", "--address",
                    ray_cluster.address, *overrides)
    command[command.index("rankme")] = "auto"
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "no labels: no accuracy can be measured" in printed  # the data summary
    assert "objective: val rankme (--objective auto, for data without labels)" in printed
    assert "val rankme at last epoch" in printed
    assert "confirmation by val rankme (no labels: no accuracy was measured)" in printed
    assert "no accuracy was measured: the data has no labels" in printed and "margin" not in printed

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    search, confirmed = children(client, "unlabeled"), children(client, "unlabeled", stage="confirm")
    assert len(search) == 3 and len(confirmed) == 2 * 2
    for run in search:
        if run.data.tags[STATUS_TAG] in ("finished", "pruned"):  # the searcher saw val RankMe
            assert run.data.metrics["objective"] == run.data.metrics["val_rankme"] >= 1.0
    for run in confirmed:
        assert run.data.params["eval.test_at_end"] == "True" and run.data.metrics["val_rankme"] >= 1.0
    parent = client.get_run(search[0].data.tags["mlflow.parentRunId"])
    assert parent.data.tags[LABELS_TAG] == NO_LABELS and parent.data.tags["ssl_tune.winner"]
    assert "winner_val_rankme" in parent.data.metrics
    for run in [*search, *confirmed, parent]:  # no test metric, ever
        assert not [key for key in run.data.metrics if key.startswith("test_")], run.data.metrics


@pytest.mark.parametrize("objective", ["alpha_req", "rotation"])
def test_an_unlabeled_folder_sweeps_by_each_label_free_objective(ray_cluster, unlabeled, tmp_path, capsys, objective):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    overrides = sum((["--set", o] for o in [*TINY, "optim.batch_size=64", "data.source=folder",
                                            f"data.path={unlabeled}"]), [])
    command = _tune(tmp_path, space, "--name", objective, "--trials", "2", "--epochs", "1", "--scheduler", "none",
                    "--concurrency", "2", "--no-confirm", "--address", ray_cluster.address, *overrides)
    command[command.index("rankme")] = objective
    assert main(command) == 0
    assert f"val {objective} at last epoch" in capsys.readouterr().out
    search = children(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), objective)
    assert len(search) == 2
    for run in search:
        assert run.data.metrics["objective"] == run.data.metrics[f"val_{objective}"]
        assert f"val_{objective}_se" in run.data.metrics or objective == "rotation"
    if objective == "rotation":
        assert all(0.0 <= run.data.metrics["val_rotation"] <= 1.0 for run in search)
