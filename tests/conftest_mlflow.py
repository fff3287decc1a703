"""A real MLflow tracking server for tests: ``mlflow server`` on loopback, SQLite and a local artifact folder.

Loaded as a pytest plugin from ``tests/conftest.py``. The server starts once per session, only
when a test asks for ``mlflow_server``, on a free 127.0.0.1 port in its own temporary folder
(``--backend-store-uri sqlite:///...``, ``--artifacts-destination``: artifacts go through the
server, as with a remote one), with MLflow's telemetry off, and is stopped by its pid at the end.
``mlflow_env`` keeps each test's tracking URI to itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes import free_port

READY_TIMEOUT_S = 60
# no usage reports to an outside host, from the server or from the tests' clients
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
# the server's GenAI job runner (a runner and seven huey consumers) has nothing to do here
SERVER_ENV = {**QUIET, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-n:])


def healthy(uri: str) -> bool:
    """Whether the server's ``/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_mlflow_server(workdir: Path) -> MlflowServer:
    """Start ``mlflow server`` on a free loopback port with its store and artifacts in ``workdir``.

    Returns once ``/health`` answers.

    Raises:
        RuntimeError: If the server exits or does not answer within ``READY_TIMEOUT_S`` seconds;
            the message ends with the server's log.
    """
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination", str(workdir / "artifacts")]
    log_path = workdir / "mlflow-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | SERVER_ENV
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
                                   env=env, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not healthy(server.uri):
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            stop_mlflow_server(server)
            raise RuntimeError(f"mlflow server did not answer /health in {READY_TIMEOUT_S} s:\n{server.log_tail()}")
        time.sleep(0.2)
    return server


def stop_mlflow_server(server: MlflowServer) -> None:
    """Stop the server's process group (its own session: the server and the uvicorn worker it
    started) by the server's pid: SIGTERM, then SIGKILL after 20 s."""
    if server.process.poll() is not None:
        return
    os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """A running MLflow tracking server (see the module docstring)."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    yield server
    stop_mlflow_server(server)


@pytest.fixture
def mlflow_env(monkeypatch):
    """No ``MLFLOW_TRACKING_URI`` and no telemetry for the test; afterwards neither the variable nor
    MLflow's process-wide tracking URI (which ``MLFlowLogger`` sets) outlive it.

    Yields:
        ``monkeypatch``, to set ``MLFLOW_TRACKING_URI`` or ``TRAINING_JOB_NAME`` for the test.
    """
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # recorded, so that teardown removes it again
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    for name, value in QUIET.items():
        monkeypatch.setenv(name, value)
    yield monkeypatch
    mlflow.set_tracking_uri(None)
