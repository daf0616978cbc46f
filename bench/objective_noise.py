"""How noisy is the search objective? The default config, several seeds, val kNN under two protocols.

The noise of the val score is split into three parts, each a standard deviation in accuracy points:

- **val sampling**: bootstrap over the val images (1,000 resamples) of the last epoch's correct/incorrect
  vector, mean over seeds;
- **seed**: std over seeds of the last epoch's val;
- **epoch jitter**: std of the last 3 epochs' val within a run, mean over seeds.

Two kNN protocols are compared on the *same* features: the ImageNet one (k=200, T=0.1) and the fitted one
(k=20 clipped to the smallest class, T=0.07). Two ways to lower the noise without reading test are measured
too: the objective as the mean val of the last 3 epochs, and leave-one-out kNN over the pooled eval-train
and val images (more images judged, the same labels the search already uses).

    python -m bench.objective_noise [--seeds 5] [--epochs 20] [--write]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from bench.common import append_section, machine, markdown_table
from ssl_train import load_config
from ssl_train.config import EvalConfig, TrainConfig
from ssl_train.data import DatasetSplits, load_splits
from ssl_train.evaluation.features import extract_features
from ssl_train.evaluation.knn import fitted_knn_k, knn_predict, pixel_knn_accuracy
from ssl_train.training.loop import Trainer, WorkerContext

PROTOCOLS = {"k=200, T=0.1": (200, 0.1), "fitted k=20, T=0.07": (20, 0.07)}
BOOTSTRAPS = 1000
LAST = 3


@dataclass
class EpochFeatures:
    """The backbone's features of the labeled sets after one epoch (epoch 0 = random init)."""

    epoch: int
    steps: int
    eval_train: torch.Tensor
    val: torch.Tensor


def train_with_features(config: TrainConfig, splits: DatasetSplits) -> list[EpochFeatures]:
    """Train ``config`` in this process and keep the eval-train and val features at random init and after
    every epoch."""
    found: list[EpochFeatures] = []

    def features_now(epoch: int) -> EpochFeatures:
        backbone = trainer.method.backbone
        return EpochFeatures(epoch, epoch * trainer.steps_per_epoch,
                             extract_features(backbone, splits.eval_train.images),
                             extract_features(backbone, splits.val.images))

    trainer = Trainer(config, lambda metrics, _checkpoint: found.append(features_now(int(metrics["epoch"]))),
                      WorkerContext(), splits=splits)
    found.append(features_now(0))
    trainer.fit()
    return found


def correct(features: EpochFeatures, splits: DatasetSplits, k: int, temperature: float) -> np.ndarray:
    """Per val image: does the kNN vote over eval-train get its class right?"""
    k = fitted_knn_k(k, splits.eval_train.labels)
    predicted = knn_predict(features.eval_train, splits.eval_train.labels, features.val, splits.num_classes, k,
                            temperature)
    return (predicted == splits.val.labels).numpy()


def leave_one_out_correct(features: EpochFeatures, splits: DatasetSplits, k: int, temperature: float) -> np.ndarray:
    """Per image of eval-train + val: does the kNN vote over all *other* pooled images get its class right?"""
    pooled = F.normalize(torch.cat([features.eval_train, features.val]), dim=1)
    labels = torch.cat([splits.eval_train.labels, splits.val.labels])
    k = fitted_knn_k(k, labels)
    similarity = pooled @ pooled.T
    similarity.fill_diagonal_(-2.0)  # never its own neighbour
    top_sim, top_idx = similarity.topk(k, dim=1)
    votes = torch.zeros(len(pooled), splits.num_classes)
    votes.scatter_add_(1, labels[top_idx], ((top_sim - top_sim[:, :1]) / temperature).exp())
    return (votes.argmax(dim=1) == labels).numpy()


def bootstrap_std(rows: list[np.ndarray], rng: np.random.Generator) -> float:
    """Std of the mean over ``rows`` (one correctness vector per epoch, same images) under resampled images."""
    stacked = np.stack(rows)  # [epochs, N]
    draws = rng.integers(0, stacked.shape[1], size=(BOOTSTRAPS, stacked.shape[1]))
    return float(stacked[:, draws].mean(axis=(0, 2)).std(ddof=1))


