"""Every error row of the README's failure table, through the real command: one line, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from test_data import _write_class_folder, _write_flat_folder
from test_loop import TINY

from ssl_train.config import ConfigError, load_config
from ssl_train.methods.backbones import build_backbone
from ssl_train.training.checkpoint import list_checkpoints, load_checkpoint
from ssl_train.training.run import train
from tuning.cli import main

SPACE_HEAD = "description: a broken space\n"
BAD_SPACES = {  # file text -> what the one-line message must name
    "not a mapping": ("- just\n- a list\n", "mapping"),
    "no params": (SPACE_HEAD + "fixed: {method: byol}\n", "params"),
    "unknown distribution": (SPACE_HEAD + "params:\n  optim.lr: {normal: [0, 1]}\n", "normal"),
    "low > high": (SPACE_HEAD + "params:\n  optim.lr: {uniform: [0.1, 0.01]}\n", "optim.lr"),
    "loguniform low <= 0": (SPACE_HEAD + "params:\n  optim.lr: {loguniform: [0, 0.1]}\n", "optim.lr"),
    "empty choice": (SPACE_HEAD + "params:\n  optim.batch_size: {choice: []}\n", "optim.batch_size"),
    "unknown key": (SPACE_HEAD + "params:\n  optim.lrr: {uniform: [0.1, 0.2]}\n", "optim.lrr"),
    "when on an unknown key": (
        SPACE_HEAD + "params:\n  optim.lr: {uniform: [0.01, 0.1], when: {no.such: 1}}\n", "no.such"),
}


def ssl_tune(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuning.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and 'File "' not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ssl-tune: error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for name in names:
        assert name in errors[0], errors[0]


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_a_bad_search_space_is_one_line_naming_file_and_key(tmp_path, capsys, case):
    """In process (``main`` returns 2 instead of raising), for each kind of mistake; the subprocess test below
    runs one of them through the real command."""
    text, named = BAD_SPACES[case]
    space = tmp_path / "space.yaml"
    space.write_text(text)
    assert main(["tune", "--space", str(space), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"ssl-tune: error: {space}") and named in line


def test_config_space_data_and_tracking_errors_are_one_line_from_the_command(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(BAD_SPACES["low > high"][0])
    assert_one_line_error(ssl_tune("tune", "--space", str(space), cwd=tmp_path), str(space), "optim.lr")
    assert_one_line_error(ssl_tune("train", "--set", "optim.lr=-1", cwd=tmp_path), "optim.lr=-1")
    assert_one_line_error(ssl_tune("train", "--set", "optim.no_such_key=1", cwd=tmp_path), "optim.no_such_key")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(
        ssl_tune("train", "--set", "data.source=folder", "--set", f"data.path={tmp_path / 'empty'}", cwd=tmp_path),
        str(tmp_path / "empty"))
    assert_one_line_error(ssl_tune("tune", "--tracking-uri", "http://127.0.0.1:9", cwd=tmp_path),
                          "http://127.0.0.1:9 is not reachable")


def test_train_into_a_previous_run_is_refused_before_data_loads_and_overwrite_replaces_it(tmp_path):
    """A 2-epoch run, then a 1-epoch run into the same folder: refused (one line, no work), or, with --overwrite,
    a clean 1-epoch run (no stale epoch_0002 beside it)."""
    out = tmp_path / "run"
    common = ["--output", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
              *sum((["--set", o] for o in [*TINY, "optim.warmup_epochs=0"]), [])]
    assert main(["train", *common, "--set", "optim.epochs=2"]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    refused = ssl_tune("train", *common, "--set", "optim.epochs=1", cwd=tmp_path)
    assert_one_line_error(refused, str(out), "--resume", "--overwrite")
    assert refused.stdout == ""  # no data summary, no "training ..." line: refused before any work
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(ConfigError, match="--overwrite"):  # the Python API refuses the same way
        train(load_config(overrides=[*TINY, "optim.epochs=1", "optim.warmup_epochs=0", f"output_dir={out}"]))

    assert main(["train", *common, "--set", "optim.epochs=1", "--overwrite"]) == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["epoch_0001"]
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert load_config(out / "config.yaml").optim.epochs == 1
    weights = torch.load(out / "backbone.pt", weights_only=True)  # the new run's weights, from its checkpoint
    method = load_checkpoint(out / "checkpoints" / "epoch_0001")["method"]
    assert all(torch.equal(value, method[f"backbone.{key}"]) for key, value in weights.items())


BAD_TUNE_ARGUMENTS = {  # arguments -> what the one-line message must name
    "no trials": (["--trials", "0"], "--trials 0"),
    "negative trials": (["--trials", "-3"], "--trials -3"),
    "no epochs": (["--epochs", "0"], "--epochs 0"),
    "no concurrency": (["--concurrency", "0"], "--concurrency 0"),
    "negative concurrency": (["--concurrency", "-1"], "--concurrency -1"),
    "no min epochs": (["--min-epochs", "0"], "--min-epochs 0"),
    "min epochs above epochs": (["--min-epochs", "5", "--epochs", "2"], "--min-epochs 5"),
    "negative keep best": (["--keep-best", "-1", "--no-confirm"], "--keep-best -1"),
    "nan budget": (["--time-budget", "nan"], "'nan'"),
    "budget in unknown units": (["--time-budget", "10x"], "'10x'"),
    "infinite trial limit": (["--trial-time-limit", "inf"], "'inf'"),
    "no confirmation seeds": (["--confirm-seeds", "0"], "--confirm-seeds 0"),
    "no confirmed configs": (["--confirm-top", "0"], "--confirm-top 0"),
    "unknown space": (["--space", "nosuch"], "nosuch: file: not found (give a YAML file or a built-in space"),
    "unknown sweep to resume": (["--resume", "nosuch"], "--resume nosuch: no sweep settings at"),
    "gpus on a machine without": (["--gpus-per-worker", "1"], "scaling.gpus_per_worker=1 need 1 GPU"),
}


@pytest.mark.parametrize("case", list(BAD_TUNE_ARGUMENTS))
def test_bad_tune_arguments_fail_before_anything_is_saved(tmp_path, capsys, case):
    arguments, named = BAD_TUNE_ARGUMENTS[case]
    storage, db = tmp_path / "sweeps", tmp_path / "mlflow.db"
    code = main(["tune", *arguments, "--name", "bad", "--storage", str(storage), "--tracking-uri", f"sqlite:///{db}"])
    printed = capsys.readouterr()
    assert code == 2
    (line,) = printed.err.splitlines()
    assert line.startswith("ssl-tune: error: ") and named in line
    assert printed.out == ""  # no data summary, no log path: nothing loaded, Ray not started
    assert not storage.exists() and not db.exists()  # no settings to poison the name, no MLflow parent


@pytest.mark.parametrize("name", ["../../escape", "a/b", ".hidden", "x" * 101, "sweep 1"])
def test_a_sweep_name_that_is_not_a_folder_name_is_refused_before_anything_is_written(tmp_path, capsys, name):
    storage, db = tmp_path / "sweeps", tmp_path / "mlflow.db"
    for flag in ("--name", "--resume"):
        assert main(["tune", flag, name, "--storage", str(storage), "--tracking-uri", f"sqlite:///{db}"]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"ssl-tune: error: {flag} {name!r}: a sweep name is a folder name: letters, digits")
    assert not storage.exists() and not db.exists() and not (tmp_path.parent / "escape").exists()


def test_tune_epochs_below_the_default_warmup_shortens_it_and_says_so(tmp_path, capsys):
    """``--epochs 1`` is not refused for the hidden warm-up of 2 epochs: the sweep goes on to its next check
    (here an unreachable tracking server, so no sweep runs)."""
    code = main(["tune", "--epochs", "1", "--storage", str(tmp_path), "--tracking-uri", "http://127.0.0.1:9"])
    printed = capsys.readouterr()
    assert code == 2 and "http://127.0.0.1:9 is not reachable" in printed.err
    assert "--epochs 1: warm-up shortened from 2 to 1 epochs" in printed.out



# ---------------------------------------------------------------- bad input, again (issue 25, point 5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as ``ssl-tune train`` leaves it, for embed and export: the TINY config and its backbone."""
    folder = tmp_path_factory.mktemp("run")
    config = load_config(overrides=TINY)
    config.save(folder / "config.yaml")
    torch.save(build_backbone(config.backbone).state_dict(), folder / "backbone.pt")
    return folder


