"""The ``ssl-tune`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ssl_train.config import ConfigError, TrainConfig, load_config, parse_override


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
    parser.add_argument("--config", type=Path, help="YAML config (defaults: the embedded digits BYOL run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by dotted path, e.g. --set optim.lr=0.05 (repeatable)")
    parser.add_argument("--workers", help="Ray Train workers: N, or MIN:MAX for an elastic run (default 1, in-process)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (turns on scaling.use_gpu)")
    parser.add_argument("--max-failures", type=int, help="worker-group restarts allowed before the run fails")
    parser.add_argument("--storage", help="checkpoint storage for Ray (a shared path or URI on multi-node clusters)")
    parser.add_argument("--address", help="join an existing Ray cluster, e.g. auto or ray://host:10001")


def config_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> TrainConfig:
    overrides: dict[str, Any] = dict(parse_override(text) for text in args.overrides)
    if args.workers:
        overrides.update(parse_workers(args.workers))
    if args.gpus_per_worker:
        overrides.update({"scaling.use_gpu": True, "scaling.gpus_per_worker": args.gpus_per_worker})
    if args.max_failures is not None:
        overrides["scaling.max_failures"] = args.max_failures
    if args.storage:
        overrides["scaling.storage"] = args.storage
    overrides.update(extra or {})
    return load_config(args.config, overrides)


def format_epoch(metrics: dict[str, Any]) -> str:
    parts = [f"epoch {metrics['epoch']}", f"loss {metrics['loss']:.4f}"]
    for key, label, fmt in (
        ("knn_acc", "knn", ".4f"), ("linear_acc", "linear", ".4f"), ("feature_std", "std", ".3f"),
        ("feature_rank", "rank", ".1f"), ("tau", "tau", ".4f"), ("images_per_s", "img/s", ".0f"),
    ):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:{fmt}}")
    if metrics.get("workers", 1) > 1:
        parts.append(f"workers {metrics['workers']}")
    return "  ".join(parts)


def cmd_train(args: argparse.Namespace) -> int:
    from ssl_train.run import train

    extra = {"output_dir": str(args.output)} if args.output else {}
    config = config_from_args(args, extra)
    print(f"training {config.method} on {config.data.source}, {config.optim.epochs} epochs -> {config.output_dir}")
    summary = train(config, resume=args.resume, on_epoch=lambda m: print(format_epoch(m), flush=True),
                    show_progress=sys.stderr.isatty(), address=args.address)
    print(f"status: {summary.status}  restarts: {summary.restarts}")
    if summary.backbone_path:
        print(f"backbone weights: {summary.backbone_path}")
    if summary.checkpoint:
        print(f"full checkpoint:  {summary.checkpoint}")
    return 0 if summary.status == "finished" else 1


def cmd_to_parquet(args: argparse.Namespace) -> int:
    from ssl_train.data import folder_to_parquet

    rows = folder_to_parquet(args.src, args.dst)
    print(f"wrote {rows} images to {args.dst}")
    return 0


def cmd_augment_preview(args: argparse.Namespace) -> int:
    from ssl_train.augment import save_preview
    from ssl_train.data import load_splits

    config = config_from_args(args)
    splits = load_splits(config.data, config.seed)
    path = save_preview(config, splits.ssl_train.images, args.out, num_images=args.images, seed=config.seed)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl-tune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one model with one config")
    add_config_arguments(train)
    train.add_argument("--output", type=Path, help="run directory (default: config output_dir)")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    train.set_defaults(handler=cmd_train)

    data = commands.add_parser("data", help="dataset utilities").add_subparsers(dest="data_command", required=True)
    to_parquet = data.add_parser("to-parquet", help="convert an image folder to Parquet (image bytes + label)")
    to_parquet.add_argument("src", type=Path)
    to_parquet.add_argument("dst", type=Path)
    to_parquet.set_defaults(handler=cmd_to_parquet)

    preview = commands.add_parser("augment-preview", help="write a PNG grid of images and their augmented views")
    add_config_arguments(preview)
    preview.add_argument("--out", type=Path, default=Path("augment-preview.png"))
    preview.add_argument("--images", type=int, default=8)
    preview.set_defaults(handler=cmd_augment_preview)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ssl_train.data import DataError

    try:
        return args.handler(args)
    except (ConfigError, DataError, FileNotFoundError) as error:
        print(f"ssl-tune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
