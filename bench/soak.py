"""Soak: one long sweep through a lost node, a tracking-server restart and a killed driver; counts what was lost.

A sweep of many tiny trials (8 px digits, 3 epochs, ASHA, TPE, confirmation) runs as ``ssl-tune tune`` on
a local multi-node ``ray.cluster_utils.Cluster`` and logs to a real ``mlflow server`` on 127.0.0.1.
As trials end, the script:

1. removes the worker node (its trial restarts from its checkpoint, ``--max-failures``), later adds one back;
2. stops the MLflow server and starts it again on the same port and store;
3. SIGKILLs the driver, then runs ``ssl-tune tune --resume``.

At the end it counts, against Tune's own record of the trials: MLflow child runs missing or doubled,
finished trials without every epoch's metrics, Optuna trials missing, doubled or in the wrong state, and
confirmation runs incomplete. Goal: all zero; ``python -m bench.soak`` exits 1 otherwise. An Optuna trial the
killed driver asked for but Tune never recorded is no loss once the resume has closed it (FAIL, reason
``tuning.search.ORPHAN_REASON``): those are counted apart (``study_orphans_closed``). ``python -m bench.soak
--runs 5`` soaks 5 times, each on a fresh cluster, and writes a row of counts a run in RESULTS.md (``--print-only``:
prints them); ``tests/test_soak.py`` (slow) runs it once on the test session's cluster.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from bench.mlflow_server import MlflowServer

NAME = "soak"
EXPERIMENT = "ssl-tune-soak"
EPOCHS = 3
TINY = [  # the tests' tiny model: 8 px digits, a narrow CNN, small heads
    "data.source=digits", "data.image_size=8", "optim.warmup_epochs=0", "eval.knn_k=20", "backbone.width=8",
    "byol.projector_hidden_dim=64", "byol.predictor_hidden_dim=64", "byol.projector_out_dim=32",
    f"optim.epochs={EPOCHS}",
]
OPTUNA_STATE = {"finished": "COMPLETE", "pruned": "PRUNED", "diverged": "PRUNED", "collapsed": "PRUNED",
                "time_limit": "PRUNED", "failed": "FAIL"}  # what each ssl-tune status must be in the study


def sweep_command(root: Path, address: str, url: str, trials: int, concurrency: int, confirm_seeds: int) -> list[str]:
    """``ssl-tune tune`` for the soak, without ``--name``/``--resume``."""
    return [
        sys.executable, "-m", "tuning.cli", "tune", "--trials", str(trials), "--concurrency", str(concurrency),
        "--min-epochs", "1", "--max-failures", "3", "--storage", str(root / "sweeps"), "--tracking-uri", url,
        "--experiment", EXPERIMENT, "--address", address, "--confirm-top", "1", "--confirm-seeds",
        str(confirm_seeds), *sum((["--set", override] for override in TINY), []),
    ]


def search_runs(store: Any, stage: str = "search") -> list[Any]:
    """The sweep's child runs of one stage, read from the server's own sqlite store (works while it is down)."""
    from tuning.tracking import STAGE_TAG, SWEEP_TAG

    experiment = store.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return store.search_runs([experiment.experiment_id],
                             f"tags.`{SWEEP_TAG}` = '{NAME}' and tags.`{STAGE_TAG}` = '{stage}'", max_results=5000)


def started_trials(root: Path) -> int:
    """Search trials Tune has started (their folders): Tune's progress, which an MLflow outage does not hold up."""
    return len(list((root / "sweeps" / NAME).glob("trial_*")))


