"""Soak (slow): a 50-trial sweep through a lost node, an MLflow server restart and a SIGKILLed driver + --resume."""

from __future__ import annotations

import pytest

from bench.soak import LOSSES, run_soak


@pytest.mark.slow
def test_a_long_sweep_through_node_loss_server_restart_and_driver_kill_loses_nothing(ray_cluster, tmp_path):
    result = run_soak(tmp_path, ray_cluster, trials=50, concurrency=3)
    assert {key: result[key] for key in LOSSES} == dict.fromkeys(LOSSES, 0), result
    # a trial the searcher asked for just before the SIGKILL, which Tune never recorded, is closed on resume
    recorded = result["study_trials"] - result["study_orphans_closed"]
    assert result["tune_trials"] == result["mlflow_runs"] == recorded == 50, result
    # the best searched config and the default (one, if the default won the search), 2 seeds each
    assert result["confirm_runs"] == result["confirm_tune_trials"] in (2, 4), result
    assert [what.split(" (")[0] for _, what in result["timeline"]] == [
        "sweep started", "worker node removed", "a worker node added back", "MLflow server stopped",
        "MLflow server started again, same port and store", "driver SIGKILLed",
        "resumed sweep finished, confirmation included"]
