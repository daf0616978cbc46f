"""The ``ssl-tune`` command line.

Bad input is one line, ``ssl-tune: error: ...`` with exit code 2, within seconds: each command checks its
arguments and config before it imports torch, MLflow or Ray (seconds of imports), and :func:`main` turns
the errors that reach the user (ours, YAML's, MLflow's, the OS's) into that line.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_train.config import (
    BackboneConfig,
    ConfigError,
    TrainConfig,
    check_at_least,
    load_config,
    min_image_size,
    parse_override,
)
from ssl_train.data import uris
from ssl_train.status import Status
from ssl_train.training.resources import check_in_process, local_gpu_count
from tuning.cli_args import (
    DEMO_CONFIRM_SEEDS,
    DEMO_CONFIRM_TOP,
    DEMO_DATA,
    DEMO_RECIPE,
    DEMO_SCALE,
    DEMO_SPACE,
    DEMO_START,
    DEMO_SWEEP_EPOCHS,
    DEMO_TRIALS,
    build_parser,
    parse_duration,
    parse_workers,
)
from tuning.server import check_reachable
from tuning.settings import check_settings, check_sweep_name, confirmation_looks

if TYPE_CHECKING:
    from tuning.settings import SweepSettings


def scaling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--workers``, ``--gpus-per-worker`` and ``--max-failures`` as dotted config overrides."""
    overrides: dict[str, Any] = parse_workers(args.workers) if args.workers else {}
    if args.gpus_per_worker:
        overrides.update({"scaling.use_gpu": True, "scaling.gpus_per_worker": args.gpus_per_worker})
    if args.max_failures is not None:
        overrides["scaling.max_failures"] = args.max_failures
    return overrides


def check_destination(path: Path, flag: str, *, folder: bool = False, overwrite: bool = True) -> None:
    """Refuse, before any work, a destination ``path`` (a file, or with ``folder`` a folder) that cannot be
    written: under a file, a folder where a file goes or the reverse, an existing file without ``overwrite``,
    or where no file can be created (probed with a temporary file in the nearest existing folder)."""
    if path.exists() and path.is_dir() != folder:
        raise ConfigError(f"{flag} '{path}' is a {'file' if folder else 'folder'}; give a "
                          f"{'folder' if folder else 'file name'}")
    if path.is_file() and not overwrite:
        raise ConfigError(f"{flag} '{path}' exists; pass --overwrite to replace it, or choose another name")
    nearest = next(p for p in (path, *path.parents) if p.exists()) if folder else \
        next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not nearest.is_dir():
        raise ConfigError(f"{flag} '{path}' lies under '{nearest}', which is a file")
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as error:
        raise ConfigError(f"{flag} '{path}': no file can be created in '{nearest}' ({error.strerror})") from None


def config_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> TrainConfig:
    overrides: dict[str, Any] = dict(parse_override(text) for text in args.overrides)
    overrides.update(scaling_overrides(args))
    if args.storage:
        overrides["scaling.storage"] = args.storage
    overrides.update(extra or {})
    return check_data_reachable(load_config(args.config, overrides))


def check_data_reachable(config: TrainConfig) -> TrainConfig:
    """``config``, once its remote data locations answer (checked before the imports that reading them needs)."""
    for key in ("path", "labeled_path"):
        if location := getattr(config.data, key):
            uris.check_reachable(location, f"data.{key}")
    return config


def format_epoch(metrics: dict[str, Any]) -> str:
    """One epoch as a line: the val metrics every epoch, the test ones on the line of the finished run."""
    parts = [f"epoch {metrics['epoch']}", f"loss {metrics['loss']:.4f}"]
    for key, label, fmt in (
        ("val_knn_acc", "val knn", ".4f"), ("val_linear_acc", "val linear", ".4f"), ("val_feature_std", "std", ".3f"),
        ("val_rankme", "RankMe", ".1f"), ("tau", "tau", ".4f"), ("images_per_s", "img/s", ".0f"),
        ("test_knn_acc", "TEST knn", ".4f"), ("test_linear_acc", "TEST linear", ".4f"),
    ):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:{fmt}}")
    if metrics.get("workers", 1) > 1:
        parts.append(f"workers {metrics['workers']}")
    return "  ".join(parts)


