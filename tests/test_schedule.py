"""Schedules (``schedule:``): values that change between epochs, replayed exactly and continued on resume."""

import pytest
import torch
import yaml

from ssl_train.augment.recipes import view_recipes
from ssl_train.config import ConfigError, load_config
from ssl_train.data import load_splits
from ssl_train.methods.byol import tau_schedule
from ssl_train.training.checkpoint import latest_checkpoint, load_checkpoint
from ssl_train.training.loop import WorkerContext, train_loop
from ssl_train.training.optim import WarmupCosine
from tuning.report import config_from_params

TINY = [
    "data.image_size=8", "optim.batch_size=128", "eval.knn_k=20", "backbone.width=8", "optim.epochs=4",
    "byol.projector_hidden_dim=64", "byol.predictor_hidden_dim=64", "byol.projector_out_dim=32",
    "optim.warmup_epochs=1", "optim.lr=0.001", "byol.tau_base=0.99", "augment.strength=1.0",
]
STEP = {"optim.lr": 0.004, "augment.strength": 0.25, "augment.flip_p": 0.0, "byol.tau_base": 0.9}


@pytest.fixture(scope="module")
def digits8():
    return load_splits(load_config(overrides=TINY).data)


def scheduled(epoch: int = 2, values: dict | None = None):
    return load_config(overrides=TINY).replace({"schedule": [{"epoch": epoch, "set": values or STEP}]})


def test_at_epoch_applies_the_steps_up_to_that_epoch():
    config = load_config(overrides=TINY).replace({"schedule": [
        {"epoch": 1, "set": {"optim.lr": 0.002}}, {"epoch": 3, "set": {"optim.lr": 0.003, "augment.flip_p": 0.0}}]})
    assert [config.at_epoch(e).optim.lr for e in range(4)] == [0.001, 0.002, 0.002, 0.003]
    assert [config.at_epoch(e).augment.flip_p for e in range(4)] == [0.5, 0.5, 0.5, 0.0]
    assert config.at_epoch(3).schedule == config.schedule


@pytest.mark.parametrize("steps, message", [
    ([{"epoch": 2, "set": {"optim.batch_size": 64}}], "'optim.batch_size' cannot change mid-run"),
    ([{"epoch": 2, "set": {"backbone.width": 16}}], "'backbone.width' cannot change mid-run"),
    ([{"epoch": 2, "set": {"augment.backend": "per_sample"}}], "'augment.backend' cannot change mid-run"),
    ([{"epoch": 4, "set": {"optim.lr": 0.01}}], "schedule[0].epoch=4 is invalid"),
    ([{"epoch": 0, "set": {"optim.lr": 0.01}}], "schedule[0].epoch=0 is invalid"),
    ([{"epoch": 2, "set": {}}, {"epoch": 2, "set": {}}], "schedule[1].epoch=2 is invalid; steps go in increasing"),
    ([{"epoch": 2, "set": {"augment.strength": 3}}], "schedule[0] (from epoch 2): augment.strength=3.0 is invalid"),
    ([{"epoch": 2, "set": {"optim.lrr": 0.1}}], "unknown config key 'optim.lrr'"),
    ([{"epoch": 2, "values": {}}], "unknown config key 'schedule[0].values'"),
])
def test_a_bad_schedule_is_refused_naming_the_step_and_key(steps, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=TINY).replace({"schedule": steps})
    assert message in str(error.value)


def test_a_schedule_survives_yaml_and_mlflow_params(tmp_path):
    config = scheduled()
    assert load_config(config.save(tmp_path / "c.yaml")).schedule == config.schedule
    params = {key: str(value) for key, value in config.flat().items()}  # as MLflow stores them
    assert config_from_params(params).schedule == config.schedule
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["schedule"] == [{"epoch": 2, "set": STEP}]


def _lr_at_end_of(epoch: int, config, steps_per_epoch: int) -> float:
    factor = WarmupCosine(config.optim.warmup_epochs * steps_per_epoch, config.optim.epochs * steps_per_epoch)
    return config.at_epoch(epoch - 1).optim.lr * factor(epoch * steps_per_epoch)


def test_a_scheduled_run_changes_its_values_at_the_breakpoint(digits8):
    config = scheduled(epoch=2)
    outcome = train_loop(config, lambda m, c: None, splits=digits8)
    steps = len(digits8.ssl_train) // config.optim.batch_size
    for metrics in outcome.history:
        assert metrics["lr"] == pytest.approx(_lr_at_end_of(metrics["epoch"], config, steps))
        tau_base = 0.99 if metrics["epoch"] <= 2 else 0.9
        assert metrics["tau"] == pytest.approx(tau_schedule(metrics["epoch"] * steps - 1, 4 * steps, tau_base))
    unscheduled = load_config(overrides=TINY)
    lrs = [m["lr"] / _lr_at_end_of(m["epoch"], unscheduled, steps) for m in outcome.history[:3]]  # the 4th: lr 0
    assert lrs == pytest.approx([1, 1, 4])
    recipes = view_recipes(config.at_epoch(3))
    assert recipes[0].flip_p == 0.0 and recipes != view_recipes(config)


@pytest.mark.parametrize("breakpoint", [2, 3])
def test_a_run_resumed_mid_schedule_continues_it(tmp_path, digits8, breakpoint):
    config = scheduled(epoch=breakpoint)
    straight = train_loop(config, lambda m, c: None, WorkerContext(checkpoint_dir=tmp_path / "a"), splits=digits8)

    def stop_after_two(metrics, _checkpoint):
        if metrics["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_loop(config, stop_after_two, WorkerContext(checkpoint_dir=tmp_path / "b"), splits=digits8)
    resumed = train_loop(config, lambda m, c: None, WorkerContext(checkpoint_dir=tmp_path / "b"),
                         checkpoint=latest_checkpoint(tmp_path / "b"), splits=digits8)
    a, b = load_checkpoint(straight.checkpoint)["method"], load_checkpoint(resumed.checkpoint)["method"]
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert [m["lr"] for m in resumed.history] == [m["lr"] for m in straight.history]


def test_a_copied_state_takes_the_new_values_at_once(tmp_path, digits8):
    """PBT's exploit: another run's checkpoint (its lr in the optimiser and schedule state), then new values."""
    donor = train_loop(load_config(overrides=TINY), lambda m, c: None,
                       WorkerContext(checkpoint_dir=tmp_path / "a", keep_checkpoints=4), splits=digits8)
    assert donor.history[-1]["epoch"] == 4
    two = latest_checkpoint(tmp_path / "a").parent / "epoch_0002"
    copier = scheduled(epoch=2, values={"optim.lr": 0.004})
    outcome = train_loop(copier, lambda m, c: None, checkpoint=two, splits=digits8)
    steps = len(digits8.ssl_train) // copier.optim.batch_size
    assert [m["epoch"] for m in outcome.history][2:] == [3, 4]
    assert outcome.history[2]["lr"] == pytest.approx(_lr_at_end_of(3, copier, steps))
    assert outcome.history[2]["lr"] == pytest.approx(4 * donor.history[2]["lr"])
