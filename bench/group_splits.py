"""Grouped splits on images that are not independent: is the confirmed margin true on new groups?

The data is ``bench/overlapping_crops.py``'s folder: per class, several source "photos" (groups), each cut into
many overlapping crops. Some groups of every class are set aside before anything runs: no split sees them.
The same sweep (search + confirmation, ``search_spaces/byol.yaml``) runs twice on the rest:

- **random**: images split one by one (no ``data.group_by``), so crops of one photo sit in SSL-train and test;
- **grouped**: ``data.group_by=level:1``, so a photo's crops are all in one split.

For each, the tool's own confirmed test margin (winner minus default, with its printed 95 % interval), beside the
same confirmation checkpoints scored on the set-aside groups: kNN with the run's own eval-train images as memory
and the new groups' crops as queries, paired over seeds like the tool's margin. Goal: with groups, the tool's
margin and the new-groups margin agree in sign, and the new-groups margin lies inside the printed interval.

    python -m bench.group_splits [--trials 8] [--epochs 6] [--write]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import pandas as pd
import ray

from bench.common import append_section, machine, markdown_table
from bench.overlapping_crops import write_overlapping_crops
from ssl_train.data import load_images, load_splits
from ssl_train.evaluation.features import extract_features
from ssl_train.evaluation.knn import fitted_knn_k, knn_accuracy
from ssl_train.status import Status
from ssl_train.training.distributed import checkpoint_state
from ssl_train.training.loop import build_model
from tuning.confirm import DEFAULT_CANDIDATE, paired_margin
from tuning.finish import finish_sweep
from tuning.settings import SweepSettings
from tuning.sweep import run_sweep
from tuning.trial import CONFIRM_KEY, trial_overrides

SMALL = ["data.image_size=16", "backbone.width=16", "optim.warmup_epochs=1"]


def build_data(root: Path, classes: int, groups: int, held_out: int, crops: int) -> tuple[Path, Path]:
    """The tool's folder and the folder of set-aside groups (the last ``held_out`` groups of every class)."""
    tool = write_overlapping_crops(root / "tool", classes=classes, groups_per_class=groups + held_out,
                                   crops_per_group=crops, size=16, seed=0)
    new = root / "new_groups"
    for k in range(classes):
        for j in range(groups, groups + held_out):
            target = new / f"class_{k}" / f"c{k}g{j}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(tool / f"class_{k}" / f"c{k}g{j}"), target)
    return tool, new


def new_group_scores(settings: SweepSettings, confirm: list, new_images: object) -> pd.DataFrame:
    """Per confirmation run: candidate, seed, the tool's val and test, and kNN accuracy on the new groups."""
    base = settings.base_config()
    splits = load_splits(base.data)
    rows = []
    for result in confirm:
        if result.metrics.get("status") != Status.FINISHED or result.checkpoint is None:
            continue
        params = result.config
        config = base.replace(trial_overrides(params))
        model = build_model(config)
        model.load_state_dict(checkpoint_state(result.checkpoint)["method"])
        memory = extract_features(model.backbone, splits.eval_train.images)
        queries = extract_features(model.backbone, new_images.images)
        k = fitted_knn_k(config.eval.knn_k, splits.eval_train.labels)
        new = knn_accuracy(memory, splits.eval_train.labels, queries, new_images.labels, splits.num_classes, k,
                           config.eval.knn_temperature)
        rows.append({"candidate": params[CONFIRM_KEY]["candidate"], "seed": params[CONFIRM_KEY]["seed_index"],
                     "val": result.metrics[f"val_{settings.objective}"],
                     "test": result.metrics[f"test_{settings.objective}"], "new groups": new})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--groups", type=int, default=8, help="groups per class the tool sees")
    parser.add_argument("--held-out", type=int, default=2, help="groups per class no split sees")
    parser.add_argument("--crops", type=int, default=24, help="crops per group")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--confirm-seeds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ssl-tune-groups-"))
    tool, new = build_data(workdir / "data", args.classes, args.groups, args.held_out, args.crops)
    new_images = load_images(str(new), 16)[0]
    ray.init(address="local", num_cpus=2)  # its own cluster, even when another runs on this machine
    rows, details = [], []
    started = time.perf_counter()
    for split, extra in (("random", []), ("grouped", ["data.group_by=level:1"])):
        settings = SweepSettings(
            name=f"groups-{split}", overrides=[*SMALL, "data.source=folder", f"data.path={tool}",
                                               f"optim.epochs={args.epochs}", *extra],
            trials=args.trials, confirm_top=1, confirm_seeds=args.confirm_seeds, storage=str(workdir / "sweeps"),
            tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}", experiment="bench-groups", min_epochs=2,
        )
        search, confirm = run_sweep(settings)
        outcome = finish_sweep(settings, search, confirm)
        scores = new_group_scores(settings, list(confirm), new_images)
        scores.insert(0, "split", split)
        details.append(scores)
        winner = str(scores.groupby("candidate")["val"].mean().idxmax())  # as the tool picks it: best mean val
        paired = scores.pivot(index="seed", columns="candidate", values="new groups").dropna()
        fresh = paired_margin(paired[winner].tolist(), paired[DEFAULT_CANDIDATE].tolist())
        margin = outcome.margin
        rows.append({
            "split": split, "winner": winner, "tool's margin (test)": margin.difference,
            "printed 95 % interval": f"[{margin.low:+.3f}, {margin.high:+.3f}] ({margin.method})",
            "new-groups margin": fresh.difference, "new-groups 95 %": f"[{fresh.low:+.3f}, {fresh.high:+.3f}]",
            "same sign": (margin.difference > 0) == (fresh.difference > 0),
            "new-groups margin inside printed interval": margin.low <= fresh.difference <= margin.high,
        })
        print(rows[-1], flush=True)
    seconds = time.perf_counter() - started
    table, detail = pd.DataFrame(rows), pd.concat(details)
    summary = detail.groupby(["split", "candidate"])[["val", "test", "new groups"]].mean().reset_index()
    text = "\n".join([
        f"## Grouped splits on overlapping crops ({date.today()}, {machine()})", "",
        f"`python -m bench.group_splits --groups {args.groups} --crops {args.crops} --trials {args.trials} "
        f"--epochs {args.epochs}` ({seconds:.0f} s): "
        f"{args.classes} classes x {args.groups} source photos x {args.crops} overlapping 16 px crops for the tool, "
        f"{args.held_out} more photos a class set aside (no split sees them); BYOL space, "
        f"{args.trials} search trials of {args.epochs} epochs, confirmation top 1 + default x {args.confirm_seeds} "
        "seeds. The new-groups score is kNN with each run's eval-train as memory, paired over seeds.", "",
        markdown_table(table), "", "Per config, mean over seeds:", "", markdown_table(summary), "",
    ])
    print(text)
    if args.write:
        append_section(text)
    ray.shutdown()


if __name__ == "__main__":
    main()