def wait_until(condition: Callable[[], bool], what: str, driver: subprocess.Popen, log: Path,
               timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if driver.poll() is not None:
            raise RuntimeError(f"the driver exited ({driver.returncode}) before {what}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting until {what}: {log.read_text()[-3000:]}")
        time.sleep(1)


def run_soak(root: Path, cluster: Any, trials: int = 50, concurrency: int = 3, confirm_seeds: int = 2) -> dict:
    """The soak on ``cluster`` (a ``ray.cluster_utils.Cluster``; a 1-CPU node is added, removed and added
    back). Returns the counts (``lost``, ``doubled``, ...: all 0 when nothing was lost) and the timeline."""
    from mlflow.tracking import MlflowClient

    server = MlflowServer(root / "mlflow-server")
    (root / "mlflow-server").mkdir(parents=True, exist_ok=True)
    server.start()
    store = MlflowClient(f"sqlite:///{server.root / 'mlflow.db'}")
    command = sweep_command(root, cluster.address, server.url, trials, concurrency, confirm_seeds)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": cluster.address}
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    started = time.monotonic()
    timeline: list[tuple[float, str]] = []

    def event(what: str) -> None:
        timeline.append((round(time.monotonic() - started, 1), what))

    def after(fraction: float) -> int:
        return max(1, round(trials * fraction))

    log = root / "driver-1.log"
    try:
        with open(log, "w") as stream:
            driver = subprocess.Popen([*command, "--name", NAME], stdout=stream, stderr=subprocess.STDOUT, env=env)
            try:
                event("sweep started")
                wait_until(lambda: started_trials(root) >= after(0.2), f"{after(0.2)} trials started", driver, log)
                cluster.remove_node(node)
                node = None
                event(f"worker node removed ({started_trials(root)} trials started)")
                wait_until(lambda: started_trials(root) >= after(0.3), f"{after(0.3)} trials started", driver, log)
                node = cluster.add_node(num_cpus=1)
                event(f"a worker node added back ({started_trials(root)} trials started)")
                wait_until(lambda: started_trials(root) >= after(0.45), f"{after(0.45)} trials started", driver, log)
                server.stop()
                event(f"MLflow server stopped ({started_trials(root)} trials started)")
                time.sleep(10)
                server.start()
                event("MLflow server started again, same port and store")
                wait_until(lambda: started_trials(root) >= after(0.65), f"{after(0.65)} trials started", driver, log)
                driver.send_signal(signal.SIGKILL)
                driver.wait(timeout=60)
                logged = len(search_runs(store))
                event(f"driver SIGKILLed ({started_trials(root)} trials started, {logged} of them in MLflow)")
            finally:
                driver.kill()
        resumed = subprocess.run([*command, "--resume", NAME], capture_output=True, text=True, env=env,
                                 timeout=3600)
        (root / "driver-2.log").write_text(resumed.stdout + resumed.stderr)
        if resumed.returncode != 0:
            raise RuntimeError(f"--resume failed ({resumed.returncode}): {(resumed.stdout + resumed.stderr)[-3000:]}")
        event("resumed sweep finished, confirmation included")
        counts = count_losses(root / "sweeps" / NAME, store)
        if any(counts[key] for key in LOSSES):  # keep what explains it
            kept = Path(tempfile.mkdtemp(prefix="ssl-tune-soak-loss-"))
            for name in ("driver-1.log", "driver-2.log"):
                (kept / name).write_text((root / name).read_text())
            (kept / "sweep.log").write_text((root / "sweeps" / NAME / "sweep.log").read_text())
            counts["kept"] = str(kept)
    finally:
        server.stop()
        if node is not None:
            cluster.remove_node(node)
    return {**counts, "seconds": round(time.monotonic() - started), "timeline": timeline}


def count_losses(sweep: Path, store: Any) -> dict:
    """What was lost or doubled, each count against Tune's own record of the sweep's trials."""
    import optuna
    from ray.tune import ExperimentAnalysis

    from tuning.search import ORPHAN_REASON, TRIAL_ATTR
    from tuning.tracking import STATUS_TAG, TRIAL_TAG

    tune_trials = ExperimentAnalysis(str(sweep)).trials
    tune_search = {trial.trial_id for trial in tune_trials}
    runs = search_runs(store)
    run_ids = Counter(run.data.tags[TRIAL_TAG] for run in runs)
    status = {run.data.tags[TRIAL_TAG]: run.data.tags.get(STATUS_TAG) for run in runs}
    epochs_incomplete = failed_at_start = 0
    for run in runs:  # a finished trial has epochs 1..E, a stopped one 1..its last, each once
        steps = sorted(m.step for m in store.get_metric_history(run.info.run_id, "epoch"))
        if status[run.data.tags[TRIAL_TAG]] == "failed" and not steps:
            # Its node died while Tune started it: Tune retries running trials only, so it failed (in Tune, Optuna
            # and MLflow alike) before any epoch. Reported, not lost; counted apart.
            failed_at_start += 1
            continue
        last = EPOCHS if status[run.data.tags[TRIAL_TAG]] == "finished" else (steps[-1] if steps else 0)
        epochs_incomplete += steps != list(range(1, last + 1)) or not steps

    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{sweep / 'optuna.db'}")
    orphans = {trial.number for trial in study.trials if trial.user_attrs.get(TRIAL_ATTR) not in tune_search
               and trial.state.name == "FAIL" and trial.user_attrs.get("ssl_tune_reason") == ORPHAN_REASON}
    recorded = [trial for trial in study.trials if trial.number not in orphans]
    study_ids = Counter(trial.user_attrs.get(TRIAL_ATTR) for trial in recorded)
    wrong = [f"{trial.user_attrs.get(TRIAL_ATTR)}: Optuna {trial.state.name} ({trial.user_attrs.get('ssl_tune_status')}"
             f", {trial.user_attrs.get('ssl_tune_reason')}), MLflow {status.get(trial.user_attrs.get(TRIAL_ATTR))}"
             for trial in recorded
             if trial.state.name != OPTUNA_STATE.get(status.get(trial.user_attrs.get(TRIAL_ATTR)), "?")]

    (confirm_dir,) = [path for path in sweep.iterdir() if path.name.startswith("confirm-")]
    tune_confirm = {trial.trial_id for trial in ExperimentAnalysis(str(confirm_dir)).trials}
    confirm_runs = search_runs(store, "confirm")
    confirm_ids = Counter(run.data.tags[TRIAL_TAG] for run in confirm_runs)
    confirm_incomplete = sum(run.data.tags.get(STATUS_TAG) != "finished" or "test_knn_acc" not in run.data.metrics
                             for run in confirm_runs)
    return {
        "tune_trials": len(tune_search), "trial_restarts": sum(trial.num_failures for trial in tune_trials),
        "mlflow_runs": len(runs), "study_trials": len(study.trials),
        "statuses": dict(Counter(status.values())),
        "lost": len(tune_search - set(run_ids)) + len(tune_confirm - set(confirm_ids)),
        "doubled": sum(n - 1 for n in run_ids.values()) + sum(n - 1 for n in confirm_ids.values()),
        "unknown_to_tune": len(set(run_ids) - tune_search) + len(set(confirm_ids) - tune_confirm),
        "epochs_incomplete": epochs_incomplete, "failed_at_start": failed_at_start,
        "study_missing": len(tune_search - set(study_ids)),
        "study_doubled": sum(n - 1 for n in study_ids.values()),
        "study_wrong_state": len(wrong), "wrong_states": wrong, "study_orphans_closed": len(orphans),
        "confirm_runs": len(confirm_runs), "confirm_tune_trials": len(tune_confirm),
        "confirm_incomplete": confirm_incomplete,
    }


LOSSES = ("lost", "doubled", "unknown_to_tune", "epochs_incomplete", "study_missing", "study_doubled",
          "study_wrong_state", "confirm_incomplete")


def soak_once(trials: int, concurrency: int) -> dict[str, Any]:
    """One soak on a fresh 2-CPU head + 1-CPU worker cluster."""
    import ray
    from ray.cluster_utils import Cluster

    from bench.mlflow_server import free_tcp_port

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "dashboard_port": free_tcp_port()})
    ray.init(address=cluster.address)
    try:
        with tempfile.TemporaryDirectory(prefix="ssl-tune-soak-") as root:
            return run_soak(Path(root), cluster, trials, concurrency)
    finally:
        ray.shutdown()
        cluster.shutdown()


