"""Every error row of the README's failure table, through the real command: one line, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_loop import TINY

from ssl_train.checkpoint import list_checkpoints, load_checkpoint
from ssl_train.config import ConfigError, load_config
from ssl_train.run import train
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


def ssl_tune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuning.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


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
    "infinite trial limit": (["--trial-time-limit", "inf"], "'inf'"),
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


def test_tune_epochs_below_the_default_warmup_shortens_it_and_says_so(tmp_path, capsys):
    """``--epochs 1`` is not refused for the hidden warm-up of 2 epochs: the sweep goes on to its next check
    (here an unreachable tracking server, so no sweep runs)."""
    code = main(["tune", "--epochs", "1", "--storage", str(tmp_path), "--tracking-uri", "http://127.0.0.1:9"])
    printed = capsys.readouterr()
    assert code == 2 and "http://127.0.0.1:9 is not reachable" in printed.err
    assert "--epochs 1: warm-up shortened from 2 to 1 epochs" in printed.out
