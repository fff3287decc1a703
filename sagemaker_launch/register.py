"""Register a trained model in the SageMaker Model Registry, with its held-out metrics; optionally
approve it if it beats the approved one.

Usage:
    python -m sagemaker_launch.register job=bincount-20261203024536 group=bincount-counting
    python -m sagemaker_launch.register job=bincount-20261203024536 group=bincount-counting approve_if_better=true
    python -m sagemaker_launch.register model_dir=outputs/RUN/model model_data=s3://BUCKET/RUN/model.tar.gz group=bincount-counting

``key=value`` arguments are overrides of ``conf/register.yaml``. The new model package, in group
``group`` (created if missing), is ``PendingManualApproval``; it holds the serving container
``python -m sagemaker_launch.deploy`` would create from the same model, once per serving image
(:func:`served_images`), and the run's held-out report (``metrics.json``, :mod:`sagemaker_launch.run_report`)
as ``CustomerMetadataProperties`` and a model card. ``approve_if_better=true`` approves it only if its MAE
beats the group's latest approved package on the same test photos (:func:`sagemaker_launch.model_packages.decide`).
``--dry-run`` checks the CreateModelPackage request against SageMaker's service model and prints it,
sending nothing. See docs/sagemaker.md, "Model registry".
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

import bincount
from bincount.config import compose
from sagemaker_launch import model_packages, serving_models
from sagemaker_launch.run_report import Evaluation, fetch_job_run, read_run
from sagemaker_launch.session import DryRun, RequestHook, describe_request

log = logging.getLogger("sagemaker_launch")

GROUP_DESCRIPTION = "bincount: models counting the objects in Amazon Bin Image Dataset photos"


def metadata_properties(evaluation: Evaluation) -> dict[str, str]:
    """``CustomerMetadataProperties``: :data:`~sagemaker_launch.model_packages.METRIC_KEYS` that the report
    has (``repr`` of each number, so it reads back exactly) and ``eval_set``."""
    out = {k: repr(evaluation.metrics[k]) for k in model_packages.METRIC_KEYS if evaluation.metrics.get(k) is not None}
    return {**out, model_packages.EVAL_SET: evaluation.eval_set, "bincount_version": bincount.__version__}


def card_content(evaluation: Evaluation, model_data: str, source: str) -> str:
    """The package's ``ModelCardContent`` (the model package model card schema) as JSON: counting and
    calibration metrics on the test split."""
    from sagemaker.core.shapes import model_card_shapes as shapes

    m = evaluation.metrics

    def group(name: str, notes: dict[str, str]) -> shapes.MetricGroupsItem:
        metrics = [shapes.SimpleMetric(name=k, type="number", value=m[k], notes=note)
                   for k, note in notes.items() if m.get(k) is not None]
        return shapes.MetricGroupsItem(name=name, metric_data=metrics)

    counting = group("counting", {
        "acc": "share of photos counted exactly", "obo_acc": "share within one (|error| <= 1)",
        "mae": "mean absolute count error, objects", "rmse": "root mean squared count error, objects",
        "n": "test photos"})
    calibration = group("calibration", {
        "temperature": "logits are divided by it (fitted on the validation split)",
        "ece_before": "expected calibration error before temperature scaling",
        "ece_after": "expected calibration error after temperature scaling",
        "review_threshold": "calibrated confidence below which a verdict is review",
        "review_coverage": "share answered without review", "review_precision": "share of those answered right"})
    card = evaluation.card
    counts = f" ({card.min_count} to {card.max_count} objects, {card.arch})" if card else ""
    content = shapes.ModelCardContent(
        model_overview=shapes.ModelOverview(model_creator=f"bincount {bincount.__version__} ({source})",
                                            model_artifact=[model_data]),
        intended_uses=shapes.IntendedUses(purpose_of_model=f"Count the objects in an Amazon Bin Image Dataset "
                                                           f"photo{counts}"),
        evaluation_details=[shapes.EvaluationDetailsItem(
            name="held-out test split", evaluation_observation=evaluation.split,
            metadata={"eval_set": evaluation.eval_set}, datasets=[evaluation.data] if evaluation.data else None,
            metric_groups=[counting, calibration])],
    )
    return content.model_dump_json(exclude_none=True)


@dataclass(frozen=True)
class Registration:
    """What :func:`register` did: the new package's ``arn`` (``""`` in a dry run), its ``properties``
    (``CustomerMetadataProperties``), the approve-if-better ``decision`` (``None``: not asked, or a dry
    run), and in a dry run the unsent CreateModelPackage ``request``."""

    arn: str
    properties: dict[str, str]
    decision: model_packages.Decision | None = None
    request: dict | None = None


def served_images(cfg: DictConfig, source: serving_models.ModelSource) -> list[tuple[dict, list[str]]]:
    """``(container, instance types)`` per serving image of ``cfg.instance_type`` (first) and
    ``cfg.supported_instance_types``; with ``image_uri``, the types whose device (CPU, GPU) is the image's.

    Raises:
        ValueError: ``image_uri``'s device is not ``instance_type``'s.
    """
    from sagemaker.core.utils.utils import serialize

    by_image: dict[str, list[str]] = {}
    for instance_type in dict.fromkeys([str(cfg.instance_type), *map(str, cfg.supported_instance_types or [])]):
        image = serving_models.inference_image(cfg, instance_type)
        device, want = serving_models.image_device(image), serving_models.instance_device(instance_type)
        if device and want and device != want:
            if instance_type == cfg.instance_type:
                raise ValueError(f"image_uri={image} is a {device.upper()} image, and instance_type={instance_type} "
                                 f"is a {want.upper()} instance: give a {device.upper()} instance_type")
            log.info("%s left out of the package: a %s instance, and image_uri is a %s image", instance_type,
                     want.upper(), device.upper())
            continue
        by_image.setdefault(image, []).append(instance_type)
    return [(serialize(serving_models.serving_container(cfg, serving_models.ModelSource(source.model_data, image),
                                                       cfg.environment)), types)
            for image, types in by_image.items()]


def placeholder_evaluation(job: str) -> Evaluation:
    """A dry run's stand-in for training job ``job``'s held-out evaluation (its ``output.tar.gz`` is not read)."""
    log.warning("dry run: training job %s's metrics are not read; the request shows placeholders (0)", job)
    return Evaluation({k: 0 for k in ("acc", "obo_acc", "mae", "rmse", "n")}, "sha256:" + "0" * 64)


def register(cfg: DictConfig) -> Registration:
    """Create the group if missing and a model package in it; approve it if ``cfg.approve_if_better``
    and the rule allows (:func:`sagemaker_launch.model_packages.decide`). With ``cfg.dry_run``, check and keep
    the CreateModelPackage request instead, sending nothing. ``cfg``: ``conf/register.yaml``.

    Raises:
        ValueError: No ``group``; neither ``job`` alone nor ``model_dir`` with ``model_data``; see
            :func:`sagemaker_launch.serving_models.model_source`, :mod:`sagemaker_launch.run_report` and
            :func:`served_images`; in a dry run, a request SageMaker's service model refuses.
        FileNotFoundError: A run folder without ``metrics.json`` or ``predictions.csv``.
    """
    if not cfg.group:
        raise ValueError("register needs group=<model package group>")
    if not (cfg.job and not cfg.model_dir and not cfg.model_data or cfg.model_dir and cfg.model_data and not cfg.job):
        raise ValueError("give job=<training job name>, or model_dir=<the run's model folder> with "
                         "model_data=s3://.../model.tar.gz (the same model, uploaded)")
    dry_run = bool(cfg.dry_run)
    session = serving_models.boto_session(cfg)
    RequestHook(session, dry_run=dry_run)  # in a dry run: Create* checked and kept, nothing sent
    source = serving_models.model_source(cfg, session, ("model_data", "job"), dry_run=dry_run)
    model_data = source.model_data
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.job:
            run_dir = None if dry_run else fetch_job_run(model_data.rsplit("/", 1)[0] + "/output.tar.gz", session,
                                                         Path(tmp))
        else:
            run_dir = Path(cfg.model_dir).resolve().parent
        evaluation = placeholder_evaluation(str(cfg.job)) if run_dir is None else read_run(run_dir)
    source_text = f"training job {cfg.job}" if cfg.job else f"local run {run_dir}"
    properties = metadata_properties(evaluation)
    served = served_images(cfg, source)
    sm = session.client("sagemaker")
    if not dry_run:
        model_packages.ensure_group(sm, cfg.group, GROUP_DESCRIPTION)
    m = evaluation.metrics
    description = cfg.description or (f"{source_text}: test MAE {m['mae']:.4f}, acc {m['acc']:.4f} on {m['n']} photos")
    current = model_packages.latest_approved(sm, cfg.group) if cfg.approve_if_better and not dry_run else None
    try:
        arn = model_packages.create_package(sm, cfg.group, served, properties=properties,
                                      card_content=card_content(evaluation, model_data, source_text),
                                      description=description, generated_by=source_text[:1024])
    except DryRun as stop:
        return Registration("", properties, None, stop.params)
    print(f"registered {arn} ({model_packages.PENDING}): MAE {m['mae']:.6g} on {m['n']} test photos "
          f"({evaluation.eval_set[:19]})")
    if not cfg.approve_if_better:
        return Registration(arn, properties)
    decision = model_packages.decide(properties, current, cfg.group)
    if decision.approve:
        model_packages.approve(sm, arn, properties, decision.line)
    print(decision.line)
    return Registration(arn, properties, decision)


def parse_argv(argv: list[str] | None) -> list[str]:
    """``key=value`` overrides of ``conf/register.yaml`` in ``argv`` (``None``: ``sys.argv[1:]``), the flags
    as ``approve_if_better=true`` and ``dry_run=true``; ``--help`` prints the module docstring too.

    Raises:
        SystemExit: 2 (argparse's one error line) for an argument that is neither a flag nor ``key=value``.
    """
    parser = argparse.ArgumentParser(prog="python -m sagemaker_launch.register", epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Hydra overrides of conf/register.yaml, plus:")
    parser.add_argument("--approve-if-better", action="store_true",
                        help="approve the new package only if its test MAE beats the approved one's (approve_if_better=true)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check and print the CreateModelPackage request, send nothing (dry_run=true)")
    flags, overrides = parser.parse_known_args(argv)
    if bad := [a for a in overrides if "=" not in a]:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (arguments are key=value overrides)")
    return [*overrides, *(["approve_if_better=true"] if flags.approve_if_better else []),
            *(["dry_run=true"] if flags.dry_run else [])]


def main(argv: list[str] | None = None) -> Registration:
    """Compose ``conf/register.yaml`` with the arguments and :func:`register`; a dry run prints the request."""
    cfg = compose("register", parse_argv(argv))
    made = register(cfg)
    if cfg.dry_run:
        print(f"DRY RUN: CreateModelPackage in group {cfg.group} (not sent; the group is created if missing)\n"
              f"{describe_request(made.request, [])}")
        if cfg.approve_if_better:
            print("approve_if_better: not decided in a dry run (the group's approved package is not looked up)")
    return made


if __name__ == "__main__":
    from sagemaker_launch import run

    run(main)
