"""A local stand-in for AWS: moto's server on 127.0.0.1 (S3, SageMaker, SageMaker Runtime), recording
every request it receives, so tests assert on what the real SDK sent; SDK sessions made through
:func:`with_moto_fixes` also check every SageMaker request against the service model before sending.

Use in a test module::

    from tests.moto_server import aws, moto_server  # noqa: F401  (pytest fixtures)
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from tests.fakes import free_port

REGION = "us-east-1"
BUCKET = "bincount-test"
ROLE = "arn:aws:iam::123456789012:role/BincountSageMaker"


@dataclass
class MotoServer:
    """A running ``moto.server`` and its request recording.

    Attributes:
        url: ``http://127.0.0.1:PORT``.
        recording: The file moto appends one JSON line per received request to.
    """

    url: str
    recording: Path

    def post(self, path: str, data: bytes = b"") -> bytes:
        with urllib.request.urlopen(urllib.request.Request(self.url + path, data=data, method="POST"), timeout=10) as r:
            return r.read()

    def reset(self) -> None:
        """Forget every resource and every recorded request."""
        self.post("/moto-api/reset")
        self.post("/moto-api/recorder/reset-recording")

    def requests(self) -> list[dict]:
        """Every request received since :meth:`reset`: ``method``, ``path``, ``target``
        (``X-Amz-Target``), ``body`` (bytes) and ``json`` (the parsed body, for JSON APIs)."""
        out = []
        if not self.recording.exists():
            return out
        for line in self.recording.read_text().splitlines():
            entry = json.loads(line)
            body = entry.get("body") or ""
            raw = base64.b64decode(body) if entry.get("body_encoded") else body.encode()
            headers = {k.lower(): v for k, v in entry["headers"].items()}
            parsed = None
            if "json" in headers.get("content-type", "") and raw:
                parsed = json.loads(raw)
            out.append({"method": entry["method"], "path": unquote(urlparse(entry["url"]).path),
                        "target": headers.get("x-amz-target", ""), "headers": headers, "body": raw, "json": parsed})
        return out

    def calls(self, operation: str, service: str = "SageMaker") -> list[dict]:
        """The parsed bodies of every ``service.operation`` request (e.g. ``CreateTrainingJob``)."""
        return [r["json"] for r in self.requests() if r["target"] == f"{service}.{operation}"]

    def puts(self, prefix: str = "") -> dict[str, bytes]:
        """S3 objects written (``PUT /bucket/key``) since :meth:`reset`, by ``bucket/key``."""
        return {r["path"].lstrip("/"): r["body"] for r in self.requests()
                if r["method"] == "PUT" and r["path"].lstrip("/").startswith(prefix) and not r["target"]}


# moto 5.2 has no SageMaker UpdateEndpoint; this adds it, doing what AWS has done once the update
# is InService: the endpoint serves the new config's variants. Likewise StopTrainingJob (moto's jobs are
# Completed at once): the job is Stopped, as AWS leaves it once the stop is done. And moto checks a model
# package's instance types against lists older than SageMaker's service model, and its UpdateModelPackage
# drops a package's AdditionalInferenceSpecifications when the update adds none; this checks the types against
# the model's enums, and keeps the specifications (as AWS does). Everything else is moto's own.
MOTO_WITH_UPDATE_ENDPOINT = """
import sys
import botocore.session
from moto.core.responses import ActionResult
from moto.core.utils import utcnow
from moto.sagemaker.exceptions import ValidationError
from moto.sagemaker.models import ModelPackage
from moto.sagemaker.responses import SageMakerResponse
from moto.server import main


def update_endpoint(self):
    backend = self.sagemaker_backend
    name, config_name = self._get_param("EndpointName"), self._get_param("EndpointConfigName")
    backend.describe_endpoint(name)  # moto's ValidationError for a missing endpoint
    config = backend.describe_endpoint_config(config_name)  # ... or config
    endpoint = backend.endpoints[name]
    endpoint.endpoint_config_name = config_name
    endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
    endpoint.last_modified_time = utcnow()
    return ActionResult({"EndpointArn": endpoint.arn})


def stop_training_job(self):
    job = self.sagemaker_backend.training_jobs[self._get_param("TrainingJobName")]
    job.training_job_status = job.secondary_status = "Stopped"
    return ActionResult({})


SERVICE = botocore.session.get_session().get_service_model("sagemaker")


def enum_check(field, shape):
    def check(instance_types):
        if unknown := [t for t in instance_types if t not in SERVICE.shape_for(shape).enum]:
            raise ValidationError(message=f"Value {unknown} at '{field}' failed to satisfy constraint: enum {shape}")
    return staticmethod(check)


