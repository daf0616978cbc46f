"""A resumed sweep closes the Optuna trials its killed driver asked for but Tune never recorded, adopts the ones
Tune recorded after the searcher's last save, and tells the study no ending Tune's saved record lacks
(tuning/search.py).

The searcher is the one a sweep builds (``build_searcher``) on a real sqlite study, pickled as ``Tuner`` pickles
it; its state goes through Ray's own ``save_to_dir`` / ``restore_from_dir``, which ``Tuner.restore`` calls on
``--resume``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search_spaces import load_space
from ssl_train.status import Status
from tuning.search import ORPHAN_REASON, TRIAL_ATTR, TruthfulOptunaSearch, build_searcher, settle_study
from tuning.settings import STUDY_FILE, SweepSettings
from tuning.trial import OBJECTIVE

SETTINGS = SweepSettings(name="resume", trials=6, concurrency=2)
FINISHED = {OBJECTIVE: 0.5, "training_iteration": 3, "epoch": 3, "status": Status.FINISHED}
PRUNED = {OBJECTIVE: 0.25, "training_iteration": 1, "epoch": 1, "status": Status.RUNNING}


def _searcher(path: Path, enqueue_default: bool = True) -> TruthfulOptunaSearch:
    base = SETTINGS.base_config()
    return build_searcher(load_space(SETTINGS.space, base), SETTINGS, base, path, enqueue_default)


def _study(path: Path) -> dict[str, optuna.trial.FrozenTrial]:
    """The study's trials by Tune trial id ('' for one that has none)."""
    study = optuna.load_study(study_name=SETTINGS.name, storage=f"sqlite:///{path / STUDY_FILE}")
    return {trial.user_attrs.get(TRIAL_ATTR, ""): trial for trial in study.trials}


def test_resume_fails_the_study_trials_tune_never_recorded_and_adopts_the_ones_it_did(tmp_path):
    state = tmp_path / "experiment"
    state.mkdir()
    searcher = _searcher(tmp_path)
    pickled = pickle.dumps(searcher)  # as Tuner pickles its searcher (tuner.pkl) before the sweep starts
    for trial_id in ("finished", "running"):
        assert searcher.suggest(trial_id)
    searcher.on_trial_complete("finished", FINISHED)
    searcher.save_to_dir(str(state), "2026-01-01_00-00-00")  # Tune's periodic save of the searcher state
    # Tune saves its trial list first, then the searcher: a driver killed between the two leaves a trial that
    # Tune's record holds (and will resume) but the restored searcher does not know.
    assert searcher.suggest("between-the-saves")
    assert searcher.suggest("asked-after-save")  # then the driver is SIGKILLed: Tune never records this trial
    searcher._ot_study.ask()  # killed between study.ask and the user attributes: no Tune trial id at all
    extension = _searcher(tmp_path, enqueue_default=False)  # another Tune experiment of the sweep (extend-1)
    assert extension.suggest("extension-running")
    before = _study(tmp_path)
    assert [before[key].state for key in ("asked-after-save", "", "extension-running", "running",
                                          "between-the-saves")] == [TrialState.RUNNING] * 5

    resumed = pickle.loads(pickled)  # what Tuner.restore unpickles, then restores from the saved state
    resumed.restore_from_dir(str(state))
    recorded = {"finished": ("TERMINATED", FINISHED), **dict.fromkeys(  # Tune's records, all experiments
        ("running", "between-the-saves", "extension-running"), ("PENDING", {}))}
    closed, told_late = settle_study(resumed._ot_study, recorded, None)

    after = _study(tmp_path)
    assert len(after) == len(before) == 6 and len(closed) == 2 and told_late == []
    for orphan in ("asked-after-save", ""):
        assert after[orphan].state == TrialState.FAIL, orphan
        assert after[orphan].user_attrs["ssl_tune_reason"] == ORPHAN_REASON
        assert after[orphan].user_attrs["ssl_tune_status"] == Status.FAILED
    assert after["finished"].state == TrialState.COMPLETE and after["finished"].value == 0.5
    assert after["finished"].user_attrs == before["finished"].user_attrs
    for recorded_trial in ("running", "between-the-saves", "extension-running"):
        assert after[recorded_trial].state == TrialState.RUNNING, recorded_trial
    # The restored searcher ends its recorded trials, the one it did not know included, as Tune reports them.
    resumed.on_trial_complete("running", {OBJECTIVE: 0.25, "training_iteration": 1, "epoch": 1,
                                          "status": Status.RUNNING})
    resumed.on_trial_result("between-the-saves", {OBJECTIVE: 0.3, "training_iteration": 1})
    resumed.on_trial_complete("between-the-saves", {OBJECTIVE: 0.4, "training_iteration": 3, "epoch": 3,
                                                    "status": Status.FINISHED})
    resumed.save_to_dir(str(state), "2026-01-01_00-00-00")  # the study learns the ends at the searcher's save
    final = _study(tmp_path)
    assert final["running"].state == TrialState.PRUNED
    assert final["between-the-saves"].state == TrialState.COMPLETE and final["between-the-saves"].value == 0.4
    assert final["between-the-saves"].intermediate_values == {1: 0.3, 3: 0.4}
    assert settle_study(resumed._ot_study, recorded, None) == ([], [])


