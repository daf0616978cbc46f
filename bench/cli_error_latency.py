"""How long does ``ssl-tune`` take to refuse bad input? Wall time of whole commands, against ``--help``.

Each command runs as a fresh process (what a user waits for, interpreter start-up included), in an empty
temporary folder, the commands interleaved round by round so that a change in the machine's load hits them
all alike. The goal (issue 36): an error that needs no data in at most 0.5 s, one that needs Ray or a server (a
cluster address, a storage URI, a tracking server) in at most 3 s; ``--help`` is the floor.

    python -m bench.cli_error_latency [--rounds 5] [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench.common import machine, markdown_table, replace_section

GOAL_S = 0.5  # an error that needs no data, Ray or server
NETWORK_GOAL_S = 3.0  # one that asks a cluster, a storage service or a tracking server
NETWORK = ("--address", "gs://", "--storage", "--tracking-uri")  # the labels of the commands with the looser goal
COMMANDS = {  # label -> arguments; every one but --help must end in one line and exit code 2
    "--help": ["--help"],
    "tune --trials 0": ["tune", "--trials", "0"],
    "tune --trials -3": ["tune", "--trials", "-3"],
    "tune --concurrency 0": ["tune", "--concurrency", "0"],
    "tune --concurrency -1": ["tune", "--concurrency", "-1"],
    "tune --min-epochs 0": ["tune", "--min-epochs", "0"],
    "tune --min-epochs 5 --epochs 1": ["tune", "--min-epochs", "5", "--epochs", "1"],
    "tune --time-budget nan": ["tune", "--time-budget", "nan"],
    "tune --time-budget 10x": ["tune", "--time-budget", "10x"],
    "tune --confirm-seeds 0": ["tune", "--confirm-seeds", "0"],
    "tune --confirm-top 0": ["tune", "--confirm-top", "0"],
    "tune --space nosuch": ["tune", "--space", "nosuch"],
    "tune --space broken.yaml": ["tune", "--space", "broken.yaml"],
    "tune --resume nosuch": ["tune", "--resume", "nosuch"],
    "tune --name ../../escape": ["tune", "--name", "../../escape"],
    "tune --gpus-per-worker 1": ["tune", "--gpus-per-worker", "1"],
    "tune --storage ftp://x/y": ["tune", "--storage", "ftp://x/y"],
    "tune --tracking-uri http://127.0.0.1:1": ["tune", "--tracking-uri", "http://127.0.0.1:1"],
    "train --set optim.lr=-1": ["train", "--set", "optim.lr=-1"],
    "tune --set optim.lr=-1": ["tune", "--set", "optim.lr=-1"],
    "train --set augment.crop_scale=[0.2,": ["train", "--set", "augment.crop_scale=[0.2,"],
    "train --set optim.lr=.inf": ["train", "--set", "optim.lr=.inf"],
    "train data.path=gs://... (no service)": ["train", "--set", "data.source=parquet", "--set",
                                              "data.path=gs://bucket/x?endpoint_override=127.0.0.1:1&scheme=http"],
    "train --address 127.0.0.1:1": ["train", "--address", "127.0.0.1:1"],
    "augment-preview --images 0": ["augment-preview", "--images", "0"],
    "embed RUN IMAGES --batch-size 0": ["embed", "run", "images", "--batch-size", "0"],
    "export RUN --onnx /proc/x.onnx": ["export", "run", "--onnx", "/proc/x.onnx"],
    "ui --port 99999": ["ui", "--port", "99999"],
    "report (nothing tracked here)": ["report"],  # needs MLflow's and Ray's imports for the default store's path
}


def command_line() -> list[str]:
    """The installed ``ssl-tune`` next to this interpreter, else the module."""
    script = Path(sys.executable).parent / "ssl-tune"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tuning.cli"]


def time_once(arguments: list[str], cwd: Path) -> tuple[float, int, str]:
    """(wall seconds, exit code, last stderr line) of one run."""
    start = time.perf_counter()
    result = subprocess.run([*command_line(), *arguments], cwd=cwd, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    return elapsed, result.returncode, (result.stderr.strip().splitlines() or [""])[-1]


def measure(rounds: int) -> pd.DataFrame:
    """Median and max wall time of each command over ``rounds`` interleaved rounds."""
    times: dict[str, list[float]] = {label: [] for label in COMMANDS}
    outcome: dict[str, tuple[int, str]] = {}
    with tempfile.TemporaryDirectory(prefix="cli-latency-") as folder:
        (Path(folder) / "broken.yaml").write_text("params: [unclosed")
        for _ in range(rounds):
            for label, arguments in COMMANDS.items():
                seconds, code, line = time_once(arguments, Path(folder))
                times[label].append(seconds)
                outcome[label] = (code, line)
    floor = statistics.median(times["--help"])
    rows = []
    for label, values in times.items():
        code, line = outcome[label]
        goal = NETWORK_GOAL_S if any(mark in label for mark in NETWORK) else GOAL_S
        rows.append({"command": f"`ssl-tune {label}`", "exit": code, "median s": statistics.median(values),
                     "max s": max(values), "goal s": goal, "within goal": max(values) <= goal,
                     "x --help": statistics.median(values) / floor,
                     "one line": "-" if label == "--help" else str(line.startswith("ssl-tune: error: "))})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="replace the section in bench/RESULTS.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    table = measure(args.rounds)
    load_after = os.getloadavg()[0]
    section = (
        f"## CLI error latency\n\n{time.strftime('%Y-%m-%d %H:%M')}, {machine()}, "
        f"`python -m bench.cli_error_latency --rounds {args.rounds}`. "
        f"{os.cpu_count()} CPU cores, load average {load_before:.1f} before and {load_after:.1f} after (shared "
        f"machine); {args.rounds} interleaved rounds, each command a fresh process in an empty folder. Goal: "
        f"an error that needs no data within {GOAL_S:g} s, one that asks a cluster, storage or server within "
        f"{NETWORK_GOAL_S:g} s.\n\n{markdown_table(table, digits=2)}\n"
    )
    print(section)
    if args.write:
        replace_section("CLI error latency", section)


if __name__ == "__main__":
    main()