def _file(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _garbage_run(tmp_path: Path, run_dir: Path) -> Path:
    """``run_dir`` with a ``backbone.pt`` of bytes that are no PyTorch file."""
    folder = tmp_path / "garbage"
    folder.mkdir()
    shutil.copy(run_dir / "config.yaml", folder)
    _file(folder / "backbone.pt", bytes(range(256)) * 4)
    return folder


def _store(tmp_path: Path) -> str:
    """An MLflow store that exists (and holds no runs)."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def _space(tmp_path: Path, choices: str) -> Path:
    return _file(tmp_path / "space.yaml", f"{SPACE_HEAD}params:\n  optim.batch_size: {{choice: {choices}}}\n".encode())


def _one_image(tmp_path: Path) -> list[str]:
    """Train arguments for a flat folder of one SSL-train image and a labeled folder for evaluation."""
    flat, labeled = _write_flat_folder(tmp_path / "one", 1), _write_class_folder(tmp_path / "labeled", per_class=6)
    return ["--set", "data.source=folder", "--set", f"data.path={flat}", "--set", f"data.labeled_path={labeled}"]


UNREACHABLE_S3 = "s3://bucket/x?endpoint_override=127.0.0.1:1&scheme=http"  # the S3 API on a closed port
# (tmp_path, run_dir) -> (arguments, what the one line must name). Each formerly printed a traceback, a wrong
# message or no error at all; none of them hangs, so they run in process.
BAD_INPUT = {
    "binary --config": lambda t, r: (["train", "--config", str(_file(t / "bin.yaml", b"\x00\xff\xfe\x01"))],
                                     ["bin.yaml", "not a YAML text file"]),
    "malformed --set": lambda t, r: (["train", "--set", "augment.crop_scale=[0.2,"],
                                     ["augment.crop_scale=[0.2,", "not valid YAML"]),
    "infinite lr": lambda t, r: (["train", "--set", "optim.lr=.inf"], ["optim.lr=inf", "finite"]),
    "nan in a list": lambda t, r: (["tune", "--set", "augment.crop_scale=[.nan, 1.0]"],
                                   ["augment.crop_scale", "finite"]),
    "s3 without its service": lambda t, r: (["train", "--set", "data.source=parquet", "--set",
                                             f"data.path={UNREACHABLE_S3}"], ["data.path", "127.0.0.1:1"]),
    "train --output is a file": lambda t, r: (["train", "--output", str(_file(t / "taken", b"keep"))],
                                              ["--output", "is a file"]),
    "one SSL-train image": lambda t, r: (["train", *_one_image(t), "--output", str(t / "run")],
                                         ["1 image", "at least 2"]),
    "no preview images": lambda t, r: (["augment-preview", "--images", "0", "--out", str(t / "p.png")],
                                       ["--images 0"]),
    "embed batch size 0": lambda t, r: (["embed", str(r), str(t), "--batch-size", "0"], ["--batch-size 0"]),
    "embed an unknown run id": lambda t, r: (["embed", "0" * 32, str(t), "--tracking-uri", _store(t)],
                                             ["0" * 32, "not found"]),
    "embed from a store that does not exist": lambda t, r: (["embed", "0" * 32, str(t), "--tracking-uri",
                                                             f"sqlite:///{t / 'none.db'}"], ["no MLflow store"]),
    "export to /proc": lambda t, r: (["export", str(r), "--onnx", "/proc/x.onnx"], ["--onnx", "'/proc'"]),
    "export a garbage backbone": lambda t, r: (["export", str(_garbage_run(t, r)), "--onnx", str(t / "x.onnx")],
                                               ["garbage", "not a readable backbone"]),
    "digits at size 0": lambda t, r: (["data", "to-parquet", "digits", str(t / "d"), "--image-size", "0"],
                                      ["--image-size 0", ">= 8"]),
    "destination under a file": lambda t, r: (["data", "to-parquet", "digits", str(_file(t / "f") / "sub")],
                                              ["DST", "which is a file"]),
    "report here with nothing tracked": lambda t, r: (["report"], ["no MLflow store", "mlflow.db"]),
    "batch choice above the data": lambda t, r: (["tune", "--space", str(_space(t, "[64, 4096]")), "--storage",
                                                  str(t / "sweeps")],
                                                 ["space.yaml: optim.batch_size: choice 4096", "2800"]),
}


def _tree(root: Path) -> dict[Path, int | None]:
    """Every file and folder under ``root``, with the files' modification times."""
    return {path: path.stat().st_mtime_ns if path.is_file() else None for path in root.rglob("*")}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_leaves_nothing_behind(tmp_path, run_dir, monkeypatch, capsys, case):
    """In the case's own folder (the default MLflow store's place) and with temporary files under it: after the
    one-line error nothing in it is new or changed (no mlflow.db, run folder or downloaded files)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    arguments, named = BAD_INPUT[case](tmp_path, run_dir)
    before, _ = _tree(tmp_path), capsys.readouterr()
    assert main(arguments) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("ssl-tune: error: ") and all(name in line for name in named), line
    assert "<= 1" not in line  # not "use a batch size <= 1" against the >= 2 rule
    assert _tree(tmp_path) == before


HANGS = {  # arguments -> what the one line must name; each formerly blocked for minutes
    "gs without its service": (["train", "--set", "data.source=parquet", "--set",
                                "data.path=gs://bucket/x?endpoint_override=127.0.0.1:1&scheme=http"],
                               ["data.path", "127.0.0.1:1"]),  # pyarrow's GCS client retried, deaf to Ctrl-C
    "no cluster at train --address": (["train", "--address", "127.0.0.1:1"], ["--address", "127.0.0.1:1"]),
    "no cluster at tune --address": (["tune", "--address", "ray://127.0.0.1:1"], ["--address", "127.0.0.1:1"]),
    "no tracking server": (["tune", "--tracking-uri", "http://127.0.0.1:1"], ["http://127.0.0.1:1 is not reachable"]),
    "malformed space file": (["tune", "--space", "broken.yaml"], ["broken.yaml"]),
    "storage scheme pyarrow cannot open": (["tune", "--storage", "ftp://x/y"], ["--storage='ftp://x/y'"]),
    "ui port out of range": (["ui", "--port", "99999"], ["--port 99999", "1-65535"]),  # never exited
}


@pytest.mark.parametrize("case", list(HANGS))
def test_what_hung_is_one_line_within_seconds(tmp_path, case):
    arguments, named = HANGS[case]
    (tmp_path / "broken.yaml").write_text("params: [unclosed")
    assert_one_line_error(ssl_tune(*arguments, cwd=tmp_path, timeout=60), *named)
    assert [p.name for p in tmp_path.iterdir()] == ["broken.yaml"]


def test_ui_refuses_a_port_that_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(ssl_tune("ui", "--port", str(port), cwd=tmp_path, timeout=60), f"--port {port}")


HEAVY = ("torch", "torchvision", "sklearn", "mlflow", "ray", "optuna", "pyarrow")


@pytest.mark.parametrize("command", ["train", "tune", "augment-preview"])
def test_a_bad_config_value_fails_before_the_heavy_imports(tmp_path, command):
    """What made ``ssl-tune train --set optim.lr=-1`` take 8 s: its line now comes before torch, MLflow, Ray..."""
    script = (f"import json, sys\nfrom tuning.cli import main\ncode = main([{command!r}, '--set', 'optim.lr=-1'])\n"
              f"print(json.dumps([code, [name for name in {HEAVY!r} if name in sys.modules]]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert json.loads(result.stdout) == [2, []], result.stderr[-2000:]
    assert "optim.lr=-1" in result.stderr


def test_the_command_runs_the_exit_handlers_and_keeps_its_exit_code_and_output(tmp_path):
    """``ssl-tune`` skips the interpreter's module teardown (tuning.cli.run), not what an exit must do."""
    script = ("import atexit, sys\nfrom tuning import cli\n"
              "atexit.register(lambda: print('exit handler ran'))\n"  # stdout, unflushed until the exit
              "sys.argv = ['ssl-tune', 'tune', '--trials', '0']\ncli.run()\nprint('not reached')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stdout == "exit handler ran\n"
    assert "--trials 0 is invalid" in result.stderr


def test_train_refuses_gpus_where_there_are_none_as_tune_does(tmp_path, capsys):
    """Formerly trained on the CPU and exited 0; the line is the one Tune's cluster check prints."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    code = main(["train", "--gpus-per-worker", "1", "--output", str(tmp_path / "run"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    (line,) = capsys.readouterr().err.splitlines()
    assert code == 2 and "x scaling.gpus_per_worker=1 need 1 GPU" in line and "this machine has 0 GPU" in line
    assert "lower scaling.gpus_per_worker" in line
    assert not any(tmp_path.iterdir())


def test_export_creates_the_folder_of_its_onnx_file(run_dir, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    target = tmp_path / "new" / "sub" / "model.onnx"
    assert main(["export", str(run_dir), "--onnx", str(target)]) == 0
    assert [node.name for node in onnx.load(str(target)).graph.input] == ["images"]


def test_to_parquet_keeps_an_existing_file_unless_told_to_overwrite(tmp_path, capsys):
    images = _write_class_folder(tmp_path / "images", per_class=2)
    target = _file(tmp_path / "images.parquet", b"someone's data")
    assert main(["data", "to-parquet", str(images), str(target)]) == 2
    assert "--overwrite" in capsys.readouterr().err and target.read_bytes() == b"someone's data"
    assert main(["data", "to-parquet", str(images), str(target), "--overwrite"]) == 0
    assert pq.read_table(target).num_rows == 6


def _descendants(pid: int) -> set[int]:
    """The processes under ``pid`` (children, grandchildren, ...), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # ended meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ui_ends_its_server_with_it_and_prints_the_runs_page(tmp_path, free_port, signum):
    """The signal goes to ``ssl-tune ui`` alone, as a terminal's Ctrl-C (its child has its own process group) or a
    service manager's SIGTERM: the MLflow server ends with it, quietly, and the port is free. MLflow's job runner
    (GenAI jobs, 7 processes) is not started."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = MlflowClient(uri).create_experiment("ssl-tune")
    ui = subprocess.Popen([sys.executable, "-m", "tuning.cli", "ui", "--port", str(free_port), "--tracking-uri", uri],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even under nohup
    try:
        deadline = time.monotonic() + 300  # MLflow's start-up on a loaded 2-core machine
        while not _serves(free_port) and ui.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        children = _descendants(ui.pid)
        assert _serves(free_port) and len(children) >= 2  # mlflow ui, its web server (no job runner)
        assert not [pid for pid in children if "huey" in Path(f"/proc/{pid}/cmdline").read_text()]
        os.kill(ui.pid, signum)
        printed = ui.communicate(timeout=120)[0]
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.communicate()
    assert ui.returncode == 128 + signum, printed[-3000:]
    assert "Traceback" not in printed, printed[-3000:]
    assert not [pid for pid in children if _running(pid)] and not _serves(free_port)
    assert f"http://127.0.0.1:{free_port}/#/experiments/{experiment}/runs" in printed


def _serves(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def test_the_printed_runs_page_is_a_route_of_this_mlflows_ui():
    """``#/experiments/ID/runs``: MLflow 3's UI routes by URL fragment and has a runs tab at that path."""
    bundles = (Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js").glob("*.js")
    text = "".join(path.read_text(errors="ignore") for path in bundles)
    assert '"/experiments/:experimentId/runs"' in text and "/#/experiments/" in text


def test_a_logged_exception_reaches_the_console_as_one_line(tmp_path):
    """Tune logs a trial whose node died with a long traceback: the console gets one line, the log file all."""
    import logging

    from tuning.progress import OneLineFormatter

    try:
        raise RuntimeError("The actor died unexpectedly before finishing this task.\n\tclass_name: ImplicitFunc")
    except RuntimeError:
        record = logging.LogRecord("ray.tune", logging.ERROR, __file__, 1, "Trial task failed for trial %s",
                                   ("run_trial_1",), sys.exc_info())
    line = OneLineFormatter(tmp_path / "sweep.log").format(record)
    assert line == ("Trial task failed for trial run_trial_1: RuntimeError: The actor died unexpectedly before "
                    f"finishing this task. (traceback in {tmp_path / 'sweep.log'})")


def test_a_trial_process_stopped_in_a_callback_prints_no_traceback_but_other_errors_still_show():
    """Tune stops a trial process with SIGTERM; Ray's handler raises SystemExit, which Python reports as an
    unraisable error when it lands in a weakref callback: the trial process keeps that off the console."""
    code = """
import weakref
from tuning.progress import quiet_worker_logs
quiet_worker_logs()
class Thing: pass
def raiser(error):
    def callback(_ref):
        raise error
    return callback
one, two = Thing(), Thing()
keep = [weakref.ref(one, raiser(SystemExit(1))), weakref.ref(two, raiser(ValueError("shown")))]
del one, two
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "SystemExit" not in done.stderr
    assert "ValueError: shown" in done.stderr