add_specifications = ModelPackage.add_additional_inference_specifications


def keep_specifications(self, to_add):
    if to_add is not None:
        add_specifications(self, to_add)


SageMakerResponse.update_endpoint = update_endpoint
ModelPackage.add_additional_inference_specifications = keep_specifications
SageMakerResponse.stop_training_job = stop_training_job
ModelPackage.validate_supported_transform_instance_types = enum_check(
    "SupportedTransformInstanceTypes", "TransformInstanceType")
ModelPackage.validate_supported_realtime_inference_instance_types = enum_check(
    "SupportedRealtimeInferenceInstanceTypes", "ProductionVariantInstanceType")
main(sys.argv[1:])
"""


def check_request(params: dict, model, **_) -> None:
    """botocore ``before-parameter-build`` handler: fail on a request SageMaker's service model
    refuses (botocore's ``ParamValidator`` plus the model's maximums, patterns and enums:
    :func:`sagemaker_launch.session.request_errors`), before it is sent."""
    from sagemaker_launch.session import request_errors

    if errors := request_errors(params, model):
        raise AssertionError(f"{model.name} against the service model: " + "; ".join(errors))


def drop_empty_structures(parsed: dict, **_) -> None:
    """botocore ``after-call`` handler: moto describes unset structures as ``{}`` (``VpcConfig``
    of a model, ``DataCaptureConfig`` of an endpoint config) where AWS leaves the field out, and the
    SDK's resource classes reject an empty one."""
    for key in [k for k, v in parsed.items() if v == {}]:
        del parsed[key]


def with_moto_fixes(make_session):
    """Wrap a function returning a ``boto3.Session`` so that its clients tolerate moto's answers and
    check every SageMaker request against the service model (:func:`check_request`)."""

    def make(*args, **kwargs):
        session = make_session(*args, **kwargs)
        session.events.register("before-parameter-build.sagemaker", check_request)
        session.events.register("after-call.sagemaker", drop_empty_structures)
        return session

    return make


def start_server(tmp: Path) -> tuple[MotoServer, subprocess.Popen]:
    """Start moto's server (plus UpdateEndpoint: :data:`MOTO_WITH_UPDATE_ENDPOINT`) on a free port of
    127.0.0.1, recording to ``tmp``.

    Raises:
        RuntimeError: If it doesn't answer within 60 s.
    """
    port = free_port()
    env = dict(os.environ, MOTO_ENABLE_RECORDING="1", MOTO_RECORDER_FILEPATH=str(tmp / "recording.jsonl"))
    proc = subprocess.Popen([sys.executable, "-c", MOTO_WITH_UPDATE_ENDPOINT, "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=(tmp / "server.log").open("w"), stderr=subprocess.STDOUT)
    server = MotoServer(f"http://127.0.0.1:{port}", tmp / "recording.jsonl")
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(server.url + "/moto-api/", timeout=2).read()
            return server, proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)


# one server per test session: each test module importing the fixture gets its own definition of it
_shared: dict = {"users": 0}


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> MotoServer:
    """moto's server (:func:`start_server`) on a free port of 127.0.0.1, recording requests; stopped after
    the session."""
    if not _shared["users"]:
        _shared["server"], _shared["proc"] = start_server(tmp_path_factory.mktemp("moto"))
    _shared["users"] += 1
    yield _shared["server"]
    _shared["users"] -= 1
    if not _shared["users"]:
        proc = _shared.pop("proc")
        proc.kill()  # its state is the test session's; nothing to shut down cleanly
        proc.wait(timeout=10)


@pytest.fixture
def aws(moto_server, monkeypatch, tmp_path) -> MotoServer:
    """Point every AWS client of this process at a freshly reset moto server with bucket :data:`BUCKET`.

    Also: fake credentials, :data:`REGION`, no IAM role validation (moto can't simulate policies)
    and the SDK's usage telemetry off (it would try the internet).
    """
    moto_server.reset()
    config = tmp_path / "sagemaker_config.yaml"
    config.write_text("SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n")
    for key, value in {"AWS_ENDPOINT_URL": moto_server.url, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                       "AWS_DEFAULT_REGION": REGION, "SAGEMAKER_VALIDATE_ROLE": "false",
                       "SAGEMAKER_USER_CONFIG_OVERRIDE": str(config), "SAGEMAKER_ROLE": ROLE,
                       "SAGEMAKER_BUCKET": BUCKET}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    import boto3

    boto3.Session(region_name=REGION).client("s3").create_bucket(Bucket=BUCKET)
    moto_server.post("/moto-api/recorder/reset-recording")
    return moto_server
