"""Search quality: TPE + ASHA against random search for the same epoch budget, on the digits default.

For each seed, a random search (no early stopping) runs ``--random-trials`` trials of
``--epochs`` epochs; its budget is the epochs it trained. TPE + ASHA then runs with twice as
many trials. From each sweep's per-epoch reports, in time order, we get "best objective so far
vs epochs trained". The figure of merit: the fraction of the random budget TPE + ASHA needs to
reach random search's final best (target <= 0.5). Sweep overhead per trial: (wall time - sum
of trial training times) / trials, with one trial at a time so the subtraction is exact.

    python -m bench.search_quality --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import date
from pathlib import Path

import pandas as pd
import ray

from bench.common import append_section, machine, markdown_table
from tuning.sweep import SweepSettings, run_sweep

SMALL = [  # a smaller backbone and image than the demo default, so that many sweeps fit in a benchmark
    "data.image_size=16", "backbone.width=16", "optim.epochs={epochs}",
]


def sweep_curve(settings: SweepSettings) -> tuple[pd.DataFrame, float, float]:
    """(per-report table in time order with cumulative epochs and best-so-far, wall s, training s)."""
    started = time.perf_counter()
    results, _ = run_sweep(settings)  # confirm=False below: this compares the search stages
    wall = time.perf_counter() - started
    frames, training = [], 0.0
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or frame.empty:
            continue
        training += float(frame["time_total_s"].max())
        frames.append(frame[["timestamp", "time_total_s", "objective"]])
    reports = pd.concat(frames).sort_values(["timestamp", "time_total_s"]).reset_index(drop=True)
    reports["epochs_trained"] = range(1, len(reports) + 1)
    reports["best_so_far"] = reports["objective"].cummax()
    return reports, wall, training


def epochs_to_reach(curve: pd.DataFrame, target: float) -> float:
    reached = curve[curve["best_so_far"] >= target - 1e-9]
    return float(reached["epochs_trained"].iloc[0]) if not reached.empty else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--random-trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--grace", type=int, default=2, help="ASHA grace period in epochs (ssl-tune's --min-epochs)")
    args = parser.parse_args()

    ray.init(num_cpus=2)
    workdir = Path(tempfile.mkdtemp(prefix="ssl-tune-bench-"))
    overrides = [o.format(epochs=args.epochs) for o in SMALL]
    rows = []
    for seed in args.seeds:
        common = dict(overrides=overrides, concurrency=1, seed=seed, storage=str(workdir / "sweeps"),
                      tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}", experiment="bench", min_epochs=args.grace)
        random_curve, random_wall, random_train = sweep_curve(
            SweepSettings(
                confirm=False, name=f"random-{seed}", searcher="random", scheduler="none", trials=args.random_trials,
                          **common))
        budget = int(random_curve["epochs_trained"].iloc[-1])
        random_best = float(random_curve["best_so_far"].iloc[-1])
        tpe_curve, tpe_wall, tpe_train = sweep_curve(
            SweepSettings(
                confirm=False, name=f"tpe-{seed}", searcher="tpe", scheduler="asha", trials=2 * args.random_trials,
                          **common))
        within_budget = tpe_curve[tpe_curve["epochs_trained"] <= budget]
        needed = epochs_to_reach(tpe_curve, random_best)
        rows.append({
            "seed": seed,
            "budget (epochs)": budget,
            "random best": random_best,
            "TPE+ASHA best within budget": float(within_budget["best_so_far"].iloc[-1]),
            "TPE+ASHA epochs to random's best": needed,
            "fraction of budget": needed / budget,
            "overhead s/trial (random)": (random_wall - random_train) / args.random_trials,
            "overhead s/trial (TPE+ASHA)": (tpe_wall - tpe_train) / (2 * args.random_trials),
        })
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    median_fraction = float(table["fraction of budget"].median())
    section = "\n".join([
        f"## Search quality: TPE + ASHA vs random search ({date.today()})",
        "",
        f"Machine: 2-core dev machine, {machine()}, ray {ray.__version__}. Digits at 16x16, small CNN width 16, "
        f"{args.epochs} epochs per full trial, one trial at a time; random: {args.random_trials} trials without "
        f"early stopping; TPE (multivariate) + ASHA (grace {args.grace}, reduction 2): "
        f"{2 * args.random_trials} trials.",
        "",
        markdown_table(table),
        "",
        f"Median fraction of the random-search budget TPE + ASHA needed to reach random search's best: "
        f"{median_fraction:.2f} (target <= 0.5: {'met' if median_fraction <= 0.5 else 'NOT met'}). "
        f"Median sweep overhead per trial: {table['overhead s/trial (TPE+ASHA)'].median():.2f} s "
        f"(target <= 2 s).",
        "",
    ])
    append_section(section)
    print(section)


if __name__ == "__main__":
    main()
