"""Register a trained model in the SageMaker Model Registry, with its held-out metrics; optionally
approve it if it beats the approved one.

Usage:
    python -m sagemaker_launch.register job=bincount-20261203024536 group=bincount-counting
    python -m sagemaker_launch.register job=bincount-20261203024536 group=bincount-counting approve_if_better=true
    python -m sagemaker_launch.register model_dir=outputs/RUN/model model_data=s3://BUCKET/RUN/model.tar.gz group=bincount-counting

``key=value`` arguments are overrides of ``conf/register.yaml``. Registering creates model
package group ``group`` if it is missing, then a model package in it, ``PendingManualApproval``:
the serving container exactly as ``python -m sagemaker_launch.deploy`` would create it
(:func:`sagemaker_launch.models.serving_container`: the AWS PyTorch inference image of
``conf/serving_image``, the ``model.tar.gz`` of ``job`` or ``model_data``, bincount's handler), so
``deploy package_group=GROUP`` (and ``transform package_group=GROUP``) serves it the same way.

The package records the run's held-out (test split) report, ``metrics.json``: for a training
job, from its ``output.tar.gz`` (beside its ``model.tar.gz``: the run folder the entry wrote);
for a local run, from the run folder that holds ``model_dir``. ``CustomerMetadataProperties``
get ``acc``, ``obo_acc`` (within one), ``mae``, ``rmse``, ``n``, the calibration's
``temperature`` and ``ece_before``/``ece_after``, and ``eval_set``: ``sha256:`` of the test
photos' sorted ``image_id,expected_quantity`` lines (``predictions.csv``), so two packages'
MAEs are compared only on the same photos. The package's model card (``ModelCard``) has the
same metrics in two groups, the split, and the counting task.

``approve_if_better=true`` approves the new package only if its MAE is lower than that of the
group's latest approved package on the same ``eval_set`` (or the group has no approved package),
and prints one line with the decision and both MAEs (:func:`sagemaker_launch.registry.decide`).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from omegaconf import DictConfig, OmegaConf

import bincount
from bincount.config import compose
from bincount.models.card import ModelCard
from sagemaker_launch import models, registry

log = logging.getLogger("sagemaker_launch")

# the run folder's files a registration reads (a job's output.tar.gz holds the whole run folder)
REPORT_FILES = ("metrics.json", "predictions.csv", "config.yaml", "model/model_config.json")


@dataclass(frozen=True)
class Evaluation:
    """A run's held-out evaluation, as its run folder records it.

    Attributes:
        metrics: ``metrics.json`` (:func:`bincount.report.write_report` plus the calibration's
            :func:`~bincount.models.calibration.held_out_report`).
        eval_set: ``sha256:<hex>`` of the sorted ``image_id,expected_quantity`` lines of
            ``predictions.csv``.
        split: The split, in words (from ``config.yaml``), or ``None`` without one.
        data: The data the split was taken from (``data.root``), or ``None``.
        card: The exported model's card, or ``None`` without ``model/model_config.json``.
    """

    metrics: dict
    eval_set: str
    split: str | None = None
    data: str | None = None
    card: ModelCard | None = None


def eval_set_id(predictions_csv: Path) -> str:
    """``sha256:<hex>`` of the sorted ``image_id,expected_quantity`` lines of a ``predictions.csv``:
    the same photos with the same true counts give the same identifier, in any order."""
    with predictions_csv.open(newline="") as f:
        lines = sorted(f"{row['image_id']},{row['expected_quantity']}" for row in csv.DictReader(f))
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_run(run_dir: Path) -> Evaluation:
    """The held-out evaluation a training run wrote into ``run_dir``.

    Raises:
        FileNotFoundError: If ``run_dir`` lacks ``metrics.json`` or ``predictions.csv``.
        ValueError: If ``metrics.json`` has no ``mae`` (not a test report).
    """
    for name in REPORT_FILES[:2]:
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found: a training run's folder holds metrics.json and "
                                    "predictions.csv of its test split")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if not isinstance(metrics, dict) or "mae" not in metrics:
        raise ValueError(f"{run_dir / 'metrics.json'} has no mae: not a test report")
    split = data = card = None
    if (run_dir / "config.yaml").is_file():
        d = OmegaConf.load(run_dir / "config.yaml").get("data", {})
        data = str(d.get("root"))
        split = (f"test split of {data} (split={d.get('split')}, test_fraction={d.get('test_fraction')}, "
                 f"block_size={d.get('block_size')}, seed={d.get('seed')}, label_list={d.get('label_list')}, "
                 f"counts {d.get('min_count')}..{d.get('max_count')})")
    if (run_dir / "model" / "model_config.json").is_file():
        card = ModelCard.from_dict(json.loads((run_dir / "model" / "model_config.json").read_text()))
    return Evaluation(metrics, eval_set_id(run_dir / "predictions.csv"), split, data, card)


def fetch_job_run(output_tar_gz: str, session, into: Path) -> Path:
    """Download a training job's ``output.tar.gz`` and extract :data:`REPORT_FILES` into ``into``.

    Raises:
        ValueError: If there is no such object (the job has not finished, or wrote no output).
    """
    from botocore.exceptions import ClientError

    bucket, _, key = output_tar_gz.removeprefix("s3://").partition("/")
    archive = into / "output.tar.gz"
    try:
        session.client("s3").download_file(bucket, key, str(archive))
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
            raise
        raise ValueError(f"{output_tar_gz} not found: has the job finished and written its run folder?") from None
    with tarfile.open(archive) as tar:
        wanted = [m for m in tar.getmembers() if m.isfile()
                  and str(PurePosixPath(*[p for p in PurePosixPath(m.name).parts if p != "."])) in REPORT_FILES]
        tar.extractall(into / "run", members=wanted, filter="data")
    return into / "run"


def metadata_properties(evaluation: Evaluation) -> dict[str, str]:
    """``CustomerMetadataProperties``: :data:`~sagemaker_launch.registry.METRIC_KEYS` that the report
    has (``repr`` of each number, so it reads back exactly) and ``eval_set``."""
    out = {k: repr(evaluation.metrics[k]) for k in registry.METRIC_KEYS if evaluation.metrics.get(k) is not None}
    return {**out, registry.EVAL_SET: evaluation.eval_set, "bincount_version": bincount.__version__}


def card_content(evaluation: Evaluation, model_data: str, source: str) -> str:
    """The package's ``ModelCardContent``: the model package model card schema, as JSON.

    Two metric groups on the test split: counting (``acc``, ``obo_acc``, ``mae``, ``rmse``,
    ``n``) and calibration (temperature, ECE before/after, the review threshold and how often it
    answered, and rightly).
    """
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
    """What :func:`register` did.

    Attributes:
        arn: The new model package's ARN.
        properties: Its ``CustomerMetadataProperties``.
        decision: The approve-if-better decision, or ``None`` (not asked: pending manual approval).
    """

    arn: str
    properties: dict[str, str]
    decision: registry.Decision | None = None


def register(cfg: DictConfig) -> Registration:
    """Create the group if missing and a model package in it; approve it if ``cfg.approve_if_better``
    and the rule allows (:func:`sagemaker_launch.registry.decide`).

    Args:
        cfg: ``conf/register.yaml``.

    Raises:
        ValueError: No ``group``; neither ``job`` alone nor ``model_dir`` with ``model_data``; a job
            without ``output.tar.gz``; or a run folder whose ``metrics.json`` is not a test report.
        FileNotFoundError: A run folder without ``metrics.json`` or ``predictions.csv``.

    Returns:
        The new package's ARN and recorded properties, and the decision if asked for.
    """
    if not cfg.group:
        raise ValueError("register needs group=<model package group>")
    if not (cfg.job and not cfg.model_dir and not cfg.model_data or cfg.model_dir and cfg.model_data and not cfg.job):
        raise ValueError("give job=<training job name>, or model_dir=<the run's model folder> with "
                         "model_data=s3://.../model.tar.gz (the same model, uploaded)")
    session = models.boto_session(cfg)
    served = models.model_source(cfg, session, ("model_data", "job"))
    model_data = served.model_data
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.job:
            run_dir = fetch_job_run(model_data.rsplit("/", 1)[0] + "/output.tar.gz", session, Path(tmp))
        else:
            run_dir = Path(cfg.model_dir).resolve().parent
        evaluation = read_run(run_dir)
    source = f"training job {cfg.job}" if cfg.job else f"local run {run_dir}"
    properties = metadata_properties(evaluation)
    sm = session.client("sagemaker")
    registry.ensure_group(sm, cfg.group, "bincount: models counting the objects in Amazon Bin Image Dataset photos")
    container = models.package_container(cfg, served, cfg.environment)
    m = evaluation.metrics
    description = cfg.description or (f"{source}: test MAE {m['mae']:.4f}, acc {m['acc']:.4f} on {m['n']} photos")
    current = registry.latest_approved(sm, cfg.group) if cfg.approve_if_better else None
    arn = registry.create_package(sm, cfg.group, container, instance_type=cfg.instance_type, properties=properties,
                                  card_content=card_content(evaluation, model_data, source), description=description,
                                  generated_by=source[:1024])
    print(f"registered {arn} ({registry.PENDING}): MAE {m['mae']:.6g} on {m['n']} test photos "
          f"({evaluation.eval_set[:19]})")
    if not cfg.approve_if_better:
        return Registration(arn, properties)
    decision = registry.decide(properties, current, cfg.group)
    if decision.approve:
        registry.approve(sm, arn, properties, decision.line)
    print(decision.line)
    return Registration(arn, properties, decision)


def parse_argv(argv: list[str]) -> list[str]:
    """``key=value`` overrides of ``conf/register.yaml``, with ``--approve-if-better`` as
    ``approve_if_better=true``; ``-h``/``--help`` prints the module docstring and exits 0.

    Raises:
        SystemExit: 2 (argparse's one error line) for an argument that is neither a flag nor ``key=value``.
    """
    parser = argparse.ArgumentParser(prog="python -m sagemaker_launch.register", epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Hydra overrides of conf/register.yaml, plus:")
    parser.add_argument("--approve-if-better", action="store_true",
                        help="approve the new package only if its test MAE beats the approved one's (approve_if_better=true)")
    flags, overrides = parser.parse_known_args(argv)
    if bad := [a for a in overrides if "=" not in a]:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (arguments are key=value overrides)")
    return [*overrides, "approve_if_better=true"] if flags.approve_if_better else overrides


def main(argv: list[str] | None = None) -> Registration:
    """Compose ``conf/register.yaml`` with the arguments and :func:`register`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return register(compose("register", parse_argv(list(sys.argv[1:] if argv is None else argv))))


if __name__ == "__main__":
    from sagemaker_launch import run

    run(main)
