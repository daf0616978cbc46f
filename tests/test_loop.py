"""The train loop: resume equals straight training, divergence and collapse stop cleanly, CLI outputs load."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from ssl_train.augment.batched import BatchedViews
from ssl_train.augment.recipes import view_recipes
from ssl_train.config import load_config
from ssl_train.data import load_splits
from ssl_train.methods.backbones import build_backbone
from ssl_train.status import Status
from ssl_train.training.checkpoint import latest_checkpoint, load_checkpoint
from ssl_train.training.loop import Trainer, WorkerContext, train_loop
from ssl_train.training.run import load_backbone, train
from tuning.cli import main

TINY = [
    "data.image_size=8", "optim.batch_size=128", "eval.knn_k=20", "backbone.width=8",
    "byol.projector_hidden_dim=64", "byol.predictor_hidden_dim=64", "byol.projector_out_dim=32",
    "swav.projector_hidden_dim=64", "swav.projector_out_dim=32",
]


@pytest.fixture(scope="module")
def digits8():
    return load_splits(load_config(overrides=TINY).data)


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("method, backend", [("byol", "batched"), ("swav", "batched"), ("byol", "per_sample")])
def test_crash_then_resume_equals_straight_training(tmp_path, digits8, method, backend):
    extra = ["swav.queue_length=256", "swav.queue_start_epoch=1", "swav.freeze_prototypes_steps=5"]
    config = load_config(overrides=[*TINY, f"method={method}", "optim.epochs=4", f"augment.backend={backend}", *extra])
    straight = train_loop(config, lambda m, c: None, WorkerContext(checkpoint_dir=tmp_path / "a"), splits=digits8)

    def crash_after_two(metrics, _checkpoint):
        if metrics["epoch"] == 2:
            raise Crash("simulated failure after epoch 2")

    with pytest.raises(Crash):
        train_loop(config, crash_after_two, WorkerContext(checkpoint_dir=tmp_path / "b"), splits=digits8)
    resumed_from = latest_checkpoint(tmp_path / "b")
    assert resumed_from.name == "epoch_0002"
    resumed = train_loop(
        config, lambda m, c: None, WorkerContext(checkpoint_dir=tmp_path / "b"), checkpoint=resumed_from, splits=digits8
    )
    assert resumed.restarts == 1 and [m["epoch"] for m in resumed.history] == [1, 2, 3, 4]
    a = load_checkpoint(straight.checkpoint)["method"]
    b = load_checkpoint(resumed.checkpoint)["method"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise on CPU
    assert straight.history[-1]["loss"] == resumed.history[-1]["loss"]


def test_batched_backend_gathers_each_batch_from_the_device_copy(digits8):
    """A batch of the batched backend is an index gather of the images, then BatchedViews with the same RNG."""
    config = load_config(overrides=[*TINY, "optim.epochs=2"])
    trainer = Trainer(config, lambda m, c: None, splits=digits8)
    batches = trainer.batches
    assert batches.images.device == trainer.device and batches.images.dtype == torch.uint8
    assert len(batches.images) == len(digits8.ssl_train)
    first_batch = next(iter(batches.sampler))
    torch.manual_seed(5)
    views = next(iter(batches.for_epoch(0)))
    torch.manual_seed(5)
    expected = BatchedViews(view_recipes(config))(digits8.ssl_train.images[first_batch])
    assert len(views) == len(expected) == 2
    for view, reference in zip(views, expected, strict=True):
        assert torch.equal(view, reference)


@pytest.mark.slow  # inductor compiles the forward and backward: ~2 min on 2 cores
def test_compiled_forward_trains_like_eager(digits8):
    """optim.compile=true (torch.compile of the method's forward) gives the eager run's losses, up to float rounding."""
    config = load_config(overrides=[*TINY, "optim.epochs=2", "eval.every_epochs=2"])
    eager = train_loop(config, lambda m, c: None, splits=digits8)
    compiled_config = load_config(overrides=[*TINY, "optim.epochs=2", "eval.every_epochs=2", "optim.compile=true"])
    trainer = Trainer(compiled_config, lambda m, c: None, splits=digits8)
    assert trainer.model is not trainer.method  # the compiled wrapper runs the steps
    compiled = trainer.fit()
    assert [m["loss"] for m in compiled.history] == pytest.approx([m["loss"] for m in eager.history], rel=1e-3)


def test_non_finite_loss_stops_as_diverged(digits8):
    config = load_config(overrides=[*TINY, "optim.lr=1e12", "optim.optimizer=sgd", "optim.warmup_epochs=0",
                                    "optim.epochs=5"])
    reports = []
    result = train_loop(config, lambda m, c: reports.append((m, c)), splits=digits8)
    assert result.status == Status.DIVERGED
    assert reports[-1][0]["status"] == Status.DIVERGED and reports[-1][1] is None  # no checkpoint of NaN weights
    assert len(reports) < 5


def test_collapse_monitor_stops_the_run(digits8):
    config = load_config(overrides=[*TINY, "optim.epochs=6", "eval.collapse_threshold=0.999",
                                    "eval.collapse_grace_epochs=1"])
    result = train_loop(config, lambda m, c: None, splits=digits8)
    assert result.status == Status.COLLAPSED
    assert [m["status"] for m in result.history] == ["running", Status.COLLAPSED]
    assert result.history[-1]["embedding_std"] < 0.999


def test_cli_train_writes_loadable_outputs_and_one_mlflow_run(tmp_path, capsys):
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = sum((["--set", o] for o in [*TINY, "optim.epochs=2"]), [])
    code = main(["train", "--output", str(out), "--tracking-uri", uri, *overrides])
    assert code == 0
    printed = capsys.readouterr().out
    assert "epoch 2" in printed and f"{out}/backbone.pt" in printed
    epoch_lines = [line for line in printed.splitlines() if line.startswith("epoch ")]
    assert [("val knn" in line, "TEST knn" in line) for line in epoch_lines] == [(True, False), (True, True)]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ssl-tune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["optim.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_knn_acc")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_knn_acc")] == [2]  # test: once, at the end
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "backbone.pt"}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and lines[-1]["status"] == Status.FINISHED
    # Two lines for a user: build the architecture, load the plain state_dict.
    config = load_config(out / "config.yaml")
    backbone = build_backbone(config.backbone)
    backbone.load_state_dict(torch.load(out / "backbone.pt", weights_only=True))
    loaded = load_backbone(out)
    x = torch.randn(4, 3, 8, 8)
    backbone.eval()
    assert torch.equal(backbone(x), loaded(x))


def test_resume_continues_a_run_directory(tmp_path):
    config = load_config(overrides=[*TINY, "optim.epochs=1", "optim.warmup_epochs=0", f"output_dir={tmp_path}"])
    train(config)
    longer = config.replace({"optim.epochs": 2})
    summary = train(longer, resume=True)
    assert [m["epoch"] for m in summary.history] == [1, 2] and summary.restarts == 1
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(config.replace({"output_dir": str(tmp_path / "empty")}), resume=True)


def test_bad_config_fails_before_work(capsys, tmp_path):
    assert main(["train", "--set", "optim.lr=-1"]) == 2
    assert "optim.lr=-1" in capsys.readouterr().err
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train", "--tracking-uri", uri, "--output", str(tmp_path), "--set", "optim.batch_size=1500"]) == 2
    assert "only 1005 images" in capsys.readouterr().err


def test_the_loop_passes_the_global_step_to_tau(digits8):
    """tau after each epoch's last step is the per-step cosine (Grill et al. Sec. 3.2) at that global step k."""
    from ssl_train.methods.byol import tau_schedule

    config = load_config(overrides=[*TINY, "optim.epochs=3", "optim.warmup_epochs=0", "byol.tau_base=0.9"])
    result = train_loop(config, lambda m, c: None, splits=digits8)
    steps_per_epoch = len(digits8.ssl_train) // config.optim.batch_size  # full global batches only
    total = 3 * steps_per_epoch
    expected = [tau_schedule((epoch + 1) * steps_per_epoch - 1, total, 0.9) for epoch in range(3)]
    assert [m["tau"] for m in result.history] == pytest.approx(expected, abs=1e-12)
    # A per-epoch schedule (k = epoch, K = epochs) would give other values: the test can tell them apart.
    assert expected != pytest.approx([tau_schedule(epoch, 3, 0.9) for epoch in range(3)], abs=1e-3)


def test_bf16_only_where_the_cpu_flags_say_it_is_native(tmp_path):
    """An AVX-512 Xeon without AVX512_BF16/AMX emulates bf16 (2.3x slower): it must train in float32."""
    from ssl_train.training.loop import cpu_flags, cpu_has_native_bf16

    skylake = frozenset({"sse4_2", "avx2", "avx512f", "avx512bw", "avx512_vnni"})
    assert not cpu_has_native_bf16(skylake)
    assert cpu_has_native_bf16(skylake | {"avx512_bf16"}) == torch.backends.mkldnn.is_available()
    assert cpu_has_native_bf16(frozenset({"amx_bf16", "amx_tile"})) == torch.backends.mkldnn.is_available()
    assert not cpu_has_native_bf16(frozenset())  # no flags (another OS or architecture): float32
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\nbugs\t\t: none\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