def test_the_study_learns_an_ending_only_once_tunes_saved_record_holds_it(tmp_path):
    state = tmp_path / "experiment"
    state.mkdir()
    searcher = _searcher(tmp_path)
    pickled = pickle.dumps(searcher)
    for trial_id in ("rerun", "ended-between-the-saves", "errored"):
        assert searcher.suggest(trial_id)
    searcher.on_trial_result("rerun", PRUNED)
    for trial_id in ("rerun", "ended-between-the-saves"):  # ASHA stops both after epoch 1
        searcher.on_trial_complete(trial_id, PRUNED)
    searcher.on_trial_complete("errored", None, error=True)
    # Killed before Tune saved its record: had the study been told now, "rerun" (resumed by Tune, which still holds
    # it running) would end twice, PRUNED in the study and finished in Tune and MLflow.
    assert {key: trial.state for key, trial in _study(tmp_path).items()} == dict.fromkeys(
        ("rerun", "ended-between-the-saves", "errored"), TrialState.RUNNING)

    # Tune's record of the killed driver: "rerun" saved as running; the other two saved as ended, the searcher not.
    recorded = {"rerun": ("PENDING", {}), "ended-between-the-saves": ("TERMINATED", PRUNED), "errored": ("ERROR", {})}
    resumed = pickle.loads(pickled)
    closed, told_late = settle_study(resumed._ot_study, recorded, None)
    after = _study(tmp_path)
    assert closed == [] and len(told_late) == 2
    assert after["ended-between-the-saves"].state == TrialState.PRUNED
    assert after["ended-between-the-saves"].user_attrs["ssl_tune_status"] == Status.PRUNED
    assert after["ended-between-the-saves"].intermediate_values == {1: 0.25}
    assert after["errored"].state == TrialState.FAIL and after["errored"].user_attrs["ssl_tune_status"] == Status.FAILED
    assert after["rerun"].state == TrialState.RUNNING
    resumed.on_trial_complete("rerun", FINISHED)  # its second life trains every epoch: that is what the study learns
    resumed.save_to_dir(str(state), "2026-01-01_00-00-01")
    assert _study(tmp_path)["rerun"].state == TrialState.COMPLETE and _study(tmp_path)["rerun"].value == 0.5


def test_a_progress_reporter_pickled_by_an_older_version_still_reports():
    """Tune pickles the reporter with the experiment and --resume restores it: a newer attribute has a default."""
    import pickle

    from tuning.progress import CompactReporter

    reporter = CompactReporter("objective", str, "knn_acc", only_unfinished=True)
    del reporter.__dict__["only_unfinished"]  # as a version without the attribute pickled it
    assert pickle.loads(pickle.dumps(reporter)).only_unfinished is False