def noise_rows(runs: list[list[EpochFeatures]], splits: DatasetSplits) -> pd.DataFrame:
    """The three noise parts, per protocol and per objective (last epoch, mean of last 3, leave-one-out)."""
    rng = np.random.default_rng(0)
    rows = []
    for name, (k, temperature) in PROTOCOLS.items():
        for objective, score in (("val, last epoch", correct), ("leave-one-out eval-train+val", leave_one_out_correct)):
            per_run = [[score(f, splits, k, temperature) for f in run[-LAST:]] for run in runs]
            last = [epochs[-1].mean() for epochs in per_run]
            mean_last = [np.mean([e.mean() for e in epochs]) for epochs in per_run]
            jitter = np.mean([np.std([e.mean() for e in epochs], ddof=1) for epochs in per_run])
            random_init = np.mean([score(run[0], splits, k, temperature).mean() for run in runs])
            for label, values, bootstrap in (
                (objective, last, np.mean([bootstrap_std([e[-1]], rng) for e in per_run])),
                (f"{objective}, mean of last {LAST}", mean_last, np.mean([bootstrap_std(e, rng) for e in per_run])),
            ):
                rows.append({
                    "protocol": name, "objective": label, "mean": float(np.mean(values)),
                    "random init": float(random_init),
                    "val sampling std": 100 * bootstrap, "seed std": 100 * float(np.std(values, ddof=1)),
                    "epoch jitter std": 100 * float(jitter) if "mean of" not in label else float("nan"),
                })
    return pd.DataFrame(rows)


def raw_pixel_val(splits: DatasetSplits) -> dict[str, float]:
    """The raw-pixel baseline on val under each protocol (``pixel_knn_accuracy``, k fitted as in every run)."""
    return {name: pixel_knn_accuracy(splits, EvalConfig(knn_k=k, knn_temperature=t), split="val")
            for name, (k, t) in PROTOCOLS.items()}


def command_line(script: str, args: argparse.Namespace) -> str:
    """How a default-config benchmark was run, as its RESULTS section quotes it."""
    return (f"`python -m bench.{script} --seeds {args.seeds} --epochs {args.epochs}"
            + "".join(f" --set {o}" for o in args.overrides) + "`")


def default_runs_setup(doc: str, seeds: int, epochs: int) -> tuple[argparse.Namespace, TrainConfig, DatasetSplits]:
    """The command line of a benchmark that trains the default config with several seeds (``--seeds``,
    ``--epochs``, ``--set``, ``--write``), its base config (no test read) and its data."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--write", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()
    base = load_config(overrides=[f"optim.epochs={args.epochs}", "eval.test_at_end=false", *args.overrides])
    return args, base, load_splits(base.data)


def main() -> None:
    args, base, splits = default_runs_setup(__doc__, seeds=5, epochs=20)
    started = time.perf_counter()
    runs = [train_with_features(base.replace({"seed": seed}), splits) for seed in range(args.seeds)]
    seconds = time.perf_counter() - started
    table = noise_rows(runs, splits)
    per_epoch = pd.DataFrame(
        {"epoch": f.epoch, "steps": f.steps, "seed": seed, **{
            name: float(correct(f, splits, k, t).mean()) for name, (k, t) in PROTOCOLS.items()}}
        for seed, run in enumerate(runs) for f in run
    )
    curve = per_epoch.groupby(["epoch", "steps"]).mean(numeric_only=True).drop(columns="seed").reset_index()
    pixels = raw_pixel_val(splits)
    text = (
        f"## Objective noise ({time.strftime('%Y-%m-%d')}, {machine()})\n\n"
        + command_line("objective_noise", args) + f": the default config ({base.method}, "
        f"{base.data.source} at {base.data.image_size} px, batch {base.optim.batch_size}, lr {base.optim.lr:g}), "
        f"{args.seeds} seeds, {len(splits.val)} val images, {len(splits.eval_train)} eval-train images; "
        f"{seconds:.0f} s of training. Noise in accuracy points (std).\n\n"
        + markdown_table(table) + "\n\nVal kNN accuracy by epoch, mean over seeds (epoch 0 = random init); raw pixels: "
        + ", ".join(f"{name} {value:.3f}" for name, value in pixels.items()) + "\n\n" + markdown_table(curve) + "\n"
    )
    print(text)
    if args.write:
        append_section(text)


if __name__ == "__main__":
    main()
