"""Shared test fixtures: one real Ray cluster per session, a real MLflow server on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` bound to 127.0.0.1 with an sqlite store; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        raise RuntimeError(f"mlflow server did not start: {Path(root / 'server.log').read_text()[-2000:]}")
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()
