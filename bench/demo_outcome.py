"""The demo as a user runs it: ``ssl-tune tune`` (no arguments), timed, over several ``--seed``s, on test only.

Each seed runs the real command in a fresh folder (its own MLflow store and sweep folder) and reads back what the
sweep logged: the wall time, the winner and what it changes in the start (BYOL paper views), the winner's test
margin over the start with its printed 95 % interval, each confirmed config's test mean against the random-init
backbone, and raw pixels. The goals (issue 35): every confirmed config beats random init by at least 5 points, and
the winner beats the start, positive at 95 %, in at least 4 of 5 seeds. ``--float32`` trains in float32 as a CPU
without native bf16 does (``optim.mixed_precision=false``).

    python -m bench.demo_outcome [--seeds 0 1 2 3 4] [--float32] [--set KEY=VALUE ...] [--write]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from bench.common import machine, markdown_table, replace_section
from tuning.report import load_report

RANDOM_INIT_GAP = 0.05  # every confirmed config must beat the random-init backbone by this much on test


def run_demo(seed: int, overrides: list[str], folder: Path) -> dict[str, object]:
    """One ``ssl-tune tune --seed SEED`` in ``folder``; its wall time and what it logged."""
    command = [sys.executable, "-m", "tuning.cli", "tune", "--seed", str(seed), "--name", f"demo-{seed}",
               *sum((["--set", o] for o in overrides), [])]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"seed {seed}: the demo failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    lines = done.stdout.splitlines()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    parent = MlflowClient(uri).get_run(load_report(uri, f"demo-{seed}").parent_id)
    runs = pd.read_csv(folder / "runs" / "sweeps" / f"demo-{seed}" / "confirmation.csv")
    per_config = runs.groupby("candidate")["test"].mean()
    metrics = parent.data.metrics
    return {"seed": seed, "wall s": round(wall_s), "console lines": len(done.stdout.splitlines()),
            "winner": parent.data.tags.get("ssl_tune.winner"),
            "change": next((line.split(": ", 1)[1] for line in lines if line.startswith("what the winner changes")),
                           ""),
            "margin": metrics.get("confirm_margin", float("nan")),
            "low": metrics.get("confirm_margin_low", float("nan")),
            "high": metrics.get("confirm_margin_high", float("nan")),
            "start test": per_config.get("default", float("nan")),
            "worst confirmed - random init": per_config.min() - metrics.get("baseline_random_init_test", float("nan")),
            "raw pixels": metrics.get("baseline_raw_pixels_test", float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--float32", action="store_true", help="train in float32, as a CPU without native bf16")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--write", action="store_true", help="replace the section in bench/RESULTS.md")
    args = parser.parse_args()
    overrides = [*args.overrides, *(["optim.mixed_precision=false"] if args.float32 else [])]
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"demo-{seed}-") as folder:
            rows.append(run_demo(seed, overrides, Path(folder)))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    positive = int((table["low"] > 0).sum())
    learned = int((table["worst confirmed - random init"] >= RANDOM_INIT_GAP).sum())
    precision = "float32 (--float32)" if args.float32 else "this CPU's choice"
    text = (f"## The demo\n\n{time.strftime('%Y-%m-%d')}, {machine()}, trials in {precision}. "
            f"`python -m bench.demo_outcome --seeds {' '.join(map(str, args.seeds))}"
            + (" --float32" if args.float32 else "") + "".join(f" --set {o}" for o in args.overrides)
            + "`: `ssl-tune tune` as a user runs it, each seed in a fresh folder; test split only.\n\n"
            + markdown_table(table) + f"\n\nWinner better than the start at 95 %: {positive} of {len(table)} seeds. "
            f"Every confirmed config {RANDOM_INIT_GAP * 100:.0f}+ points above random init: {learned} of "
            f"{len(table)}. Median wall time {table['wall s'].median():.0f} s.\n")
    print(text)
    if args.write:
        replace_section("The demo", text)


if __name__ == "__main__":
    main()
