"""Count every photo under an S3 prefix with a SageMaker Batch Transform job running bincount's handler.

Usage:
    python -m sagemaker_launch.transform model=bincount-20261203024536 input=s3://BUCKET/bin-images/ \
        output=s3://BUCKET/counts/
    python -m sagemaker_launch.transform model_package=arn:aws:sagemaker:us-east-1:123456789012:model-package/bincount/3 \
        input=s3://BUCKET/bin-images/ output=s3://BUCKET/counts/ instance_count=4 --dry-run
    python -m sagemaker_launch.transform package_group=bincount-counting input=s3://BUCKET/bin-images/ \
        output=s3://BUCKET/counts/
    bincount transform collect s3://BUCKET/counts/ --input-prefix s3://BUCKET/bin-images/ --model-dir model/ \
        --out counts.csv

``key=value`` arguments are overrides of ``conf/transform.yaml`` (``model=`` names a training job,
a model package's ARN or a ``model.tar.gz`` URI: :func:`model_override`). The command creates a model
named like the job, ``<base_job_name>-<timestamp>``, as ``deploy`` makes it
(:mod:`sagemaker_launch.serving_models`), then a transform job on it that sends every object under
``input`` whole, as one request, to :mod:`bincount.serve.inference`'s handler; Batch Transform writes
each answer to ``<output><key under input>.out``, which ``bincount transform collect`` joins into one
CSV. ``--dry-run`` checks both requests against SageMaker's service model and prints them, sending
nothing; ``--wait`` waits for the job to end. See docs/sagemaker.md, "Batch counting".
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from bincount.config import compose
from sagemaker_launch import cost, model_packages, serving_models
from sagemaker_launch.session import DryRun, RequestHook, console_url, describe_request

log = logging.getLogger("sagemaker_launch")

# SageMaker's limit for MaxPayloadInMB, and for MaxPayloadInMB x MaxConcurrentTransforms (CreateTransformJob's
# documentation; the service model states no maximum, so the dry run's check cannot catch it)
MAX_PAYLOAD_MB = 100
SOURCES = ("job", "model_package", "model_data", "package_group")  # exactly one names the model (serving_models.py)
ACCEPT = "application/json"  # what the handler answers (bincount.serve.request)


def folder(uri: str) -> str:
    """An S3 prefix as a folder, ending in ``/`` (``s3://b/bin-images`` would also match ``bin-images-old/``).

    Raises:
        ValueError: If ``uri`` is not ``s3://bucket/...``.
    """
    if not re.fullmatch(r"s3://[^/]+(/.*)?", str(uri or "")):
        raise ValueError(f"{uri!r} is not an S3 prefix: give s3://BUCKET/PREFIX/")
    return str(uri).rstrip("/") + "/"


def check_config(cfg: DictConfig) -> None:
    """Refuse what SageMaker would refuse, before anything is created.

    Raises:
        ValueError: Not exactly one of :data:`SOURCES`; no ``input`` or
            ``output``; a prefix that is not ``s3://``; fewer than one instance or request per
            instance; ``max_payload_mb`` outside 1..100 or, times ``max_concurrent_transforms``, over
            :data:`MAX_PAYLOAD_MB`.
    """
    serving_models.source_key(cfg, SOURCES)
    missing = [k for k in ("input", "output") if not cfg[k]]
    if missing:
        raise ValueError(f"transform needs {', '.join(f'{k}=' for k in missing)} (see conf/transform.yaml)")
    folder(cfg.input), folder(cfg.output)
    payload, concurrent = int(cfg.max_payload_mb), int(cfg.max_concurrent_transforms)
    if int(cfg.instance_count) < 1 or concurrent < 1:
        raise ValueError("instance_count and max_concurrent_transforms must be at least 1")
    if not 1 <= payload <= MAX_PAYLOAD_MB:
        raise ValueError(f"max_payload_mb={payload}: SageMaker takes 1 to {MAX_PAYLOAD_MB} MB")
    if payload * concurrent > MAX_PAYLOAD_MB:
        raise ValueError(f"max_concurrent_transforms={concurrent} x max_payload_mb={payload} = "
                         f"{payload * concurrent} MB: SageMaker allows at most {MAX_PAYLOAD_MB} MB; lower one of them")


def job_environment(cfg: DictConfig) -> dict[str, str]:
    """The transform job's container environment: the handler's photo limit at ``max_payload_mb`` MiB
    and its Batch Transform answers (a photo it cannot count is answered 200 with ``{"error": ...}``:
    a 4xx would fail the whole job), then ``cfg.environment`` (which may override them)."""
    return {"BINCOUNT_MAX_IMAGE_BYTES": str(int(cfg.max_payload_mb) * 2**20), "BINCOUNT_BATCH_TRANSFORM": "true",
            **{str(k): str(v) for k, v in (cfg.environment or {}).items()}}


@dataclass
class Transform:
    """What :func:`create_transform` did: ``job_name`` (also its model's), the CreateModel and
    CreateTransformJob ``requests`` as sent (or not sent: ``dry_run``), and the job's ``status`` on return
    (``""`` in a dry run) with its ``failure_reason``, if it failed."""

    job_name: str
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    dry_run: bool = False
    status: str = ""
    failure_reason: str = ""


def create_transform(cfg: DictConfig, *, dry_run: bool = False, wait: bool = False) -> Transform:
    """Create the model and the transform job of ``cfg`` (or, in a dry run, check and keep their requests).

    Args:
        cfg: ``conf/transform.yaml``.
        dry_run: Send nothing (the role and a training job's model data may be placeholders).
        wait: Wait until the job ends.

    Raises:
        ValueError: See :func:`check_config`, :func:`sagemaker_launch.serving_models.model_source` and
            :func:`~sagemaker_launch.serving_models.require_role`; in a dry run, a request SageMaker refuses.
    """
    from sagemaker.core import shapes
    from sagemaker.core.common_utils import name_from_base
    from sagemaker.core.resources import TransformJob
    from sagemaker.core.utils.exceptions import FailedStatusError

    check_config(cfg)
    cfg.role = serving_models.require_role(cfg, dry_run)
    session = serving_models.boto_session(cfg)
    hook = RequestHook(session, dry_run=dry_run)
    name = name_from_base(str(cfg.base_job_name))
    source = serving_models.model_source(cfg, session, SOURCES, dry_run=dry_run, use=model_packages.TRANSFORM)
    with contextlib.suppress(DryRun):  # a dry run goes on to keep the transform job's request too
        serving_models.create_model(name, cfg, session, source)
    try:
        job = TransformJob.create(
            transform_job_name=name, model_name=name, session=session, region=cfg.region,
            transform_input=shapes.TransformInput(
                data_source=shapes.TransformDataSource(s3_data_source=shapes.TransformS3DataSource(
                    s3_data_type="S3Prefix", s3_uri=folder(cfg.input))),
                content_type=str(cfg.content_type), split_type="None", compression_type="None"),
            transform_output=shapes.TransformOutput(s3_output_path=folder(cfg.output), accept=ACCEPT,
                                                    assemble_with="None"),
            transform_resources=shapes.TransformResources(instance_type=cfg.instance_type,
                                                          instance_count=int(cfg.instance_count)),
            batch_strategy="SingleRecord", max_payload_in_mb=int(cfg.max_payload_mb),
            max_concurrent_transforms=int(cfg.max_concurrent_transforms), environment=job_environment(cfg))
    except DryRun:
        return Transform(name, {op: sent[-1] for op, sent in hook.sent.items()}, dry_run=True)
    print(f"transform job {name} ({cfg.instance_count} x {cfg.instance_type}): "
          f"{source.model_package or source.model_data}\n"
          f"  {folder(cfg.input)} -> {folder(cfg.output)}\n  {console_url(cfg.region, name, 'transform')}\n"
          f"  {cost.hosting_text(cfg.instance_type, cfg.instance_count, 'while it runs')}", flush=True)
    if wait:
        with contextlib.suppress(FailedStatusError):  # reported by the status below
            job.wait()
    job.refresh()
    reason = job.failure_reason if isinstance(job.failure_reason, str) else ""
    return Transform(name, {op: sent[-1] for op, sent in hook.sent.items()}, False, str(job.transform_job_status),
                     reason)


def model_override(value: str) -> str:
    """``model=VALUE`` as the override of the key it names: a model package's ARN -> ``model_package``,
    an S3 URI -> ``model_data``, anything else -> ``job`` (a training job's name).

    ``model`` cannot be a key of ``conf/transform.yaml`` itself: Hydra reads ``model=`` as the
    ``conf/model/`` config group.
    """
    if value.startswith("arn:") and ":model-package/" in value:
        return f"model_package={value}"
    return f"model_data={value}" if value.startswith("s3://") else f"job={value}"


def parse_argv(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Split ``--dry-run``/``--wait`` from the Hydra overrides of ``argv`` (``None``: ``sys.argv[1:]``),
    ``model=`` read by :func:`model_override`; ``--help`` prints the module docstring too."""
    parser = argparse.ArgumentParser(prog="python -m sagemaker_launch.transform", epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Hydra overrides of conf/transform.yaml, plus:")
    parser.add_argument("--dry-run", action="store_true", help="check and print the requests, send nothing")
    parser.add_argument("--wait", action="store_true", help="wait until the job has ended")
    flags, overrides = parser.parse_known_args(argv)
    return flags, [model_override(a.split("=", 1)[1]) if a.startswith("model=") else a for a in overrides]


def main(argv: list[str] | None = None) -> Transform:
    """Compose, check, and create (or dry-run) one transform job; see the module docstring.

    Raises:
        SystemExit: 1 if ``--wait`` saw the job fail or stop.
    """
    flags, overrides = parse_argv(argv)
    cfg = compose("transform", overrides)
    made = create_transform(cfg, dry_run=flags.dry_run, wait=flags.wait)
    if made.dry_run:
        for operation, request in made.requests.items():
            print(f"DRY RUN: {operation} {made.job_name} (not sent)\n{describe_request(request, [])}")
        print(cost.hosting_text(cfg.instance_type, cfg.instance_count, "while it runs"))
        return made
    if flags.wait and made.status != "Completed":
        print(f"error: transform job {made.job_name} {made.status}: {made.failure_reason}", file=sys.stderr)
        raise SystemExit(1)
    print(f"  status {made.status}; once Completed, one CSV of the counts: bincount transform collect "
          f"{folder(cfg.output)} --input-prefix {folder(cfg.input)} --model-dir MODEL_DIR --out counts.csv")
    return made


if __name__ == "__main__":
    from sagemaker_launch import run

    run(main)