def cmd_train(args: argparse.Namespace) -> int:
    extra = {"output_dir": str(args.output)} if args.output else {}
    config = config_from_args(args, extra)  # invalid values fail here, before the imports below
    check_destination(Path(config.output_dir), "--output", folder=True)
    uris.check_ray_address(args.address)

    from ssl_train.config import check_batch_fits
    from ssl_train.data import load_splits
    from ssl_train.training.run import check_device, previous_run, train
    from tuning.tracking import RunTracker, default_tracking_uri, git_commit, labels_tag

    previous_run(config.output_dir, args.resume, args.overwrite)  # refused before any data loads
    check_device(config, args.address)
    splits = load_splits(config.data)
    print(splits.summary())
    if splits.ssl_train is not None:  # a streamed set is counted by the workers that receive it
        check_batch_fits(config, len(splits.ssl_train))
    tracker = RunTracker(args.tracking_uri or default_tracking_uri(), args.experiment)
    commit = git_commit()
    tags = {"method": config.method, "dataset": config.data.source, **labels_tag(splits.num_classes),
            **({"git_commit": commit} if commit else {})}
    run_id = tracker.create_run(Path(config.output_dir).name, config.flat(), tags)

    def on_epoch(metrics: dict[str, Any]) -> None:
        print(format_epoch(metrics), flush=True)
        tracker.log_epoch(run_id, metrics, metrics["epoch"], int(time.time() * 1000))

    print(f"training {config.method} on {config.data.source}, {config.optim.epochs} epochs -> {config.output_dir}")
    try:
        summary = train(config, resume=args.resume, overwrite=args.overwrite, on_epoch=on_epoch,
                        show_progress=sys.stderr.isatty(), address=args.address, splits=splits)
    except BaseException as error:
        tracker.end_run(run_id, Status.FAILED, f"{type(error).__name__}: {error}"[:500])
        raise
    for artifact in (summary.output_dir / "config.yaml", summary.backbone_path):
        if artifact is not None:
            tracker.client.log_artifact(run_id, str(artifact))
    if summary.backbone_path is not None:
        from ssl_train.export.mlflow_model import log_embedding_model
        from ssl_train.training.run import load_backbone

        scores = {key: f"{summary.metrics[key]:.4f}" for key in ("val_knn_acc", "test_knn_acc", "val_rankme")
                  if key in summary.metrics}
        model_uri = log_embedding_model(tracker.tracking_uri, run_id, load_backbone(summary.output_dir), config,
                                        register=args.register, tags=scores)
        print(f"MLflow Model: {model_uri}  (embed images: ssl-tune embed {model_uri} IMAGES --out emb.parquet)")
    tracker.end_run(run_id, summary.status, f"{len(summary.history)} epochs, {summary.restarts} restarts")
    print(f"status: {summary.status}  restarts: {summary.restarts}  MLflow run: {run_id}")
    if summary.backbone_path:
        print(f"backbone weights: {summary.backbone_path}")
    if summary.checkpoint:
        print(f"full checkpoint:  {summary.checkpoint}")
    return 0 if summary.status == Status.FINISHED else 1


