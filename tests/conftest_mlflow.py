"""A real MLflow tracking server for tests: ``mlflow server`` on loopback, SQLite and a local artifact folder.

Loaded as a pytest plugin from ``tests/conftest.py``. The server starts once per session, only
when a selected test asks for ``mlflow_server`` (launched when collection ends, waited for when
the first such test starts), on a free 127.0.0.1 port in its own temporary folder
(``--backend-store-uri sqlite:///...``, ``--artifacts-destination``: artifacts go through the
server, as with a remote one), with MLflow's telemetry off, and is stopped by its pid at the end.
``mlflow_env`` keeps each test's tracking URI to itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
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
    workdir: Path

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


def launch_mlflow_server(workdir: Path) -> MlflowServer:
    """Start ``mlflow server`` on a free loopback port with its store and artifacts in ``workdir``;
    returns at once (:func:`wait_until_healthy` waits for it)."""
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination", str(workdir / "artifacts")]
    log_path = workdir / "mlflow-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | SERVER_ENV
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
                                   env=env, start_new_session=True)
    return MlflowServer(f"http://127.0.0.1:{port}", process, log_path, workdir)


def wait_until_healthy(server: MlflowServer) -> MlflowServer:
    """Return once the server's ``/health`` answers.

    Raises:
        RuntimeError: If the server exits, or does not answer within ``READY_TIMEOUT_S`` seconds of
            this call; the message ends with the server's log.
    """
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not healthy(server.uri):
        if server.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.process.returncode}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            stop_mlflow_server(server)
            raise RuntimeError(f"mlflow server did not answer /health in {READY_TIMEOUT_S} s:\n{server.log_tail()}")
        time.sleep(0.2)
    return server


def stop_mlflow_server(server: MlflowServer) -> None:
    """Kill the server's process group (its own session: the server and the uvicorn worker it
    started); its store is the test session's temporary folder, nothing to shut down cleanly."""
    if server.process.poll() is not None:
        return
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)


SERVER = pytest.StashKey[MlflowServer]()


def pytest_collection_finish(session) -> None:
    """Launch the server as soon as the selected tests are known to need it, so that it boots
    (mostly imports) while the tests before them run."""
    if any("mlflow_server" in getattr(item, "fixturenames", ()) for item in session.items):
        session.config.stash[SERVER] = launch_mlflow_server(Path(tempfile.mkdtemp(prefix="bincount-mlflow-")))


def pytest_sessionfinish(session) -> None:
    server = session.config.stash.get(SERVER, None)
    if server is not None:
        stop_mlflow_server(server)
        shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(pytestconfig) -> MlflowServer:
    """The running MLflow tracking server (see the module docstring)."""
    return wait_until_healthy(pytestconfig.stash[SERVER])


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
