"""Deploy a trained model to a SageMaker real-time endpoint, ask it for counts, delete it.

Usage:
    python -m sagemaker_launch.deploy model_data=s3://BUCKET/bincount/JOB/output/model.tar.gz endpoint=bincount-prod
    python -m sagemaker_launch.deploy job=bincount-20261122010956 instance_type=ml.g4dn.xlarge
    python -m sagemaker_launch.deploy invoke endpoint=bincount-prod photo.jpg s3://BUCKET/bin.jpg expected_quantity=3
    python -m sagemaker_launch.deploy delete endpoint=bincount-prod

``key=value`` arguments are overrides of ``conf/deploy.yaml`` (composed with Hydra, so a typo
fails before anything is created). Deploying creates a model (the AWS PyTorch inference image,
``model.tar.gz`` from ``model_data`` or the training job ``job``), an endpoint config and an
endpoint, all named ``endpoint``. ``model.tar.gz`` is what a training job's entry wrote to
``$SM_MODEL_DIR``: ``model.pt``, ``model_config.json`` and ``code/`` with ``inference.py``
(:mod:`bincount.serve.inference`'s ``model_fn``/``input_fn``/``predict_fn``/``output_fn``).
``invoke`` sends the photos (local files, or S3 URIs the endpoint reads) in one JSON request and
prints a count (and, with ``expected_quantity``, a verdict) per photo; ``delete`` removes the
endpoint, its config and its models.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bincount.config import config_dir
from sagemaker_launch import cost

log = logging.getLogger("sagemaker_launch")

COMMANDS = ("create", "invoke", "delete")


def compose_deploy(overrides: list[str]) -> DictConfig:
    """``conf/deploy.yaml`` composed with ``overrides``.

    Raises:
        hydra.errors.ConfigCompositionException: On an unknown key.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="deploy", overrides=overrides)


