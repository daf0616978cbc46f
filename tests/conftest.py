"""Shared test fixtures: one real Ray cluster per session, a real MLflow server on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests that stream with Ray Data last (stable order otherwise).

    After a streamed 2-worker run and Ray Data runs in the same session cluster, the next Tune sweep
    hung: the driver never heard that its trial actors were alive (the GCS had them ALIVE; their
    ``__ray_ready__`` calls stayed PENDING_NODE_ASSIGNMENT). Not yet understood; see the README.
    """
    items.sort(key=lambda item: "streaming" in item.nodeid)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local multi-node-capable Ray cluster: a 2-CPU head node; tests may add and remove nodes."""
    import ray
    from ray.cluster_utils import Cluster

    # Other Ray instances may run on this machine. Train's placement-group cleaner asks the State API
    # whether its controller lives, at the address it finds on its own ("the latest cluster"); pointing
    # it at a foreign cluster makes it remove a live run's workers. So: our own dashboard port (the
    # default 8265 may be taken) and RAY_ADDRESS for every process of this job.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "dashboard_port": _free_port()})
    ray.init(address=cluster.address, runtime_env={"env_vars": {"RAY_ADDRESS": cluster.address}})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def digits_parquet(tmp_path_factory) -> tuple[Path, Path]:
    """The digits default at the tests' 8 px in Parquet form: (unlabeled SSL-train file, labeled file)."""
    from ssl_train.data import digits_to_parquet

    return digits_to_parquet(tmp_path_factory.mktemp("digits-parquet"), image_size=8)


def parquet_overrides(digits_parquet: tuple[Path, Path], streaming: bool) -> list[str]:
    """Config overrides that train on ``digits_parquet``, streamed by Ray Data or loaded in memory."""
    unlabeled, labeled = digits_parquet
    return ["data.source=parquet", f"data.path={unlabeled}", f"data.labeled_path={labeled}",
            f"data.streaming={str(streaming).lower()}"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    return _free_port()


class MlflowServer:
    """A real ``mlflow server`` process on 127.0.0.1 with an sqlite store under ``root``; stop and start it again."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        with open(self.root / "server.log", "a") as log:
            self.process = subprocess.Popen(  # its own process group: stop() ends the server's workers too
                command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
            )
        deadline = time.monotonic() + 300  # a liveness wait: MLflow's start-up is slow on a loaded 2-core machine
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.url
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:  # a loaded machine: end the server's process group for good
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=60)
            self.process = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` bound to 127.0.0.1 with an sqlite store; yields its URL."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server.start()
    server.stop()


@pytest.fixture
def restartable_mlflow_server(tmp_path):
    """An ``MlflowServer`` of this test's own (started), which the test may stop and start again."""
    root = tmp_path / "mlflow-server"
    root.mkdir()
    server = MlflowServer(root)
    server.start()
    yield server
    server.stop()
