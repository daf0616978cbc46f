"""Search modes at equal epochs: PBA (``--searcher pbt``) against TPE + ASHA and random + ASHA, each confirmed
with ``--confirm-seeds auto`` on the test split (issue 34, point 5).

Every mode starts from the demo's recipe (BYOL paper views on MNIST-5k at the demo's scale and epochs) and searches
the demo's space (``search_spaces/adapt.yaml``: crop, flips, strength, lr, tau, every knob schedulable). TPE and
random run 8 trials with ASHA; PBA runs a population of 6 members for the trials' epochs each, about what ASHA
leaves of 8 trials. The epochs each search trained are counted from its trials' reports (one a trained epoch; a PBT
member's copied epochs are not counted twice). Figures per mode and seed: search epochs, the winner and its change
in words, the confirmed test margin over the start with its interval, and the seeds auto-confirmation used.

    python -m bench.search_modes [--seeds 0 1 2 3 4] [--modes pba tpe random] [--write]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench.common import machine, markdown_table, replace_section
from tuning.cli import sweep_settings
from tuning.cli_args import build_parser
from tuning.finish import finish_sweep
from tuning.sweep import run_sweep

MODES = {  # name -> the ssl-tune tune arguments that make it
    "pba": ["--searcher", "pbt", "--trials", "6"],
    "tpe": ["--searcher", "tpe", "--trials", "8"],
    "random": ["--searcher", "random", "--trials", "8"],
}
LABELS = {"pba": "PBA (pbt, 6 members)", "tpe": "TPE + ASHA (8 trials)", "random": "random + ASHA (8 trials)"}


def run_mode(mode: str, seed: int, folder: Path) -> dict[str, object]:
    """One sweep of ``mode`` at the demo's scale, confirmed with --confirm-seeds auto; what it found and spent."""
    args = build_parser().parse_args([
        "tune", "--seed", str(seed), "--name", f"{mode}-{seed}", "--storage", str(folder / "sweeps"),
        "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", "--confirm-seeds", "auto", *MODES[mode]])
    settings = sweep_settings(args)
    started = time.perf_counter()
    search, confirm = run_sweep(settings)
    outcome = finish_sweep(settings, search, confirm)
    seeds = re.search(r"seeds: (\d+) of at most", outcome.confirmation_text or "")
    margin = outcome.margin
    return {"mode": LABELS[mode], "seed": seed, "search epochs": sum(len(r.metrics_dataframe) for r in search),
            "winner's change": outcome.change, "margin (test)": margin.difference, "95 % low": margin.low,
            "95 % high": margin.high, "positive at 95 %": margin.significant,
            "confirm seeds": int(seeds.group(1)) if seeds else 3, "wall s": round(time.perf_counter() - started)}


def summary(table: pd.DataFrame) -> list[str]:
    lines = []
    for mode, part in table.groupby("mode", sort=False):
        lines.append(f"- {mode}: positive at 95 % in {int(part['positive at 95 %'].sum())} of {len(part)} seeds; "
                     f"mean margin {part['margin (test)'].mean():+.4f}; search epochs "
                     f"{part['search epochs'].mean():.0f} on average; confirmation seeds "
                     f"{part['confirm seeds'].tolist()}.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--write", action="store_true", help="replace the section in bench/RESULTS.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ssl-tune-modes-") as folder:
        for seed in args.seeds:
            for mode in args.modes:
                rows.append(run_mode(mode, seed, Path(folder)))
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    text = (f"## Search modes: PBA against TPE and random\n\n{time.strftime('%Y-%m-%d')}, {machine()}. "
            f"`python -m bench.search_modes --seeds {' '.join(map(str, args.seeds))}`: the demo's start and space, "
            "each mode confirmed with `--confirm-seeds auto` (3 seeds, then 2 more a round for the winner and the "
            "start while undecided, at most 10); test split only.\n\n"
            + markdown_table(table) + "\n\n" + "\n".join(summary(table)) + "\n")
    print(text)
    if args.write:
        replace_section("Search modes: PBA against TPE and random", text)


if __name__ == "__main__":
    main()