def section(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    from bench.common import machine, markdown_table

    timeline = "\n".join(f"| {seconds:.0f} | {what} |" for seconds, what in results[0]["timeline"])
    columns = ("seconds", "tune_trials", "mlflow_runs", "study_trials", "study_orphans_closed", "trial_restarts",
               "confirm_runs", *LOSSES)
    table = markdown_table(pd.DataFrame([{"run": i + 1, **{key: r[key] for key in columns}}
                                         for i, r in enumerate(results)]))
    clean = sum(not any(r[key] for key in LOSSES) for r in results)
    return f"""## Soak

`bench/soak.py`: one long sweep of many tiny trials (8 px digits, 3 epochs, ASHA, TPE, confirmation) run as
`ssl-tune tune` on a local multi-node `ray.cluster_utils.Cluster` (a 2-CPU head, a 1-CPU worker node,
`--max-failures 3`), logging to a real `mlflow server` on 127.0.0.1. As trials end it removes the worker node (its
trial restarts from its checkpoint) and adds one back, stops the MLflow server and starts it again on the same port and
store, then SIGKILLs the driver and runs `ssl-tune tune --resume`. At the end it counts, against Tune's own record:
MLflow child runs missing or doubled, finished trials without every epoch's metrics, Optuna trials missing, doubled or
in the wrong state, and confirmation runs incomplete. An Optuna trial the killed driver asked for but Tune never
recorded is closed FAIL on resume ("never started: the driver stopped") and counted apart
(`study_orphans_closed`). Goal: all losses zero; the bench exits 1 otherwise.

- Reproduce: `python -m bench.soak --trials {args.trials} --concurrency {args.concurrency} --runs {args.runs}`
  (`tests/test_soak.py`, slow and in CI, runs it once on the test session's cluster).
- Measured: {time.strftime('%Y-%m-%d')}, {machine()}.

Events of run 1:

| seconds | event |
| --- | --- |
{timeline}

Every run ({clean} of {len(results)} with no loss):

{table}
"""


def main() -> None:
    from bench.common import replace_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1, help="soaks in a row, each on a fresh cluster")
    parser.add_argument("--print-only", action="store_true", help="print the section; do not write it")
    args = parser.parse_args()
    results = []
    for run in range(args.runs):
        results.append(soak_once(args.trials, args.concurrency))
        print(f"run {run + 1}: {results[-1]}", flush=True)
    text = section(results, args)
    print(text)
    if not args.print_only:
        replace_section("Soak", text)
    lost = [{key: r[key] for key in LOSSES if r[key]} for r in results]
    if any(lost):
        sys.exit(f"soak: losses are not all zero: {lost} (see the counts above and the driver logs)")


if __name__ == "__main__":
    main()
