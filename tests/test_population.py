"""The PBT search mode's pure parts (tuning/population.py): what it may search, how it explores, a member's lineage
as a schedule, its MLflow tags, candidates and words."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
from ray.tune.search.sample import Float, Integer

from search_spaces import load_space
from search_spaces.loader import SearchSpaceError
from ssl_train.config import ConfigError, load_config
from tuning.confirm import DEFAULT_CANDIDATE, candidates
from tuning.population import (
    EXPLOIT,
    SCHEDULE,
    build_pbt,
    check_schedulable,
    clip_to_space,
    continue_lineage,
    donor_of,
    mutations,
    plot_schedule,
    population_space,
)
from tuning.report import recipe_change
from tuning.settings import SweepSettings, check_settings
from tuning.tracking import member_tags

KEYS = ["augment.strength", "augment.crop_scale", "optim.lr"]
SPACE = """
params:
  augment.strength: {uniform: [0.0, 1.5]}
  augment.crop_scale: {choice: [[0.08, 1.0], [0.4, 1.0], [0.7, 1.0]]}
  optim.lr: {loguniform: [5.0e-4, 8.0e-3]}
  augment.num_local_crops: {int: [0, 4]}
"""


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "pbt.yaml"
    path.write_text(SPACE.replace("  augment.num_local_crops: {int: [0, 4]}\n", ""))
    return load_space(path)


def test_a_knob_that_cannot_change_mid_run_is_refused_naming_file_and_key(tmp_path):
    for line, key in (("optim.batch_size: {choice: [64, 128]}", "optim.batch_size"),
                      ("backbone.width: {choice: [8, 16]}", "backbone.width"),
                      ("augment.num_local_crops: {int: [0, 4]}", "augment.num_local_crops")):
        path = tmp_path / "bad.yaml"
        path.write_text(f"params:\n  optim.lr: {{loguniform: [1.0e-3, 1.0e-2]}}\n  {line}\n")
        with pytest.raises(SearchSpaceError) as error:
            check_schedulable(load_space(path))
        assert f"{path}: {key}: cannot change mid-run" in str(error.value) and "--searcher tpe" in str(error.value)
    check_schedulable(load_space("adapt"))  # the demo's space: every knob can change between epochs
    path = tmp_path / "conditional.yaml"
    epsilon = "swav.epsilon: {uniform: [0.01, 0.1], when: {method: swav}}"
    path.write_text(f"params:\n  method: {{choice: [byol, swav]}}\n  {epsilon}\n")
    with pytest.raises(SearchSpaceError, match="method: cannot change mid-run"):
        check_schedulable(load_space(path))
    path.write_text(f"fixed:\n  method: swav\nparams:\n  {epsilon}\n")
    with pytest.raises(SearchSpaceError, match="swav.epsilon: --searcher pbt explores every knob at once and has no "
                                               "conditions"):
        check_schedulable(load_space(path))


def test_the_sweep_refuses_a_population_it_cannot_run(space, tmp_path):
    base = dict(space=space.source, overrides=["optim.epochs=4"], searcher="pbt", storage=str(tmp_path))
    for settings, message in (
        (SweepSettings(**base, trials=3), "--trials 3: --searcher pbt needs a population of at least 4"),
        (SweepSettings(**base, trials=4, perturb_every=4), "--perturb-every 4: a member trains 4 epochs"),
        (SweepSettings(**base, trials=4, perturb_every=0), "--perturb-every 0 is invalid; it must be >= 1"),
    ):
        with pytest.raises(ConfigError) as error:
            check_settings(settings, resume=False)
        assert message in str(error.value)
    settings = SweepSettings(**{**base, "overrides": ["optim.epochs=6"]}, trials=4)
    check_settings(settings, resume=False)
    assert settings.perturb_every == 2  # a quarter of 6 epochs, rounded up


def test_mutations_and_clipping_stay_inside_the_space(space):
    domains = mutations(space)
    assert isinstance(domains["augment.strength"], Float) and isinstance(domains["optim.lr"], Float)
    assert domains["augment.crop_scale"] == [[0.08, 1.0], [0.4, 1.0], [0.7, 1.0]]  # in order: a shift is a neighbour
    clip = clip_to_space(space)
    assert clip({"augment.strength": 1.8, "optim.lr": 1e-4, "augment.crop_scale": [0.4, 1.0]}) == {
        "augment.strength": 1.5, "optim.lr": 5e-4, "augment.crop_scale": [0.4, 1.0]}
    random.seed(0)
    start = {"augment.strength": 1.0, "augment.crop_scale": [0.08, 1.0], "optim.lr": 0.002}
    members = population_space(space, start, members=4, base_seed=7)
    assert members["seed"] == {"grid_search": [7, 8, 9, 10]}
    assert {key: members[key] for key in KEYS} == start


def test_int_knobs_become_tune_integers(tmp_path):
    path = tmp_path / "ints.yaml"
    path.write_text("params:\n  swav.temperature: {uniform: [0.05, 0.2]}\n")
    assert isinstance(mutations(load_space(path))["swav.temperature"], Float)
    path.write_text("params:\n  seed: {int: [0, 9]}\n")
    domain = mutations(load_space(path))["seed"]
    assert isinstance(domain, Integer) and (domain.lower, domain.upper) == (0, 10)  # randint's upper is exclusive


def _config(**values):
    return load_config(overrides={"optim.epochs": 6, **values})


def test_a_lineage_records_a_step_only_where_values_change():
    start = _config()
    same = continue_lineage(start, _config(seed=3), epoch=2, keys=KEYS)
    assert same.schedule == [] and same.seed == 3  # copied, nothing explored: the start's values go on

    copied = continue_lineage(start, _config(**{"augment.strength": 0.5, "optim.lr": 0.002}), epoch=2, keys=KEYS)
    assert [vars(step) for step in copied.schedule] == [{"epoch": 2, "set": {"augment.strength": 0.5}}]
    assert copied.augment.strength == 1.0 and copied.at_epoch(2).augment.strength == 0.5  # start, then the step

    # A member copies that one at epoch 4, with the strength it had and a new crop: the earlier step stays.
    later = continue_lineage(copied, _config(**{"augment.strength": 0.5, "augment.crop_scale": [0.7, 1.0]}),
                             epoch=4, keys=KEYS)
    assert [vars(step) for step in later.schedule] == [
        {"epoch": 2, "set": {"augment.strength": 0.5}}, {"epoch": 4, "set": {"augment.crop_scale": [0.7, 1.0]}}]
    assert [later.at_epoch(e).augment.strength for e in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5]

    # A copy at the epoch of the donor's own last step replaces that step: from then on, the new values.
    again = continue_lineage(later, _config(**{"augment.strength": 0.8}), epoch=4, keys=KEYS)
    assert [vars(step) for step in again.schedule] == [
        {"epoch": 2, "set": {"augment.strength": 0.5}}, {"epoch": 4, "set": {"augment.strength": 0.8}}]


def test_the_donor_is_read_from_the_checkpoint_path():
    assert donor_of("/runs/sweeps/s/trial_ab12c_00003/checkpoint_000004") == "ab12c_00003"
    assert donor_of("bucket/s/trial_ab12c_00000/checkpoint_000001") == "ab12c_00000"


def test_a_member_result_becomes_mlflow_tags():
    steps = [{"epoch": 2, "set": {"augment.strength": 0.5}}]
    result = {SCHEDULE: json.dumps(steps), EXPLOIT: json.dumps({"from": "x_00001", "epoch": 2, "set": steps[0]["set"]})}
    assert member_tags(result) == {
        "ssl_tune.schedule": json.dumps(steps),
        "ssl_tune.exploit.epoch002": "copied trial x_00001 at epoch 2; set augment.strength=0.5"}
    assert member_tags({"objective": 0.5}) == {}


def test_candidates_of_a_population_carry_their_schedule_and_skip_the_unscheduled(space):
    steps = [{"epoch": 2, "set": {"augment.strength": 0.5}}]
    start = {"augment.strength": 1.0, "augment.crop_scale": [0.4, 1.0], "optim.lr": 0.002}
    table = pd.DataFrame([
        {"trial": "a", "status": "finished", "is_default": False, **start, "schedule": []},
        {"trial": "b", "status": "finished", "is_default": False, **start, "schedule": steps},
    ])
    chosen = candidates(table, space, top_k=2)
    assert list(chosen) == [DEFAULT_CANDIDATE, "trial_b"]  # a trained the start's values throughout
    assert chosen["trial_b"]["schedule"] == steps
    config = _config().replace(chosen["trial_b"])
    assert config.at_epoch(1).augment.strength == 1.0 and config.at_epoch(2).augment.strength == 0.5


def test_a_schedule_in_words_and_as_a_plot(tmp_path):
    start = _config(**{"augment.flip_p": 0.5})
    winner = start.replace({"schedule": [{"epoch": 2, "set": {"augment.flip_p": 0.0}},
                                         {"epoch": 4, "set": {"optim.lr": 0.004}}]})
    assert recipe_change(start, winner, ["augment.flip_p", "optim.lr"]) == (
        "after epoch 2: flips off, after epoch 4: lr 0.004 instead of 0.002")
    path = plot_schedule(winner, ["augment.flip_p", "optim.lr", "augment.strength"], tmp_path / "s.png")
    assert path.stat().st_size > 1000


def test_no_member_is_exploited_at_its_last_epoch(space):
    """Copied weights at the last epoch would train no further: the member would end on another's checkpoint with
    a schedule step past its run (once a resumed sweep failed so). PBT lets it finish on its own result instead."""
    pbt = build_pbt(space, "objective", perturb_every=1, epochs=4, seed=0)
    # Ray's PBT would look the trial up and perturb (interval reached); no trial or controller is needed to finish
    assert pbt.on_trial_result(None, None, {"training_iteration": 4, "objective": 0.1}) == pbt.CONTINUE
    with pytest.raises(KeyError):  # before the last epoch it is Ray's PBT: an unknown trial is an error
        pbt.on_trial_result(None, None, {"training_iteration": 3, "objective": 0.1})
