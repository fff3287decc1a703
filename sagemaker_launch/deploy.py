"""Deploy a trained model to a SageMaker real-time endpoint (or update one), ask it for counts, delete it.

Usage:
    python -m sagemaker_launch.deploy model_data=s3://BUCKET/bincount/JOB/output/model.tar.gz endpoint=bincount-prod
    python -m sagemaker_launch.deploy job=bincount-20261122010956 instance_type=ml.g4dn.xlarge
    python -m sagemaker_launch.deploy package_group=bincount-counting endpoint=bincount-prod
    python -m sagemaker_launch.deploy job=bincount-20261122010956 endpoint=bincount-prod --dry-run
    python -m sagemaker_launch.deploy invoke endpoint=bincount-prod photo.jpg s3://BUCKET/bin.jpg expected_quantity=3
    python -m sagemaker_launch.deploy delete endpoint=bincount-prod

``key=value`` arguments are overrides of ``conf/deploy.yaml`` (composed with Hydra, so a typo
fails before anything is created). Deploying creates a model (:mod:`sagemaker_launch.serving_models`)
and an endpoint config, both named ``<endpoint>-<timestamp>``, then creates endpoint ``endpoint`` on
them, or, if it exists, points it at them with UpdateEndpoint. ``invoke`` sends the photos in as few
JSON requests as fit (:mod:`sagemaker_launch.invoke`); ``delete`` removes the endpoint and every
endpoint config and model deployed under its name. ``--dry-run`` checks the three Create* requests
against SageMaker's service model and prints them, sending nothing. See docs/sagemaker.md.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bincount.config import compose
from sagemaker_launch import cost, serving_models
from sagemaker_launch.invoke import invoke_endpoint
from sagemaker_launch.session import DryRun, RequestHook, console_url, describe_request

log = logging.getLogger("sagemaker_launch")

COMMANDS = ("create", "invoke", "delete")


def parse_argv(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """``[command] key=value... [photo...]`` -> ``(command, overrides, photos)``, ``--dry-run`` as the
    override ``dry_run=true``; ``-h``/``--help`` prints the module docstring and exits 0.

    Raises:
        ValueError: Photos given to a command other than ``invoke``, a local photo that doesn't
            exist, or ``--dry-run`` with ``invoke`` or ``delete``.
    """
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        raise SystemExit(0)
    command = argv[0] if argv and argv[0] in COMMANDS else "create"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    if "--dry-run" in rest:
        if command != "create":
            raise ValueError(f"--dry-run is for deploying (create), not {command}")
        rest = [*(a for a in rest if a != "--dry-run"), "dry_run=true"]
    photos = [a for a in rest if a.startswith("s3://") or "=" not in a]
    overrides = [a for a in rest if a not in photos]
    if photos and command != "invoke":
        raise ValueError(f"{command} takes key=value arguments only, not {photos}")
    missing = [p for p in photos if not p.startswith("s3://") and not Path(p).is_file()]
    if missing:
        raise ValueError(f"no such photo: {missing}")
    return command, overrides, photos


SOURCES = ("model_data", "job", "package_group")  # what deploy takes of serving_models.MODEL_SOURCES

# names of what one deploy makes: sagemaker.core.common_utils.name_from_base's timestamp
TIMESTAMP = r"\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}-\d{3}"
MAX_NAME = 63  # SageMaker's limit for model, endpoint config and endpoint names
MAX_ENDPOINT_NAME = MAX_NAME - len("-2026-01-01-00-00-00-000")  # name_from_base keeps this much of its base


def endpoint_name(cfg: DictConfig) -> str:
    """``cfg.endpoint``, else ``bincount-<UTC time>``.

    Raises:
        ValueError: If the name is longer than :data:`MAX_ENDPOINT_NAME` characters (its models
            and configs, ``<endpoint>-<timestamp>``, must fit SageMaker's 63).
    """
    name = str(cfg.endpoint or f"bincount-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    if len(name) > MAX_ENDPOINT_NAME:
        raise ValueError(f"endpoint={name} is {len(name)} characters; at most {MAX_ENDPOINT_NAME}, so that its "
                         f"models and endpoint configs, named <endpoint>-<timestamp>, fit SageMaker's {MAX_NAME}")
    return name


def deployed_under(name: str) -> re.Pattern:
    """Names of the models and endpoint configs deployed for endpoint ``name``: ``name-<timestamp>``,
    or ``name`` itself (a model and config named like their endpoint, as deploys used to make them)."""
    return re.compile(rf"{re.escape(name)}(-{TIMESTAMP})?")


def find_endpoint(name: str, session, region: str):
    """Endpoint ``name``, or ``None`` if there is none.

    Raises:
        botocore.exceptions.ClientError: Any error but "Could not find endpoint".
    """
    from botocore.exceptions import ClientError
    from sagemaker.core.resources import Endpoint

    try:
        return Endpoint.get(endpoint_name=name, session=session, region=region)
    except ClientError as err:
        error = err.response.get("Error", {})
        if error.get("Code") == "ValidationException" and "Could not find endpoint" in error.get("Message", ""):
            return None
        raise


@dataclass
class Deployment:
    """What :func:`create_endpoint` made: endpoint ``name`` serving ``model_data`` on ``image_uri``, its
    ``status`` on return, the new ``model`` (and endpoint config), the ``previous_config`` it served before
    an update (``None``: created, or a dry run), and in a dry run the unsent Create* ``requests`` by operation."""

    name: str
    model_data: str
    image_uri: str
    status: str
    model: str = ""
    previous_config: str | None = None
    requests: dict[str, dict[str, Any]] | None = None


def create_endpoint(cfg: DictConfig) -> Deployment:
    """Create a model and an endpoint config, then create endpoint ``cfg.endpoint`` on them or
    update it to them if it exists; wait for InService if ``cfg.wait``. With ``cfg.dry_run``, check
    and keep the three Create* requests instead, sending nothing. ``cfg``: ``conf/deploy.yaml``.

    Raises:
        ValueError: No role (``role=`` or ``$SAGEMAKER_ROLE``; a dry run shows a placeholder), an
            existing endpoint that is not InService (it cannot be updated), or see
            :func:`sagemaker_launch.serving_models.model_source` and :func:`endpoint_name`; in a dry run, a
            request SageMaker's service model refuses.
    """
    from sagemaker.core.common_utils import name_from_base
    from sagemaker.core.resources import Endpoint, EndpointConfig
    from sagemaker.core.shapes import ProductionVariant

    name = endpoint_name(cfg)
    dry_run = bool(cfg.dry_run)
    cfg.role = serving_models.require_role(cfg, dry_run)
    session = serving_models.boto_session(cfg)
    hook = RequestHook(session, dry_run=dry_run)
    source = serving_models.model_source(cfg, session, SOURCES, dry_run=dry_run)
    model_data, image = source.model_data, source.image
    endpoint = None if dry_run else find_endpoint(name, session, cfg.region)
    if endpoint is not None and endpoint.endpoint_status != "InService":
        raise ValueError(f"endpoint {name} is {endpoint.endpoint_status}: it can be updated only when InService "
                         f"(wait for it, or delete it: python -m sagemaker_launch.deploy delete endpoint={name})")
    resource = name_from_base(name)  # unique: the endpoint's current model and config are still in use
    variants = [ProductionVariant(variant_name="AllTraffic", model_name=resource, instance_type=cfg.instance_type,
                                  initial_instance_count=int(cfg.instance_count))]
    with contextlib.suppress(DryRun):  # in a dry run each Create* stops at its DryRun, and the hook keeps its request
        serving_models.create_model(resource, cfg, session, source, cfg.environment)
    with contextlib.suppress(DryRun):
        EndpointConfig.create(endpoint_config_name=resource, session=session, region=cfg.region,
                              production_variants=variants)
    previous = None
    if endpoint is None:
        try:
            endpoint = Endpoint.create(endpoint_name=name, endpoint_config_name=resource, session=session,
                                       region=cfg.region)
        except DryRun:
            return Deployment(name, model_data, image, "", resource, None,
                              {op: sent[-1] for op, sent in hook.sent.items()})
        action = "endpoint"
    else:
        previous = endpoint.endpoint_config_name
        endpoint.endpoint_config_name = resource
        endpoint.update()
        action = f"updating endpoint (was config {previous}, kept until delete)"
    print(f"{action} {name} ({cfg.instance_count} x {cfg.instance_type}, {image})\n"
          f"  model and endpoint config {resource}: {model_data}\n"
          f"  {console_url(cfg.region, name, 'endpoint')}")
    print("  " + cost.hosting_text(cfg.instance_type, cfg.instance_count,
                                   f"until deleted: python -m sagemaker_launch.deploy delete endpoint={name}"))
    if cfg.wait:
        endpoint.wait_for_status("InService")
    endpoint.refresh()
    return Deployment(name, model_data, image, str(endpoint.endpoint_status), resource, previous)


def delete_endpoint(cfg: DictConfig) -> list[str]:
    """Delete endpoint ``cfg.endpoint``, its current config and the models it names, and every config
    and model named as :func:`deployed_under` says (earlier deploys, or a deploy that failed midway).

    Returns:
        What was deleted, as ``"kind name"``: the endpoint, then configs, then models.

    Raises:
        ValueError: No ``endpoint=``, or nothing by that name to delete.
    """
    from sagemaker.core.resources import EndpointConfig, Model

    if not cfg.endpoint:
        raise ValueError("delete needs endpoint=NAME")
    name, session, region = str(cfg.endpoint), serving_models.boto_session(cfg), cfg.region
    ours = deployed_under(name)
    endpoint = find_endpoint(name, session, region)
    configs = sorted({c.endpoint_config_name for c in EndpointConfig.get_all(name_contains=name, session=session,
                                                                              region=region)
                      if ours.fullmatch(c.endpoint_config_name)}
                     | ({endpoint.endpoint_config_name} if endpoint is not None else set()))
    configs = [EndpointConfig.get(endpoint_config_name=c, session=session, region=region) for c in configs]
    model_names = sorted({v.model_name for c in configs for v in c.production_variants}
                         | {m.model_name for m in Model.get_all(name_contains=name, session=session, region=region)
                            if ours.fullmatch(m.model_name)})
    if endpoint is None and not configs and not model_names:
        raise ValueError(f"nothing to delete: no endpoint, endpoint config or model named {name}")
    deleted = []
    if endpoint is not None:
        endpoint.delete()
        deleted.append(f"endpoint {name}")
    for config in configs:
        config.delete()
        deleted.append(f"endpoint config {config.endpoint_config_name}")
    for model in model_names:
        Model.get(model_name=model, session=session, region=region).delete()
        deleted.append(f"model {model}")
    print("deleted " + ", ".join(deleted))
    return deleted


def main(argv: list[str] | None = None):
    """Run ``create`` (the default), ``invoke`` or ``delete``; see the module docstring."""
    command, overrides, photos = parse_argv(list(sys.argv[1:] if argv is None else argv))
    cfg = compose("deploy", overrides)
    if command == "invoke":
        return invoke_endpoint(cfg, photos)
    if command == "delete":
        return delete_endpoint(cfg)
    made = create_endpoint(cfg)
    if made.requests is not None:
        for operation, request in made.requests.items():
            print(f"DRY RUN: {operation} (not sent)\n{describe_request(request, [])}")
        print(f"endpoint {made.name} is created, or updated to the new config (UpdateEndpoint) if it exists")
        print(cost.hosting_text(cfg.instance_type, cfg.instance_count, "until deleted"))
    return made


if __name__ == "__main__":
    from sagemaker_launch import run

    run(main)
