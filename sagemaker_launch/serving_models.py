"""SageMaker models of bincount, shared by ``deploy`` (endpoints), ``register`` (model packages) and
``transform`` (Batch Transform jobs): the serving image (``conf/serving_image/``), the serving container,
and CreateModel from a training job, a ``model.tar.gz`` (:mod:`sagemaker_launch.model_archive`), a model
package or a package group's latest approved package (:mod:`sagemaker_launch.model_packages`), each
checked first (:func:`model_source`): a job stopped during test, calibration or export leaves a partial model.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from omegaconf import DictConfig

from sagemaker_launch import model_packages
from sagemaker_launch.model_packages import image_device
from sagemaker_launch.session import role_for

log = logging.getLogger("sagemaker_launch")

# the config keys naming a model; each command takes some of them, exactly one set
MODEL_SOURCES = {"model_data": "model_data=s3://.../model.tar.gz", "job": "job=<training job name>",
                 "model_package": "model_package=<model package ARN>", "package_group": "package_group=<group>"}


def boto_session(cfg: DictConfig):
    """A ``boto3.Session`` in ``cfg.region`` (every SageMaker and S3 call of deploy, register and transform)."""
    import boto3

    return boto3.Session(region_name=cfg.region)


def inference_image(cfg: DictConfig, instance_type: str | None = None) -> str:
    """``image_uri``, else the AWS PyTorch inference image for ``instance_type`` (default
    ``cfg.instance_type``) of ``conf/serving_image/``'s keys."""
    if cfg.image_uri:
        return str(cfg.image_uri)
    from sagemaker.core import image_uris

    return image_uris.retrieve("pytorch", cfg.region, version=str(cfg.framework_version), py_version=cfg.py_version,
                               instance_type=instance_type or cfg.instance_type, image_scope="inference")


def instance_device(instance_type: str) -> str | None:
    """``"gpu"`` for an instance type with NVIDIA GPUs (``ml.g*``, ``ml.p*``), ``"cpu"`` for one without,
    ``None`` where that can't be told (:func:`sagemaker_launch.cost.has_gpus`)."""
    from sagemaker_launch import cost

    try:
        return "gpu" if cost.has_gpus(instance_type) else "cpu"
    except KeyError:
        return None


def job_model_data(job: str, session, region: str) -> str:
    """The ``model.tar.gz`` training job ``job`` wrote, if the job completed.

    Raises:
        ValueError: If its ``TrainingJobStatus`` is not ``Completed`` (named, with the job's
            ``FailureReason`` if it has one).
    """
    from sagemaker.core.resources import TrainingJob

    described = TrainingJob.get(training_job_name=job, session=session, region=region)
    status = str(described.training_job_status)
    if status != "Completed":  # SageMaker uploads the model folder of a stopped job too
        reason = described.failure_reason if isinstance(described.failure_reason, str) else ""
        advice = ("wait until it is Completed" if status in ("InProgress", "Stopping")
                  else "its model may be partial: train it again")
        raise ValueError(f"training job {job} is {status}{f' ({reason})' if reason else ''}: only a Completed job's "
                         f"model is served or registered; {advice}")
    return described.model_artifacts.s3_model_artifacts


def check_model_archive(model_data: str, session) -> None:
    """Check that ``model_data`` (``s3://.../model.tar.gz``; another URI is not checked) holds
    ``model.onnx``, ``model.pt`` and the model card ``model_config.json``, streaming the member names.

    Raises:
        ValueError: No such object, not a tar archive, or a file missing (named).
    """
    from botocore.exceptions import ClientError

    from bincount.data.s3 import is_s3_uri, split_s3_uri
    from bincount.models.export import CONFIG_FILE, MODEL_FILE, ONNX_FILE

    if not is_s3_uri(model_data):
        return
    bucket, key = split_s3_uri(model_data)
    try:
        body = session.client("s3").get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NoSuchBucket"):
            raise
        raise ValueError(f"{model_data} not found") from None
    missing = {MODEL_FILE, ONNX_FILE, CONFIG_FILE}
    try:
        with body, tarfile.open(fileobj=body, mode="r|*") as tar:
            for member in tar:
                missing.discard(str(PurePosixPath(member.name)))
                if not missing:
                    return
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"{model_data} is not a readable model.tar.gz ({err})") from None
    names = " and ".join(f"the model card {n}" if n == CONFIG_FILE else n for n in sorted(missing))
    raise ValueError(f"{model_data} lacks {names}: not a complete model (a training job stopped before its export "
                     "finished leaves one)")


@dataclass(frozen=True)
class ModelSource:
    """What a SageMaker model is made of: ``model_data`` (an S3 URI) on ``image`` (both ``""`` for a
    package not looked up: a dry run), or ``model_package`` (an ARN; ``None``: not a package) with the
    ``Name`` of the additional ``inference_specification`` it runs (``None``: its own)."""

    model_data: str
    image: str
    model_package: str | None = None
    inference_specification: str | None = None


def source_key(cfg: DictConfig, sources: tuple[str, ...]) -> str:
    """The one of ``sources`` (keys of :data:`MODEL_SOURCES`) that ``cfg`` sets; nothing is asked.

    Raises:
        ValueError: If not exactly one is set.
    """
    given = [k for k in sources if cfg.get(k)]
    if len(given) != 1:
        raise ValueError("give exactly one of " + ", ".join(MODEL_SOURCES[k] for k in sources))
    return given[0]


