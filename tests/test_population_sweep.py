"""A PBT sweep end to end (--searcher pbt): real Ray Tune PBT, a real MLflow store, confirmation of the schedules."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tuning.finish import finish_sweep
from tuning.settings import SweepSettings
from tuning.sweep import run_sweep
from tuning.tracking import CANDIDATE_TAG, EXPLOIT_TAG, SCHEDULE_TAG, STAGE_TAG, SWEEP_TAG, TRIAL_TAG

TINY = [
    "data.source=digits", "data.image_size=8", "optim.batch_size=128", "optim.warmup_epochs=0", "eval.knn_k=20",
    "backbone.width=8", "byol.projector_hidden_dim=64", "byol.predictor_hidden_dim=64", "byol.projector_out_dim=32",
    "optim.epochs=4",
]
SPACE = """
description: test population - the views and the lr, all schedulable
params:
  augment.strength: {uniform: [0.0, 1.5]}
  augment.crop_scale: {choice: [[0.08, 1.0], [0.4, 1.0], [0.7, 1.0]]}
  optim.lr: {loguniform: [5.0e-4, 8.0e-3]}
"""


def runs(client: MlflowClient, stage: str):
    experiment = client.get_experiment_by_name("ssl-tune-test")
    where = f"tags.`{SWEEP_TAG}` = 'pba' and tags.`{STAGE_TAG}` = '{stage}'"
    return client.search_runs([experiment.experiment_id], where)


@pytest.mark.slow  # 4 members x 4 epochs, then 3 configs x 2 seeds: a minute on 2 cores
def test_a_pbt_sweep_learns_schedules_confirms_them_and_resumes_without_rerun(ray_cluster, tmp_path):
    space = tmp_path / "pba.yaml"
    space.write_text(SPACE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = SweepSettings(space=str(space), overrides=TINY, trials=4, concurrency=2, searcher="pbt", perturb_every=1,
                             name="pba", storage=str(tmp_path / "sweeps"), tracking_uri=uri, experiment="ssl-tune-test",
                             seed=1, confirm_top=2, confirm_seeds=2)
    search, confirm = run_sweep(settings)
    # 4 members on 2 slots: each was paused at a perturbation while others waited (the population advances together)
    assert all(r.metrics["iterations_since_restore"] < r.metrics["training_iteration"] == 4 for r in search)
    outcome = finish_sweep(settings, search, confirm)
    client = MlflowClient(uri)
    members = runs(client, "search")
    assert len({run.data.tags[TRIAL_TAG] for run in members}) == len(members) == 4  # every member's run, once
    schedules = {run.data.tags[TRIAL_TAG]: json.loads(run.data.tags[SCHEDULE_TAG]) for run in members}
    exploits = {run.data.tags[TRIAL_TAG]: sorted(key for key in run.data.tags if key.startswith(EXPLOIT_TAG))
                for run in members}
    assert any(exploits.values())  # a perturbation every epoch: the bottom member copied the top one
    for trial, steps in schedules.items():
        assert not steps or exploits[trial], trial  # a schedule comes from copying another member
        assert all(1 <= step["epoch"] <= 3 for step in steps) and all(run.data.params["augment.strength"] == "1.0"
                                                                      for run in members)  # every member starts so
    # Confirmation replays each chosen member's schedule against the start.
    confirmed = runs(client, "confirm")
    chosen = {run.data.tags[CANDIDATE_TAG] for run in confirmed}
    assert "default" in chosen and len(chosen) >= 2
    for run in confirmed:
        candidate = run.data.tags[CANDIDATE_TAG]
        replayed = yaml.safe_load(run.data.params["schedule"])
        assert replayed == ([] if candidate == "default" else schedules[candidate.removeprefix("trial_")])
    winner = client.get_run(outcome.parent_run_id).data.tags["ssl_tune.winner"]
    best = yaml.safe_load(outcome.best_config_path.read_text())
    assert best["schedule"] == ([] if winner == "default" else schedules[winner.removeprefix("trial_")])
    # the winner's schedule, or the best scheduled member's
    assert (outcome.path / "plots" / "schedule.png").is_file() == any(schedules.values())

    again = SweepSettings(name="pba", storage=str(tmp_path / "sweeps"), tracking_uri=uri)
    search, confirm = run_sweep(again, resume=True)
    assert again.searcher == "pbt" and len(search) == 4
    assert len(runs(client, "search")) == 4 and len(runs(client, "confirm")) == len(confirmed)  # nothing re-ran


@pytest.mark.slow  # a driver killed mid-search, then resumed: a minute and a half on 2 cores
def test_a_killed_pbt_sweep_resumes_every_member_once(ray_cluster, tmp_path):
    space = tmp_path / "pba.yaml"
    space.write_text(SPACE)
    db = tmp_path / "mlflow.db"
    command = [sys.executable, "-m", "tuning.cli", "tune", "--searcher", "pbt", "--trials", "4", "--perturb-every",
               "1", "--concurrency", "2", "--space", str(space), "--storage", str(tmp_path / "sweeps"),
               "--tracking-uri", f"sqlite:///{db}", "--experiment", "ssl-tune-test", "--address", ray_cluster.address,
               "--no-confirm", *sum((["--set", o] for o in TINY), [])]
    first = subprocess.Popen([*command, "--name", "pba"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(f"sqlite:///{db}")
    deadline = time.monotonic() + 300
    while not (db.exists() and client.get_experiment_by_name("ssl-tune-test")
               and any(run.data.metrics.get("epoch", 0) >= 2 for run in runs(client, "search"))):
        assert time.monotonic() < deadline and first.poll() is None, "no member reached epoch 2"
        time.sleep(0.5)
    first.kill()
    first.wait(timeout=60)

    resumed = subprocess.run([*command, "--resume", "pba"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    members = runs(client, "search")
    assert len({run.data.tags[TRIAL_TAG] for run in members}) == len(members) == 4
    for run in members:
        assert run.data.tags["ssl_tune.status"] == "finished" and run.data.metrics["epoch"] == 4
        steps = json.loads(run.data.tags[SCHEDULE_TAG])
        assert [step["epoch"] for step in steps] == sorted({step["epoch"] for step in steps})


@pytest.mark.slow  # 4 two-worker members, 4 epochs: three minutes on 2 cores
def test_two_worker_members_continue_their_own_and_copied_train_state(ray_cluster, tmp_path):
    """An elastic-size member runs a TorchTrainer; Tune holds its checkpoints, so PBT can pause and copy it."""
    space = tmp_path / "pba.yaml"
    space.write_text(SPACE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    two_workers = ["scaling.min_workers=2", "scaling.max_workers=2", "scaling.cpus_per_worker=0.4"]
    settings = SweepSettings(space=str(space), overrides=[*TINY, *two_workers], trials=4, concurrency=2,
                             searcher="pbt", perturb_every=1, name="pba", storage=str(tmp_path / "sweeps"),
                             tracking_uri=uri, experiment="ssl-tune-test", seed=1, confirm=False)
    search, _ = run_sweep(settings)
    for result in search:  # paused or copied along the way, yet 4 epochs each: every restart continued
        assert result.metrics["epoch"] == result.metrics["training_iteration"] == 4 and result.metrics["workers"] == 2
        assert result.checkpoint is not None  # Tune's own copy, which PBT may hand to another member
    members = runs(MlflowClient(uri), "search")
    assert len(members) == 4 and all(run.data.tags["ssl_tune.status"] == "finished" for run in members)
    exploits = [(run.data.tags[TRIAL_TAG], value) for run in members
                for key, value in run.data.tags.items() if key.startswith(EXPLOIT_TAG)]
    assert exploits  # a perturbation every epoch: a bottom member copied a top one
    for trial, note in exploits:  # and its next Train run started from the donor's checkpoint
        donor = note.split()[2]
        train_runs = [path.name for path in (tmp_path / "sweeps" / "pba" / f"trial_{trial}" / "ray-train").iterdir()]
        assert any(name.startswith(f"from-trial_{donor}-checkpoint_") for name in train_runs), (note, train_runs)
