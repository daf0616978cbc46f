"""Sweeps end to end: real Ray Tune + Optuna + ASHA, a real MLflow server, resume without duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ssl_train.cli import main
from ssl_train.config import load_config
from tuning.report import load_report
from tuning.sweep import SweepSettings, finish_sweep, run_sweep
from tuning.tracking import STATUS_TAG, SWEEP_TAG, TRIAL_TAG, TrackingError

TINY = [
    "data.image_size=8", "optim.batch_size=128", "optim.warmup_epochs=0", "eval.knn_k=20", "backbone.width=8",
    "byol.projector_hidden_dim=64", "byol.predictor_hidden_dim=64", "byol.projector_out_dim=32",
]

SPACE = """
description: test space - a sane and an absurd learning rate
fixed:
  method: byol
  optim.optimizer: sgd
  optim.warmup_epochs: 0
params:
  optim.lr: {choice: [0.05, 1.0e+9]}
  augment.strength: {uniform: [0.0, 1.0]}
"""


def children(client: MlflowClient, sweep: str):
    experiment = client.get_experiment_by_name("ssl-tune-test")
    return client.search_runs(
        [experiment.experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{TRIAL_TAG}` != 'sweep'"
    )


@pytest.fixture(scope="module")
def space_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spaces") / "lr_test.yaml"
    path.write_text(SPACE)
    return path


def test_sweep_logs_every_trial_to_a_real_mlflow_server(ray_cluster, mlflow_server, space_file, tmp_path):
    settings = SweepSettings(
        space=str(space_file), overrides=[*TINY, "optim.epochs=3"], trials=5, min_epochs=1, concurrency=2,
        name="logged", storage=str(tmp_path / "sweeps"), tracking_uri=mlflow_server, experiment="ssl-tune-test",
        keep_best=1, seed=3,
    )
    results = run_sweep(settings)
    outcome = finish_sweep(settings, results)
    assert len(results) == 5

    client = MlflowClient(mlflow_server)
    runs = children(client, "logged")
    assert len(runs) == 5  # one child per trial
    parent_id = outcome.parent_run_id
    assert all(run.data.tags["mlflow.parentRunId"] == parent_id for run in runs)
    assert len({run.data.tags[TRIAL_TAG] for run in runs}) == 5

    flat_keys = set(load_config().flat())
    for run in runs:
        assert flat_keys <= set(run.data.params)  # the full config, not only the searched keys
        status = run.data.tags[STATUS_TAG]
        lr = float(run.data.params["optim.lr"])
        if lr > 1:
            assert status == "diverged" and run.data.metrics["objective"] == 0.0
        else:
            assert status in ("finished", "pruned")
            epochs = int(run.data.metrics["epoch"])
            history = client.get_metric_history(run.info.run_id, "knn_acc")
            assert [m.step for m in history] == list(range(1, epochs + 1))
            assert {"loss", "lr", "tau", "embedding_std", "images_per_s", "workers"} <= set(run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "augment_preview.png"} <= artifacts

    parent_artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"best_config.yaml", "trials.csv", "trials.parquet", "plots"} <= parent_artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(parent_id, "plots")}
    assert {"objective_vs_trial.png", "knn_curves_top.png", "parallel_coordinates.png"} <= plots

    best = max(runs, key=lambda r: r.data.metrics.get("objective", 0))
    best_config = load_config(outcome.best_config_path)
    assert best_config.optim.lr == float(best.data.params["optim.lr"]) == 0.05
    assert outcome.best_objective == pytest.approx(best.data.metrics["objective"])
    finished = [r for r in runs if r.data.tags[STATUS_TAG] == "finished"]
    with_weights = [r for r in finished if "backbone.pt" in {a.path for a in client.list_artifacts(r.info.run_id)}]
    assert len(with_weights) == min(1, len(finished))  # keep_best=1
    defaults = [r for r in runs if r.data.tags["ssl_tune.is_default_config"] == "true"]
    assert len(defaults) <= 1

    report = load_report(mlflow_server, "logged", "ssl-tune-test")
    assert list(report.table["objective"]) == sorted(report.table["objective"], reverse=True)
    assert report.best["run_id"] == best.info.run_id


def test_unreachable_tracking_server_fails_before_any_trial(tmp_path):
    settings = SweepSettings(tracking_uri="http://127.0.0.1:9", name="never", storage=str(tmp_path))
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"http://127.0.0.1:9 is not reachable"):
        run_sweep(settings)
    assert not (tmp_path / "never").exists()
    assert time.monotonic() - started < 60


def _sweep_command(tmp_path: Path, address: str, *extra: str) -> list[str]:
    overrides = sum((["--set", o] for o in [*TINY, "optim.epochs=2"]), [])
    return [
        sys.executable, "-m", "ssl_train.cli", "tune", "--trials", "4", "--concurrency", "1", "--min-epochs", "2",
        "--storage", str(tmp_path / "sweeps"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--experiment", "ssl-tune-test", "--address", address, *overrides, *extra,
    ]


def _wait_for_finished_trials(db: Path, sweep: str, count: int, timeout_s: float = 300) -> None:
    client = MlflowClient(f"sqlite:///{db}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if db.exists() and client.get_experiment_by_name("ssl-tune-test"):
            done = [r for r in children(client, sweep) if r.data.tags.get(STATUS_TAG) == "finished"]
            if len(done) >= count:
                return
        time.sleep(2)
    raise AssertionError(f"{count} trials did not finish in {timeout_s} s")


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_interrupted_sweep_resumes_without_rerun_or_duplicates(ray_cluster, tmp_path, stop_signal):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    first = subprocess.Popen(
        _sweep_command(tmp_path, ray_cluster.address, "--name", "crashy"), stdout=log, stderr=subprocess.STDOUT,
        env=env,
    )
    _wait_for_finished_trials(tmp_path / "mlflow.db", "crashy", 1)
    first.send_signal(stop_signal)
    first.wait(timeout=120)
    log.close()
    if stop_signal != signal.SIGKILL:
        assert "ssl-tune tune --resume crashy" in (tmp_path / "first.log").read_text()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    finished_before = {
        r.data.tags[TRIAL_TAG]: r.data.metrics["epoch"] for r in children(client, "crashy")
        if r.data.tags.get(STATUS_TAG) == "finished"
    }
    resumed = subprocess.run(
        _sweep_command(tmp_path, ray_cluster.address, "--resume", "crashy"), capture_output=True, text=True, env=env,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "top trials of crashy" in resumed.stdout

    runs = children(client, "crashy")
    trial_ids = [r.data.tags[TRIAL_TAG] for r in runs]
    assert len(trial_ids) == len(set(trial_ids)) == 4  # the final count is right, no duplicate runs
    for run in runs:
        if run.data.tags[TRIAL_TAG] in finished_before:  # finished trials were not re-run
            history = client.get_metric_history(run.info.run_id, "epoch")
            assert sorted(m.step for m in history) == [1, 2]
    parents = client.search_runs(
        [client.get_experiment_by_name("ssl-tune-test").experiment_id],
        f"tags.`{SWEEP_TAG}` = 'crashy' and tags.`{TRIAL_TAG}` = 'sweep'",
    )
    assert len(parents) == 1


def test_report_command_reads_a_sweep_back(ray_cluster, tmp_path, capsys, space_file):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = SweepSettings(
        space=str(space_file), overrides=[*TINY, "optim.epochs=1"], trials=2, min_epochs=1, name="small",
        storage=str(tmp_path / "sweeps"), tracking_uri=uri, experiment="ssl-tune", seed=1,
    )
    finish_sweep(settings, run_sweep(settings))
    assert main(["report", "small", "--tracking-uri", uri, "--plots", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    assert "sweep small (2 trials)" in printed and "objective" in printed and "optim.lr" in printed
    assert (tmp_path / "plots" / "objective_vs_trial.png").stat().st_size > 1000
    best = yaml.safe_load((tmp_path / "sweeps" / "small" / "best_config.yaml").read_text())
    assert best["method"] == "byol"
