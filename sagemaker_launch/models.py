"""SageMaker models of bincount, shared by ``deploy`` (endpoints), ``register`` (model packages) and
``transform`` (Batch Transform jobs): the serving image (``conf/serving_image/``), the serving container,
and CreateModel from a training job, a ``model.tar.gz``, a model package or a package group's latest
approved package.

A ``model.tar.gz`` is what a training job's entry wrote to ``$SM_MODEL_DIR``
(:mod:`sagemaker_launch.export`): ``model.pt``, ``model_config.json`` and ``code/`` with
``inference.py``, which the AWS PyTorch inference image's toolkit runs (``SAGEMAKER_PROGRAM``).
A model package (:mod:`sagemaker_launch.registry`) carries its own image, model data and environment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from sagemaker_launch import registry

log = logging.getLogger("sagemaker_launch")

# the config keys naming a model; each command takes some of them, exactly one set
MODEL_SOURCES = {"model_data": "model_data=s3://.../model.tar.gz", "job": "job=<training job name>",
                 "model_package": "model_package=<model package ARN>", "package_group": "package_group=<group>"}


def boto_session(cfg: DictConfig):
    """A ``boto3.Session`` in ``cfg.region`` (every SageMaker and S3 call of deploy, register and transform)."""
    import boto3

    return boto3.Session(region_name=cfg.region)


def inference_image(cfg: DictConfig) -> str:
    """``image_uri``, else the AWS PyTorch inference image of ``framework_version``/``py_version`` for
    ``instance_type`` (CPU or GPU), in ``region`` (the keys of ``conf/serving_image/``)."""
    if cfg.image_uri:
        return str(cfg.image_uri)
    from sagemaker.core import image_uris

    return image_uris.retrieve("pytorch", cfg.region, version=str(cfg.framework_version), py_version=cfg.py_version,
                               instance_type=cfg.instance_type, image_scope="inference")


def job_model_data(job: str, session, region: str) -> str:
    """The ``model.tar.gz`` training job ``job`` wrote (DescribeTrainingJob's ``S3ModelArtifacts``)."""
    from sagemaker.core.resources import TrainingJob

    return TrainingJob.get(training_job_name=job, session=session, region=region).model_artifacts.s3_model_artifacts


@dataclass(frozen=True)
class ModelSource:
    """What a SageMaker model is made of.

    Attributes:
        model_data: The ``model.tar.gz`` S3 URI (``""`` for a model package named by ARN only).
        image: The serving image (``""`` likewise).
        model_package: A model package's ARN: the model is made from it (its own image, model data
            and environment), else ``None``: from ``model_data`` on ``image``.
    """

    model_data: str
    image: str
    model_package: str | None = None


def source_key(cfg: DictConfig, sources: tuple[str, ...]) -> str:
    """The one of ``sources`` (keys of :data:`MODEL_SOURCES`) that ``cfg`` sets; nothing is asked.

    Raises:
        ValueError: If not exactly one is set.
    """
    given = [k for k in sources if cfg.get(k)]
    if len(given) != 1:
        raise ValueError("give exactly one of " + ", ".join(MODEL_SOURCES[k] for k in sources))
    return given[0]


def model_source(cfg: DictConfig, session, sources: tuple[str, ...], *, dry_run: bool = False) -> ModelSource:
    """Resolve the one of ``sources`` that ``cfg`` sets (:func:`source_key`).

    ``job``: its ``model.tar.gz``; ``package_group``: the group's latest approved package
    (:func:`sagemaker_launch.registry.deployable_package`); both on the serving image, or the package's.
    In a dry run nothing is asked, so a job's ``model.tar.gz`` and a group's package are placeholders.

    Raises:
        ValueError: See :func:`source_key`; a group without an approved package.
    """
    key = source_key(cfg, sources)
    value = str(cfg[key])
    if key == "model_package":
        return ModelSource("", "", value)
    if key == "package_group":
        if dry_run:
            log.warning("dry run: the latest approved package of %s is not looked up; the request shows a placeholder",
                        value)
            return ModelSource("", "", f"arn:aws:sagemaker:{cfg.region}:000000000000:model-package/{value}/LATEST")
        arn, image, model_data = registry.deployable_package(session, value)
        return ModelSource(model_data, image, arn)
    if key == "job" and dry_run:
        log.warning("dry run: training job %s's model.tar.gz is not looked up; the request shows a placeholder", value)
        return ModelSource(f"s3://TRAINING-JOB-OUTPUT/{value}/output/model.tar.gz", inference_image(cfg))
    model_data = job_model_data(value, session, cfg.region) if key == "job" else value
    return ModelSource(model_data, inference_image(cfg))


def serving_container(cfg: DictConfig, source: ModelSource, environment=None):
    """The model's container: ``source``'s package, or its ``model.tar.gz`` on its image running
    ``code/inference.py`` (bincount's handler) in ``cfg.region``; plus ``environment`` (e.g.
    ``BINCOUNT_REVIEW_THRESHOLD``). A register packs the same container (serialized) into its package.

    Returns:
        A ``sagemaker.core.shapes.ContainerDefinition``.
    """
    from sagemaker.core.shapes import ContainerDefinition

    extra = {str(k): str(v) for k, v in (environment or {}).items()}
    if source.model_package:
        return ContainerDefinition(model_package_name=source.model_package, environment=extra or None)
    return ContainerDefinition(image=source.image, model_data_url=source.model_data, environment={
        "SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
        "SAGEMAKER_REGION": str(cfg.region), "SAGEMAKER_CONTAINER_LOG_LEVEL": "20", **extra})


def package_container(cfg: DictConfig, source: ModelSource, environment=None) -> dict[str, Any]:
    """:func:`serving_container` as a model package's ``InferenceSpecification.Containers`` item
    (``Image``, ``ModelDataUrl``, ``Environment``)."""
    from sagemaker.core.utils.utils import serialize

    return serialize(serving_container(cfg, source, environment))


def require_role(cfg: DictConfig) -> str:
    """``cfg.role``, the model's execution role; checked before any request, so that a missing one is
    the first error, also without AWS credentials.

    Raises:
        ValueError: No role (``role=`` or ``$SAGEMAKER_ROLE``).
    """
    if not cfg.role:
        raise ValueError("the model needs an execution role: role=arn:aws:iam::ACCOUNT:role/NAME or $SAGEMAKER_ROLE")
    return str(cfg.role)


def create_model(name: str, cfg: DictConfig, session, source: ModelSource, environment=None) -> None:
    """CreateModel ``name`` on :func:`serving_container` (``PrimaryContainer``).

    Args:
        name: The model's name.
        cfg: ``region`` and ``role`` (the model's execution role).
        session: The ``boto3.Session``.
        source: See :func:`model_source`.
        environment: More container variables.

    Raises:
        ValueError: No role.
    """
    from sagemaker.core.resources import Model

    require_role(cfg)
    Model.create(model_name=name, execution_role_arn=cfg.role, session=session, region=cfg.region,
                 primary_container=serving_container(cfg, source, environment))
