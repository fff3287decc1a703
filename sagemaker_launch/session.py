"""The AWS side shared by launch, tune and deploy: console links, and a boto3 session whose requests
are recorded, checked against the service model and held back in a dry run (:class:`RequestHook`)."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import re
from collections import defaultdict
from typing import Any, Callable

from omegaconf import DictConfig

log = logging.getLogger("sagemaker_launch")

CONSOLE_PAGES = {"training": "jobs", "tuning": "hyper-tuning-jobs", "endpoint": "endpoints",
                 "transform": "transform-jobs"}


def console_url(region: str, name: str, kind: str = "training") -> str:
    """The SageMaker console page in ``region`` of the ``kind`` (``training``, ``tuning``, ``endpoint``
    or ``transform``) job or endpoint ``name``."""
    return f"https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/{CONSOLE_PAGES[kind]}/{name}"


def request_errors(params: dict[str, Any], operation_model) -> list[str]:
    """What SageMaker's API model says is wrong with a request, one line per problem.

    botocore's ``ParamValidator`` (what every client runs before sending) checks types, required
    members and minimums only; the service would refuse the rest, so this adds the model's
    maximums (lengths, sizes, values), ``pattern`` (searched: Smithy patterns are not implicitly
    anchored) and ``enum`` (e.g. the instance types of ``TrainingInstanceType``).

    Args:
        params: The request, as the client's ``before-parameter-build`` event holds it.
        operation_model: ``botocore.model.OperationModel`` of the request.
    """
    from botocore.validate import ParamValidator

    report = ParamValidator().validate(params, operation_model.input_shape)
    errors = report.generate_report().splitlines() if report.has_errors() else []
    _model_errors(params, operation_model.input_shape, operation_model.name, errors)
    return errors


def _model_errors(value: Any, shape, name: str, errors: list[str]) -> None:
    meta, kind = shape.metadata, shape.type_name
    if kind == "structure" and isinstance(value, dict):
        for key, item in value.items():
            if key in shape.members:
                _model_errors(item, shape.members[key], f"{name}.{key}", errors)
    elif kind == "list" and isinstance(value, (list, tuple)):
        if "max" in meta and len(value) > meta["max"]:
            errors.append(f"{name}: {len(value)} items, at most {meta['max']}")
        for i, item in enumerate(value):
            _model_errors(item, shape.member, f"{name}[{i}]", errors)
    elif kind == "map" and isinstance(value, dict):
        if "max" in meta and len(value) > meta["max"]:
            errors.append(f"{name}: {len(value)} entries, at most {meta['max']}")
        for key, item in value.items():
            _model_errors(key, shape.key, f"{name} key {key!r}", errors)
            _model_errors(item, shape.value, f"{name}[{key!r}]", errors)
    elif kind == "string" and isinstance(value, str):
        if "max" in meta and len(value) > meta["max"]:
            errors.append(f"{name}: {len(value)} characters, at most {meta['max']}")
        if shape.enum and value not in shape.enum:
            errors.append(f"{name}={value!r}: not one of SageMaker's {len(shape.enum)} values ({shape.name})")
        if "pattern" in meta and not _pattern(meta["pattern"]).search(value):
            errors.append(f"{name}={_short(value)}: does not match {meta['pattern']!r}")
    elif kind in ("integer", "long", "float", "double") and isinstance(value, (int, float)):
        if "max" in meta and value > meta["max"]:
            errors.append(f"{name}={value}: at most {meta['max']}")


def _short(value: str, keep: int = 80) -> str:
    return repr(value) if len(value) <= keep else repr(value[:keep]) + f"... ({len(value)} characters)"


@functools.lru_cache(maxsize=None)
def _pattern(pattern: str):
    """The service model's (Java) regex: ``regex`` reads its ``\\p{L}``-style classes, ``re`` does not."""
    try:
        import regex

        return regex.compile(pattern)
    except ImportError:
        try:
            return re.compile(pattern)
        except re.error:  # a \p{...} class: not checked without the regex package
            return re.compile("")


class DryRun(Exception):  # noqa: N818 - not an error: how a dry run stops before sending
    """Raised instead of sending a Create* request in a dry run."""

    def __init__(self, operation: str, params: dict[str, Any]) -> None:
        super().__init__(f"dry run: {operation} not sent")
        self.params = params


