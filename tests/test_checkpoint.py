"""Checkpoints: atomic writes, newest-kept rotation, weights_only loading, RNG round trip."""

import os
import pickle

import pytest
import torch

from ssl_train.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_save_load_and_keep_newest(tmp_path):
    for epoch in range(1, 5):
        save_checkpoint({"epoch": epoch, "w": torch.full((2,), float(epoch))}, tmp_path, epoch, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_0003", "epoch_0004"]
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["epoch"] == 4 and torch.equal(state["w"], torch.full((2,), 4.0))


def test_interrupted_write_never_becomes_latest(tmp_path):
    good = save_checkpoint({"epoch": 1}, tmp_path, 1)
    # What a crash mid-write leaves: a staging directory with a truncated file.
    staging = tmp_path / ".tmp-crashed"
    staging.mkdir()
    (staging / "state.pt").write_bytes(b"\x80\x02trunc")
    partial = tmp_path / "epoch_0002"
    partial.mkdir()  # the rename never happened, so no state.pt inside
    assert latest_checkpoint(tmp_path) == good
    assert load_checkpoint(latest_checkpoint(tmp_path))["epoch"] == 1


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loading_refuses_pickled_code(tmp_path):
    target = tmp_path / "epoch_0001"
    target.mkdir()
    with open(target / "state.pt", "wb") as stream:
        pickle.dump({"evil": Payload()}, stream)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(target)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(5)
    save_checkpoint({"rng": rng_state()}, tmp_path, 1)
    expected = torch.rand(3)
    torch.manual_seed(99)
    set_rng_state(load_checkpoint(latest_checkpoint(tmp_path))["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope")


def test_saving_into_an_older_runs_layout_keeps_the_new_checkpoint(tmp_path):
    """A 1-epoch run written where a 3-epoch run left epochs 2 and 3: epoch 1 is what was just written."""
    for epoch in (2, 3):
        save_checkpoint({"run": "old", "epoch": epoch}, tmp_path, epoch, keep=2)
    written = save_checkpoint({"run": "new", "epoch": 1}, tmp_path, 1, keep=2)
    assert load_checkpoint(written) == {"run": "new", "epoch": 1}
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_0001", "epoch_0002", "epoch_0003"]


def test_rotation_compares_epoch_numbers_not_names(tmp_path):
    for epoch in (9998, 9999, 10000, 10001):  # by name, epoch_10000 sorts before epoch_9998
        save_checkpoint({"epoch": epoch}, tmp_path, epoch, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_10000", "epoch_10001"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["epoch"] == 10001


def test_keep_one_leaves_only_the_newest(tmp_path):
    for epoch in range(1, 4):
        save_checkpoint({"epoch": epoch}, tmp_path, epoch, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_0003"]
