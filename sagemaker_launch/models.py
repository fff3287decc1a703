"""SageMaker models of bincount: CreateModel from a ``model.tar.gz`` on the serving image, or from a
model package; shared by ``deploy`` (endpoints) and ``transform`` (Batch Transform jobs).

A ``model.tar.gz`` is what a training job's entry wrote to ``$SM_MODEL_DIR``
(:mod:`sagemaker_launch.export`): ``model.pt``, ``model_config.json`` and ``code/`` with
``inference.py``, which the AWS PyTorch inference image's toolkit runs (``SAGEMAKER_PROGRAM``).
"""

from __future__ import annotations

from omegaconf import DictConfig


def job_model_data(job: str, session, region: str) -> str:
    """The ``model.tar.gz`` training job ``job`` wrote (DescribeTrainingJob's ``S3ModelArtifacts``)."""
    from sagemaker.core.resources import TrainingJob

    return TrainingJob.get(training_job_name=job, session=session, region=region).model_artifacts.s3_model_artifacts


def create_model(name: str, cfg: DictConfig, session, *, model_data: str | None = None, image: str | None = None,
                 model_package: str | None = None, environment=None) -> None:
    """CreateModel ``name``: ``model.tar.gz`` on the serving image with bincount's handler, or a model package.

    Args:
        name: The model's name.
        cfg: ``region`` and ``role`` (the model's execution role).
        session: The boto3 session.
        model_data: A ``model.tar.gz`` (its ``code/inference.py`` is the handler the image runs).
        image: The serving image of ``model_data`` (:func:`inference_image`).
        model_package: Instead, a model package's ARN: its own image, model data and environment.
        environment: More container variables for ``model_data``'s container.

    Raises:
        ValueError: No role, or not exactly one of ``model_data`` and ``model_package``.
    """
    from sagemaker.core.resources import Model
    from sagemaker.core.shapes import ContainerDefinition

    if not cfg.role:
        raise ValueError("the model needs an execution role: role=arn:aws:iam::ACCOUNT:role/NAME or $SAGEMAKER_ROLE")
    if bool(model_data) == bool(model_package):
        raise ValueError("a model is made of exactly one of a model.tar.gz and a model package")
    if model_package:
        Model.create(model_name=name, execution_role_arn=cfg.role, session=session, region=cfg.region,
                     containers=[ContainerDefinition(model_package_name=model_package)])
        return
    environment = {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
                   "SAGEMAKER_REGION": str(cfg.region), "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
                   **{str(k): str(v) for k, v in (environment or {}).items()}}
    Model.create(model_name=name, execution_role_arn=cfg.role, session=session, region=cfg.region,
                 primary_container=ContainerDefinition(image=image, model_data_url=model_data, environment=environment))