def package_source(package: dict[str, Any], instance_type: str, use: str) -> ModelSource:
    """The inference specification of model package ``package`` (DescribeModelPackage's answer) that
    serves on ``instance_type`` for ``use`` (:data:`sagemaker_launch.model_packages.REALTIME` or
    ``TRANSFORM``), as a :class:`ModelSource`.

    A specification listing instance types for ``use`` serves on those; one listing none (a package
    registered by other means) serves where its image's device (:func:`image_device`) is the instance
    type's (:func:`instance_device`), or either device can't be told.

    Raises:
        ValueError: No specification serves on ``instance_type``: the line names the types the package
            lists (or the image's device) and how to deploy anyway.
    """
    arn = package["ModelPackageArn"]
    specs = [(None, package["InferenceSpecification"]),
             *((s["Name"], s) for s in package.get("AdditionalInferenceSpecifications") or [])]
    listed = [t for _, spec in specs for t in spec.get(use) or []]
    want = instance_device(instance_type)
    for name, spec in specs:
        container = spec["Containers"][0]
        types = spec.get(use) or []
        device = image_device(container["Image"])
        if instance_type in types or not types and (device is None or want is None or device == want):
            return ModelSource(container.get("ModelDataUrl", ""), container["Image"], arn, name)
    fix = f"or register the model again with instance_type={instance_type} (python -m sagemaker_launch.register)"
    if listed:
        kind = "endpoints" if use == model_packages.REALTIME else "transform jobs"
        raise ValueError(f"model package {arn} does not serve on {instance_type}: it lists {', '.join(listed)} for "
                         f"{kind}; give instance_type={listed[0]} (or another listed type), {fix}")
    image = package["InferenceSpecification"]["Containers"][0]["Image"]
    raise ValueError(f"model package {arn} runs the {image_device(image).upper()} image {image}, and {instance_type} "
                     f"is a {want.upper()} instance: give a {image_device(image).upper()} instance_type, {fix}")


def model_source(cfg: DictConfig, session, sources: tuple[str, ...], *, dry_run: bool = False,
                 use: str = model_packages.REALTIME) -> ModelSource:
    """Resolve the one of ``sources`` that ``cfg`` sets (:func:`source_key`): a ``model.tar.gz`` on the
    serving image, or a package's inference specification for ``cfg.instance_type`` and ``use``
    (:func:`package_source`). In a dry run nothing is asked, so a job's ``model.tar.gz`` and a group's
    package are placeholders and nothing is checked.

    Raises:
        ValueError: See :func:`source_key`, :func:`job_model_data`, :func:`check_model_archive` and
            :func:`package_source`; a group without an approved package.
    """
    key = source_key(cfg, sources)
    value = str(cfg[key])
    if key == "model_package" and dry_run:
        return ModelSource("", "", value)
    if key == "package_group" and dry_run:
        log.warning("dry run: the latest approved package of %s is not looked up; the request shows a placeholder",
                    value)
        return ModelSource("", "", f"arn:aws:sagemaker:{cfg.region}:000000000000:model-package/{value}/LATEST")
    if key in ("model_package", "package_group"):
        sm = session.client("sagemaker")
        package = (sm.describe_model_package(ModelPackageName=value) if key == "model_package"
                   else model_packages.latest_approved(sm, value))
        if package is None:
            raise ValueError(f"model package group {value} has no approved package: approve one (python -m "
                             f"sagemaker_launch.register ... group={value} approve_if_better=true, or in the console)")
        return package_source(package, str(cfg.instance_type), use)
    if key == "job" and dry_run:
        log.warning("dry run: training job %s's model.tar.gz is not looked up; the request shows a placeholder", value)
        return ModelSource(f"s3://TRAINING-JOB-OUTPUT/{value}/output/model.tar.gz", inference_image(cfg))
    model_data = job_model_data(value, session, cfg.region) if key == "job" else value
    if not dry_run:
        check_model_archive(model_data, session)
    return ModelSource(model_data, inference_image(cfg))


def serving_container(cfg: DictConfig, source: ModelSource, environment=None):
    """The model's ``sagemaker.core.shapes.ContainerDefinition``: ``source``'s package, or its ``model.tar.gz``
    on its image running ``code/inference.py`` (bincount's handler); plus ``environment`` (e.g.
    ``BINCOUNT_REVIEW_THRESHOLD``). A register packs the same container (serialized) into its package."""
    from sagemaker.core.shapes import ContainerDefinition

    extra = {str(k): str(v) for k, v in (environment or {}).items()}
    if source.model_package:
        spec = source.inference_specification
        chosen = {"inference_specification_name": spec} if spec else {}
        return ContainerDefinition(model_package_name=source.model_package, environment=extra or None, **chosen)
    return ContainerDefinition(image=source.image, model_data_url=source.model_data, environment={
        "SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
        "SAGEMAKER_REGION": str(cfg.region), "SAGEMAKER_CONTAINER_LOG_LEVEL": "20", **extra})


def require_role(cfg: DictConfig, dry_run: bool = False) -> str:
    """``cfg.role``, the model's execution role (in a dry run without one, a placeholder); checked
    before any request, so that a missing one is the first error, also without AWS credentials.

    Raises:
        ValueError: No role (``role=`` or ``$SAGEMAKER_ROLE``) outside a dry run.
    """
    if not cfg.role and not dry_run:
        raise ValueError("the model needs an execution role: role=arn:aws:iam::ACCOUNT:role/NAME or $SAGEMAKER_ROLE")
    return str(role_for(cfg, dry_run))


def create_model(name: str, cfg: DictConfig, session, source: ModelSource, environment=None) -> None:
    """CreateModel ``name`` on :func:`serving_container`, in ``cfg.region`` with execution role ``cfg.role``
    (:func:`require_role`), through ``session`` (a ``boto3.Session``)."""
    from sagemaker.core.resources import Model

    Model.create(model_name=name, execution_role_arn=cfg.role, session=session, region=cfg.region,
                 primary_container=serving_container(cfg, source, environment))