def cmd_embed(args: argparse.Namespace) -> int:
    check_at_least(args, {"batch_size": 1})
    check_destination(args.out, "--out")
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from ssl_train.data import load_images
    from ssl_train.export.embedding import embed_batches
    from ssl_train.training.run import load_embedding_model

    if args.gpu and not torch.cuda.is_available():
        raise ConfigError("--gpu: no CUDA device is visible here; run without --gpu to embed on the CPU")
    model = load_embedding_model(args.model, args.tracking_uri)
    images, names, skipped = load_images(str(args.images), model.image_size)
    device = "cuda" if args.gpu else "cpu"
    vectors = torch.cat(list(embed_batches(model, images.images, args.batch_size, device, sys.stderr.isatty())))
    labels = pa.array([None if label < 0 else label for label in images.labels.tolist()], pa.int64())
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.flatten().numpy()), vectors.shape[1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"path": names, "label": labels, "embedding": embedding}), args.out)
    print(f"wrote {len(names)} embeddings of dimension {vectors.shape[1]} to {args.out}; "
          f"skipped {len(skipped)} unreadable" + (f" (e.g. {skipped[0]})" if skipped else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_destination(args.onnx, "--onnx")
    from ssl_train.export.embedding import export_onnx
    from ssl_train.training.run import load_embedding_model

    model = load_embedding_model(args.model, args.tracking_uri)
    args.onnx.parent.mkdir(parents=True, exist_ok=True)
    try:
        path = export_onnx(model, args.onnx)
    except ImportError as error:
        raise ConfigError(f"ONNX export needs the onnx and onnxscript packages ({error}); "
                          "pip install 'ssl-tune[export]'") from None
    print(f"wrote {path}: uint8 images [N, 3, {model.image_size}, {model.image_size}] -> embeddings")
    return 0


def cmd_to_parquet(args: argparse.Namespace) -> int:
    digits = str(args.src) == "digits"
    if digits:
        check_at_least(args, {"image_size": min_image_size(BackboneConfig())})
    from ssl_train.data.convert import DIGITS_FILES, digits_to_parquet, folder_to_parquet

    for path in [args.dst / name for name in DIGITS_FILES] if digits else [args.dst]:
        check_destination(path, "DST", overwrite=args.overwrite)
    if not digits:
        rows = folder_to_parquet(args.src, args.dst)
        print(f"wrote {rows} images to {args.dst}")
        return 0
    unlabeled, labeled = digits_to_parquet(args.dst, args.image_size)
    print(f"wrote the digits default as {unlabeled} (SSL-train images) and {labeled} (labeled); train on it with\n"
          f"  --set data.source=parquet --set data.path={unlabeled} --set data.labeled_path={labeled} "
          f"--set data.image_size={args.image_size} [--set data.streaming=true]")
    return 0


def cmd_augment_preview(args: argparse.Namespace) -> int:
    check_at_least(args, {"images": 1})
    check_destination(args.out, "--out")
    config = config_from_args(args)
    from ssl_train.augment.preview import save_preview
    from ssl_train.data import load_splits

    splits = load_splits(config.data)
    path = save_preview(config, splits.preview(args.images), args.out, num_images=args.images, seed=config.seed)
    print(f"wrote {path}")
    return 0


def sets_key(overrides: list[str], key: str) -> bool:
    """Whether one of the ``key=value`` overrides sets ``key``."""
    return any(parse_override(text)[0] == key for text in overrides)


def warmup_within(args: argparse.Namespace, epochs: int) -> list[str]:
    """The override that shortens the config's warm-up to ``epochs`` when it is longer and the user did not set
    it (the default 2 epochs under ``--epochs 1``); says so. ``[]`` otherwise."""
    if sets_key(args.overrides, "optim.warmup_epochs"):
        return []
    warmup = load_config(args.config, list(args.overrides)).optim.warmup_epochs
    if warmup <= epochs:
        return []
    print(f"--epochs {epochs}: warm-up shortened from {warmup} to {epochs} epochs "
          f"(set optim.warmup_epochs to choose another)")
    return [f"optim.warmup_epochs={epochs}"]


def sweep_settings(args: argparse.Namespace) -> SweepSettings:
    """What ``ssl-tune tune`` was asked for, checked; without ``--config`` or ``data.source``, the demo's data,
    trial count and confirmation size."""
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs {args.epochs} is invalid; it must be >= 1")
    overrides = list(args.overrides)
    demo = not (args.config or args.resume or sets_key(overrides, "data.source"))
    check_sweep_name(args.resume or args.name, "--resume" if args.resume else "--name")  # before anything is written
    if demo:
        scale = [o for o in DEMO_SCALE if not sets_key(overrides, o.partition("=")[0])]
        overrides[:0] = [f"data.source={DEMO_DATA}", *scale, *DEMO_RECIPE]
    epochs = args.epochs or (None if args.config or sets_key(overrides, "optim.epochs") else DEMO_SWEEP_EPOCHS)
    if epochs and not args.resume:  # a resumed sweep keeps the overrides it started with
        overrides += [f"optim.epochs={epochs}", *warmup_within(args, epochs)]
    overrides += [f"{key}={json.dumps(value)}" for key, value in scaling_overrides(args).items()]
    if not args.resume:  # invalid values fail here, before the imports below (a resume checks its saved ones)
        check_data_reachable(load_config(args.config, overrides))
    uris.check_ray_address(args.address)
    from tuning.settings import SweepSettings

    default_trials = 0 if args.resume else DEMO_TRIALS if demo else SweepSettings.trials  # a resume: as it had
    confirm_top = DEMO_CONFIRM_TOP if demo else SweepSettings.confirm_top
    confirm_top = confirm_top if args.confirm_top is None else args.confirm_top
    return SweepSettings(
        space=args.space or (DEMO_SPACE if demo else SweepSettings.space), start=DEMO_START if demo else
        SweepSettings.start, config=str(args.config) if args.config else None, overrides=overrides,
        trials=default_trials if args.trials is None else args.trials, min_epochs=args.min_epochs,
        concurrency=args.concurrency, searcher=args.searcher, perturb_every=args.perturb_every,
        scheduler=args.scheduler, objective=args.objective, seed=args.seed, name=args.resume or args.name,
        storage=args.storage, tracking_uri=args.tracking_uri, experiment=args.experiment, keep_best=args.keep_best,
        trial_time_limit_s=parse_duration(args.trial_time_limit) if args.trial_time_limit else None,
        time_budget_s=parse_duration(args.time_budget) if args.time_budget else None, address=args.address,
        confirm=not args.no_confirm, confirm_top=confirm_top, confirm_seeds=(
            DEMO_CONFIRM_SEEDS if demo else SweepSettings.confirm_seeds) if args.confirm_seeds is None else
        args.confirm_seeds, min_effect=args.min_effect, max_confirm_seeds=args.max_confirm_seeds,
        register=args.register, keep_checkpoints=args.keep_checkpoints,
        start_timeout_s=parse_duration(args.start_timeout) if args.start_timeout not in ("0", "0s") else None,
    )


def cmd_tune(args: argparse.Namespace) -> int:
    settings = sweep_settings(args)
    _, base, _ = check_settings(settings, bool(args.resume))  # before the imports of Ray, Tune, MLflow and torch
    uris.check(settings.storage, "--storage")
    check_reachable(settings.tracking_uri or "")
    if base.scaling.use_gpu and not settings.address:  # the local cluster has this machine's GPUs
        check_in_process(base, local_gpu_count())
    from tuning.finish import finish_sweep
    from tuning.interrupt import Interruption
    from tuning.sweep import run_sweep

    interruption = Interruption()
    resume_line = (f"\nsweep interrupted; continue it with: ssl-tune tune --resume {settings.name} "
                   f"--storage {args.storage}")
    search, confirm = run_sweep(settings, resume=bool(args.resume), interruption=interruption)
    if interruption.interrupted:
        print(resume_line)
        return 130
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C, while the report is written
    try:
        outcome = finish_sweep(settings, search, confirm)
    except KeyboardInterrupt:  # the trials are saved: --resume writes the report again
        print(resume_line)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"\nsearch trials of {outcome.name}, best first by val {settings.objective} at each trial's last epoch, "
          f"0 when diverged or collapsed (the split the search selected on; optimistic for the best trial):\n"
          f"{outcome.table_text}\n")
    print(f"MLflow: parent run {outcome.parent_run_id} in {settings.tracking_uri}  (browse: ssl-tune ui)")
    if outcome.model_uri:
        print(f"MLflow Model of the winner: {outcome.model_uri}  (ssl-tune embed {outcome.model_uri} IMAGES)")
    print(f"Optuna study: optuna-dashboard sqlite:///{outcome.path / 'optuna.db'}")
    print(outcome.disk_line())
    print(f"\n'default' is the start: {settings.start}")
    if outcome.confirmation_text and outcome.margin is None:  # the data has no labels
        print(f"confirmation by val {settings.objective} (no labels: no accuracy was measured):\n"
              f"{outcome.confirmation_text}")
    elif outcome.confirmation_text:
        print(f"confirmation on the untouched test split:\n{outcome.confirmation_text}")
    else:
        print("no confirmation (--no-confirm): no test score was measured; the config below is the best search "
              "trial by val, whose val score is optimistic")
    print(f"what the winner changes in the start: {outcome.change}")
    print(f"train with it: ssl-tune train --config {outcome.best_config_path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tuning.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    uris.check_store(uri)  # MLflow would create an empty store to report on
    from tuning.report import format_table, load_confirmation, load_report, load_study, write_plots

    report = load_report(uri, args.sweep, args.experiment)
    print(f"sweep {report.name} ({len(report.table)} search trials, objective on val):")
    print(format_table(report, args.top))
    params = report.parent_params
    loaded = load_confirmation(report, uri, params.get("sweep.objective", "knn_acc"), args.experiment,
                               confirmation_looks(params.get("sweep.confirm_seeds"),
                                                  int(params.get("sweep.max_confirm_seeds", 10))),
                               float(params.get("sweep.min_effect", 0)))
    if loaded is not None:
        print(f"\nconfirmation ({'test' if loaded[0].accuracy_measured else 'val only: no labels'}):\n"
              f"{loaded[0].table()}")
    if args.plots:
        for path in write_plots(load_study(report, uri), args.plots, loaded[0] if loaded else None):
            print(f"wrote {path}")
    return 0


def check_port(host: str, port: int) -> None:
    """Refuse a port outside 1-65535, or one that cannot be bound on ``host`` (another server holds it)."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is invalid; it must lie in 1-65535")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            probe.bind(address)
    except OSError as error:
        raise ConfigError(f"--host {host} --port {port}: cannot serve there ({error.strerror or error}); "
                          "another server may hold the port: choose another --port") from None


def runs_page(tracking_uri: str, experiment: str) -> str:
    """The UI route of ``experiment``'s runs page (MLflow 3's UI opens an experiment on its GenAI overview),
    or "" when the tracking store is not local or does not hold the experiment yet."""
    path = uris.local_store(tracking_uri)
    if path is None or not path.exists():
        return ""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    return f"#/experiments/{found.experiment_id}/runs" if found else ""


def run_process_group(command: list[str], grace_s: float = 15.0) -> int:
    """Run ``command`` in a process group of its own and end the whole group (a server and the processes it
    started) with this process: on Ctrl-C (exit 130), on SIGTERM (143), or when the command exits."""
    process = subprocess.Popen(command, start_new_session=True)  # Ctrl-C reaches this process alone

    def terminated(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        deadline = time.monotonic() + grace_s
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, signum)
                while time.monotonic() < deadline:
                    if process.poll() is not None:
                        os.killpg(process.pid, 0)  # ProcessLookupError once the group is empty
                    time.sleep(0.1)
            except ProcessLookupError:
                break
        process.wait()


def cmd_ui(args: argparse.Namespace) -> int:
    check_port(args.host, args.port)
    from tuning.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    url = f"http://{args.host}:{args.port}/{runs_page(uri, args.experiment)}"
    print(f"MLflow UI for {uri} at {url}  (Ctrl-C stops it)", flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
               "--port", str(args.port), "--workers", "1"]  # one local user: one worker starts in a fraction
    # No job runner: its 7 processes (~1.7 GB) run MLflow's GenAI jobs, which ssl-tune never starts.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return run_process_group(command)


# The errors that reach the user as one line, besides ConfigError, OSError and LookupError, by the module that
# defines them: one that is not imported yet has raised none, so main() need not import it (seconds for some).
USER_ERRORS = {
    "search_spaces.loader": "SearchSpaceError", "ssl_train.data.sets": "DataError",
    "ssl_train.training.loop": "RunFailedError", "ssl_train.training.run": "BackboneError",
    "ssl_train.data.uris": "LocationError", "tuning.server": "TrackingError", "tuning.finish": "NothingScored",
    "yaml": "YAMLError", "mlflow.exceptions": "MlflowException",
}


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types :func:`main` prints as one line, of the modules imported so far."""
    loaded = [getattr(sys.modules[module], name) for module, name in USER_ERRORS.items() if module in sys.modules]
    return (ConfigError, OSError, LookupError, *loaded)


def one_line(error: BaseException) -> str:
    """The error's message on one line (YAML and MLflow messages span several)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


HANDLERS = {"train": cmd_train, "tune": cmd_tune, "embed": cmd_embed, "export": cmd_export, "report": cmd_report,
            "ui": cmd_ui, "to_parquet": cmd_to_parquet, "augment_preview": cmd_augment_preview}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return HANDLERS[args.handler](args)
    except Exception as error:
        if not isinstance(error, user_errors()):
            raise
        print(f"ssl-tune: error: {one_line(error)}", file=sys.stderr)
        return 2


def run() -> None:
    """The ``ssl-tune`` command: :func:`main`, then the exit handlers (Ray's shutdown, logging's flush), then exit
    without the interpreter's teardown of the torch, Ray, MLflow and scikit-learn modules, which adds about 3 s to
    every command and does nothing a finished command needs. An exception still exits the usual way."""
    code = main()
    atexit._run_exitfuncs()  # the handlers sys.exit would run (CPython's, stable since Python 2)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