class RequestHook:
    """botocore event handlers on one boto3 session.

    - add request fields the SDK has no parameter for (:attr:`extra`: operation -> fields, e.g.
      ``{"CreateTrainingJob": {"ProfilerConfig": {...}}}``), then apply ``edits``;
    - keep every SageMaker ``Create*`` request as sent (``sent``), so the launcher knows the job name;
    - in a dry run, send nothing: ``Create*`` is checked against the service model
      (:func:`request_errors`: ``ValueError`` if SageMaker would refuse it), then raises
      :class:`DryRun` carrying the request; S3 uploads are answered locally and recorded with their
      contents (``files``: ``s3://bucket/key`` -> bytes, in upload order); any other call is refused
      (``AccessDenied``, which the SDK treats as "cannot verify").

    Args:
        boto_session: The ``boto3.Session`` every client of the job is made from (register before
            creating clients: a client copies the session's handlers when it is created).
        edits: Functions changing the request in place, per operation.
        dry_run: Send nothing.
    """

    def __init__(self, boto_session, *, edits: dict[str, Callable[[dict[str, Any]], None]] | None = None,
                 dry_run: bool = False) -> None:
        self.extra: dict[str, dict[str, Any]] = {}
        self.edits = edits or {}
        self.dry_run = dry_run
        self.sent: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.files: dict[str, bytes] = {}
        boto_session.events.register("before-parameter-build.sagemaker", self._sagemaker_params)
        if dry_run:
            boto_session.events.register("before-parameter-build.s3.PutObject", self._s3_put)
            boto_session.events.register("before-call", self._refuse)

    def _sagemaker_params(self, params: dict[str, Any], model, **_: Any) -> None:
        params.update(copy.deepcopy(self.extra.get(model.name, {})))
        if model.name in self.edits:
            self.edits[model.name](params)
        if model.name.startswith("Create"):
            self.sent[model.name].append(copy.deepcopy(params))
            if self.dry_run:
                if errors := request_errors(params, model):
                    raise ValueError(f"dry run: SageMaker would refuse this {model.name} request:\n  "
                                     + "\n  ".join(errors))
                raise DryRun(model.name, copy.deepcopy(params))

    def _s3_put(self, params: dict[str, Any], **_: Any) -> None:
        # ModelTrainer uploads `code` and `sm_drivers` file by file (Session.upload_data -> S3Transfer):
        # small files are one PutObject whose Body is a file-like chunk reader; read it and rewind,
        # so botocore can still compute its checksum from the start
        body = params.get("Body", b"")
        if hasattr(body, "read"):
            start = body.tell()
            data = body.read()
            body.seek(start)
        else:
            data = body.encode() if isinstance(body, str) else bytes(body)
        self.files[f"s3://{params['Bucket']}/{params['Key']}"] = data

    def _refuse(self, model, **_: Any):
        from botocore.awsrequest import AWSResponse
        from botocore.exceptions import ClientError

        if model.service_model.service_name == "s3" and model.name == "PutObject":
            return AWSResponse(None, 200, {}, None), {"ETag": '"dry-run"'}
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "dry run: nothing is sent"}}, model.name)


def make_session(sm: DictConfig, *, dry_run: bool = False,
                 edits: dict[str, Callable[[dict[str, Any]], None]] | None = None):
    """A SageMaker ``Session`` in ``sm.region`` on ``sm.bucket`` with a :class:`RequestHook`
    (``edits``: see there).

    In a dry run the default bucket is ``sm.bucket`` (or a placeholder) without asking S3.

    Returns:
        ``(session, hook)``.
    """
    import boto3
    from sagemaker.core.helper.session_helper import Session

    boto_session = boto3.Session(region_name=sm.region)
    hook = RequestHook(boto_session, edits=edits, dry_run=dry_run)
    if dry_run:
        from sagemaker.core.config.config import load_sagemaker_config

        class DryRunSession(Session):
            def default_bucket(self) -> str:  # the real one lists, checks or creates the bucket
                return sm.bucket or f"sagemaker-{sm.region}-ACCOUNT_ID"

        # the user's SDK defaults still apply; the SDK's usage telemetry (plain HTTPS, not boto) is off
        config = load_sagemaker_config()
        config.setdefault("SchemaVersion", "1.0")
        config.setdefault("SageMaker", {}).setdefault("PythonSDK", {}).setdefault("Modules", {})["TelemetryOptOut"] = True
        return DryRunSession(boto_session=boto_session, default_bucket=sm.bucket, sagemaker_config=config), hook
    return Session(boto_session=boto_session, default_bucket=sm.bucket), hook


@contextlib.contextmanager
def role_check_skipped():
    """Turn the SDK's check of the execution role off inside the block (its own switch,
    ``SAGEMAKER_VALIDATE_ROLE=false``; restored after)."""
    saved = os.environ.get("SAGEMAKER_VALIDATE_ROLE")
    os.environ["SAGEMAKER_VALIDATE_ROLE"] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["SAGEMAKER_VALIDATE_ROLE"]
        else:
            os.environ["SAGEMAKER_VALIDATE_ROLE"] = saved


def role_for(sm: DictConfig, dry_run: bool) -> str | None:
    """``sm.role``; in a dry run without one, a placeholder (a real launch asks AWS for the caller's)."""
    if sm.role or not dry_run:
        return sm.role
    log.warning("no role (sagemaker.role or $SAGEMAKER_ROLE): the dry run shows a placeholder")
    return "arn:aws:iam::000000000000:role/SageMakerExecutionRole"  # a valid ARN: the dry run checks the request


def describe_request(request: dict[str, Any], uploads: list[str]) -> str:
    """The dry-run printout of a request and of the files it would upload."""
    lines = [json.dumps(request, indent=2, sort_keys=True, default=str)]
    if uploads:
        prefixes = sorted({re.sub(r"^(.*/input/[^/]*).*", r"\1/", u) for u in uploads})
        lines.append(f"would upload {len(uploads)} files to: " + ", ".join(prefixes))
    return "\n".join(lines)