def parse_argv(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """``[command] key=value... [photo...]`` -> ``(command, overrides, photos)``.

    Raises:
        ValueError: Photos given to a command other than ``invoke``, or a local photo that doesn't exist.
    """
    command = argv[0] if argv and argv[0] in COMMANDS else "create"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    photos = [a for a in rest if a.startswith("s3://") or "=" not in a]
    overrides = [a for a in rest if a not in photos]
    if photos and command != "invoke":
        raise ValueError(f"{command} takes key=value arguments only, not {photos}")
    missing = [p for p in photos if not p.startswith("s3://") and not Path(p).is_file()]
    if missing:
        raise ValueError(f"no such photo: {missing}")
    return command, overrides, photos


def boto_session(cfg: DictConfig):
    import boto3

    return boto3.Session(region_name=cfg.region)


def inference_image(cfg: DictConfig) -> str:
    """``image_uri``, else the AWS PyTorch inference image for the instance type."""
    if cfg.image_uri:
        return str(cfg.image_uri)
    from sagemaker.core import image_uris

    return image_uris.retrieve("pytorch", cfg.region, version=str(cfg.framework_version), py_version=cfg.py_version,
                               instance_type=cfg.instance_type, image_scope="inference")


def model_data_of(cfg: DictConfig, session) -> str:
    """The ``model.tar.gz`` to deploy: ``model_data``, or the training job ``job``'s artifact.

    Raises:
        ValueError: If not exactly one of ``model_data`` and ``job`` is set.
    """
    if bool(cfg.model_data) == bool(cfg.job):
        raise ValueError("give exactly one of model_data=s3://.../model.tar.gz and job=<training job name>")
    if cfg.model_data:
        return str(cfg.model_data)
    from sagemaker.core.resources import TrainingJob

    job = TrainingJob.get(training_job_name=cfg.job, session=session, region=cfg.region)
    return job.model_artifacts.s3_model_artifacts


@dataclass
class Deployment:
    """What :func:`create_endpoint` made (model, endpoint config and endpoint share ``name``).

    Attributes:
        name: The endpoint's name.
        model_data: The deployed ``model.tar.gz``.
        image_uri: The serving image.
        status: The endpoint's status when :func:`create_endpoint` returned.
    """

    name: str
    model_data: str
    image_uri: str
    status: str


def create_endpoint(cfg: DictConfig) -> Deployment:
    """Create the model, the endpoint config and the endpoint; wait for InService if ``cfg.wait``.

    Raises:
        ValueError: No role (``role=`` or ``$SAGEMAKER_ROLE``), or see :func:`model_data_of`.
    """
    from sagemaker.core.resources import Endpoint, EndpointConfig, Model
    from sagemaker.core.shapes import ContainerDefinition, ProductionVariant

    if not cfg.role:
        raise ValueError("the model needs an execution role: role=arn:aws:iam::ACCOUNT:role/NAME or $SAGEMAKER_ROLE")
    session = boto_session(cfg)
    name = cfg.endpoint or f"bincount-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    model_data, image = model_data_of(cfg, session), inference_image(cfg)
    environment = {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
                   "SAGEMAKER_REGION": str(cfg.region), "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
                   **{str(k): str(v) for k, v in (cfg.environment or {}).items()}}
    Model.create(model_name=name, execution_role_arn=cfg.role, session=session, region=cfg.region,
                 primary_container=ContainerDefinition(image=image, model_data_url=model_data, environment=environment))
    EndpointConfig.create(endpoint_config_name=name, session=session, region=cfg.region, production_variants=[
        ProductionVariant(variant_name="AllTraffic", model_name=name, instance_type=cfg.instance_type,
                          initial_instance_count=int(cfg.instance_count))])
    endpoint = Endpoint.create(endpoint_name=name, endpoint_config_name=name, session=session, region=cfg.region)
    print(f"endpoint {name} ({cfg.instance_count} x {cfg.instance_type}, {image})\n  model {model_data}\n"
          f"  https://{cfg.region}.console.aws.amazon.com/sagemaker/home?region={cfg.region}#/endpoints/{name}")
    try:
        line = cost.estimate(cfg.instance_type, cfg.instance_count, 1, table="hosting")
        print(f"  costs about {line.on_demand_usd:.3f} USD per hour until deleted: "
              f"python -m sagemaker_launch.deploy delete endpoint={name}")
    except KeyError:
        pass
    if cfg.wait:
        endpoint.wait_for_status("InService")
    endpoint.refresh()
    return Deployment(name, model_data, image, str(endpoint.endpoint_status))


def request_body(photos: list[str], expected_quantity: int | None = None) -> str:
    """The JSON request for ``photos`` (local files inline as base64, ``s3://`` URIs by reference)."""
    instances = [{"s3_uri": p} if p.startswith("s3://") else {"image_b64": base64.b64encode(Path(p).read_bytes()).decode()}
                 for p in photos]
    return json.dumps({"instances": instances, "expected_quantity": [expected_quantity] * len(photos)})


def invoke_endpoint(cfg: DictConfig, photos: list[str]) -> dict[str, Any]:
    """Ask endpoint ``cfg.endpoint`` for the count of every photo, in one JSON request.

    The request is the handler's JSON form (:mod:`bincount.serve.inference`):
    ``{"instances": [{"image_b64": ...} or {"s3_uri": ...}], "expected_quantity": [...]}``.

    Args:
        cfg: ``conf/deploy.yaml`` (``endpoint``, ``expected_quantity`` for every photo or null).
        photos: Local JPEG/PNG files, or ``s3://`` URIs the endpoint's role can read.

    Returns:
        The parsed answer, ``{"predictions": [{"count": ..., ...}, ...]}`` in the photos' order.

    Raises:
        ValueError: No ``endpoint=`` or no photo.
    """
    from sagemaker.core.resources import Endpoint

    if not cfg.endpoint or not photos:
        raise ValueError("invoke needs endpoint=NAME and at least one photo")
    session = boto_session(cfg)
    endpoint = Endpoint.get(endpoint_name=cfg.endpoint, session=session, region=cfg.region)
    out = endpoint.invoke(body=request_body(photos, cfg.expected_quantity), content_type="application/json",
                          accept="application/json", session=session, region=cfg.region)
    answer = json.loads(out.body.read() if hasattr(out.body, "read") else out.body)
    for photo, prediction in zip(photos, answer.get("predictions", [])):
        verdict = f" ({prediction['verdict']})" if prediction.get("verdict") else ""
        print(f"{photo}: count {prediction.get('count')}{verdict}  {json.dumps(prediction)}")
    return answer


def delete_endpoint(cfg: DictConfig) -> list[str]:
    """Delete endpoint ``cfg.endpoint``, its endpoint config and the config's models.

    Returns:
        What was deleted, as ``"kind name"``.

    Raises:
        ValueError: No ``endpoint=``.
    """
    from sagemaker.core.resources import Endpoint, EndpointConfig, Model

    if not cfg.endpoint:
        raise ValueError("delete needs endpoint=NAME")
    session = boto_session(cfg)
    endpoint = Endpoint.get(endpoint_name=cfg.endpoint, session=session, region=cfg.region)
    config = EndpointConfig.get(endpoint_config_name=endpoint.endpoint_config_name, session=session, region=cfg.region)
    models = [v.model_name for v in config.production_variants]
    endpoint.delete()
    config.delete()
    deleted = [f"endpoint {cfg.endpoint}", f"endpoint config {config.endpoint_config_name}"]
    for model in models:
        Model.get(model_name=model, session=session, region=cfg.region).delete()
        deleted.append(f"model {model}")
    print("deleted " + ", ".join(deleted))
    return deleted


def main(argv: list[str] | None = None):
    """Run ``create`` (the default), ``invoke`` or ``delete``; see the module docstring."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command, overrides, photos = parse_argv(list(sys.argv[1:] if argv is None else argv))
    cfg = compose_deploy(overrides)
    if command == "invoke":
        return invoke_endpoint(cfg, photos)
    if command == "delete":
        return delete_endpoint(cfg)
    return create_endpoint(cfg)


if __name__ == "__main__":
    main()
