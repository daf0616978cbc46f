"""Is ASHA safe here? How well each epoch's val ranks configs by their final val, on the demo's own space.

Runs ``ssl-tune tune`` on the demo's data and space with random search and no pruning (every config trains its
full budget), reads each trial's per-epoch val from MLflow, then reports:

- the Spearman rank correlation between val at epoch r and the final val, over all configs, for each r;
- for grace period g and reduction factor eta (rungs g, g*eta, ... below the budget), successive halving
  replayed on these complete curves (ASHA's synchronous form: at each rung the top 1/eta go on): whether the
  final-best config survives, and the regret (final-best val minus the best survivor's final val).

Usage: ``python -m bench.asha_rungs [--trials 24]`` (about 10 min on 2 cores); appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from bench.common import append_section, machine, markdown_table

OBJECTIVE = "val_knn_acc"


def run_unpruned_sweep(root: Path, trials: int, seed: int) -> pd.DataFrame:
    """Val per epoch (columns 1..E) of ``trials`` random configs of the demo's space, none pruned."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    command = [sys.executable, "-m", "tuning.cli", "tune", "--trials", str(trials), "--searcher", "random",
               "--scheduler", "none", "--no-confirm", "--seed", str(seed), "--name", "rungs",
               "--storage", str(root / "sweeps"), "--tracking-uri", uri, "--experiment", "asha-rungs"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError((done.stdout + done.stderr)[-3000:])
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("asha-rungs")
    curves = {}
    for run in client.search_runs([experiment.experiment_id], "tags.`ssl_tune.stage` = 'search'"):
        history = client.get_metric_history(run.info.run_id, OBJECTIVE)
        curves[run.data.tags["ssl_tune.trial_id"]] = {m.step: m.value for m in history}
    return pd.DataFrame(curves).T.sort_index(axis=1)


def rungs(grace: int, eta: int, budget: int) -> list[int]:
    found, rung = [], grace
    while rung < budget:
        found.append(rung)
        rung *= eta
    return found


def replay_halving(curves: pd.DataFrame, grace: int, eta: int) -> tuple[bool, float, int]:
    """Synchronous successive halving on complete curves: at each rung keep the top 1/eta by that epoch's val.
    Returns (final-best survives, regret in final val, configs trained to the budget)."""
    budget = int(curves.columns.max())
    alive = curves.index
    for rung in rungs(grace, eta, budget):
        keep = max(1, int(np.ceil(len(alive) / eta)))
        alive = curves.loc[alive, rung].sort_values(ascending=False).index[:keep]
    final = curves[budget]
    return final.idxmax() in alive, float(final.max() - final[alive].max()), len(alive)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="asha-rungs-") as root:
        curves = run_unpruned_sweep(Path(root), args.trials, args.seed)
    curves = curves.dropna()  # a diverged trial stops early: no full curve
    budget = int(curves.columns.max())
    correlation = pd.DataFrame([{"epoch": epoch, "Spearman with final val": spearmanr(curves[epoch], curves[budget])[0]}
                                for epoch in curves.columns[:-1]])
    replays = pd.DataFrame([
        {"grace (--min-epochs)": grace, "reduction factor": eta, "rungs": str(rungs(grace, eta, budget)),
         "final-best survives": survives, "regret (points)": 100 * regret, "configs trained fully": full}
        for grace in (1, 2, 3) for eta in (2, 3) for survives, regret, full in [replay_halving(curves, grace, eta)]
    ])
    print(markdown_table(correlation), markdown_table(replays), sep="\n\n")
    seconds = time.perf_counter() - started
    append_section(f"""## Is ASHA safe on the demo? Rung-vs-final rank correlation ({time.strftime("%F")})

`python -m bench.asha_rungs --trials {args.trials} --seed {args.seed}`: the demo's data and space, random search,
no pruning, {len(curves)} configs with complete {budget}-epoch curves ({machine()}, {seconds:.0f} s).
Final val = val at epoch {budget}; final-best val {curves[budget].max():.3f}, spread of final val over configs
{curves[budget].min():.3f}-{curves[budget].max():.3f}.

{markdown_table(correlation)}

Synchronous successive halving replayed on the same curves (the top 1/eta by val at each rung go on):

{markdown_table(replays)}
""")


if __name__ == "__main__":
    main()
