"""Send a training experiment to SageMaker: compose its config here, then start a training job.

Usage:
    python -m sagemaker_launch.launch +experiment=resnet50_subset sagemaker=gpu_single sagemaker.inputs.train=s3://BUCKET/abid/subset
    python -m sagemaker_launch.launch +experiment=resnet50_subset sagemaker=gpu_multi sagemaker.instance_count=4 \
        sagemaker.spot=true sagemaker.inputs.train=s3://BUCKET/abid/subset --dry-run
    python -m sagemaker_launch.launch +experiment=quickstart data=abid_stream data.uri=s3://BUCKET/abid/v1 \
        sagemaker=cpu sagemaker.profiler=true --no-wait

Every argument but ``--dry-run``/``--no-wait`` is a Hydra override of ``conf/launch.yaml`` =
``conf/train.yaml`` + a ``sagemaker`` group, composed and resolved here. The job gets the overrides
as hyperparameters (:mod:`sagemaker_launch.hyperparameters`) and its container composes the same
``conf/`` with them (``sagemaker_launch/entry.py``). ``--dry-run`` prints the CreateTrainingJob
request and the cost, and sends nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bincount.config import compose
from sagemaker_launch.plan import (CHECKPOINT_DIR, TrainingJobPlan, cost_text, metric_definitions, plan_training_job,
                                   precision_text)
from sagemaker_launch.session import DryRun, console_url, describe_request, make_session, role_check_skipped, role_for
from sagemaker_launch.source import CONTAINER_INIT_SCRIPT, ENTRY_SCRIPT, stage_source

# the job's PID 1 (see the script): the code channel is downloaded before the container starts
CONTAINER_INIT = f"/opt/ml/input/data/code/{CONTAINER_INIT_SCRIPT}"


def use_container_init(request: dict[str, Any]) -> None:
    """Make ``sagemaker_launch/container_init.sh`` the job's PID 1, running the SDK's ``sm_train.sh``.

    ModelTrainer always starts ``/bin/bash -c "chmod +x .../sm_train.sh && .../sm_train.sh"``
    (no option changes it), a PID 1 that drops SageMaker's SIGTERM; the script passes it on to
    training. Edits the CreateTrainingJob ``request`` in place.

    Raises:
        RuntimeError: The request does not start ``sm_train.sh`` the way this SDK version does.
    """
    from sagemaker.train.constants import (DEFAULT_CONTAINER_ARGUMENTS, DEFAULT_CONTAINER_ENTRYPOINT,
                                           SM_DRIVERS_CONTAINER_PATH, TRAIN_SCRIPT)

    spec = request["AlgorithmSpecification"]
    if (spec.get("ContainerEntrypoint"), spec.get("ContainerArguments")) != (DEFAULT_CONTAINER_ENTRYPOINT,
                                                                            DEFAULT_CONTAINER_ARGUMENTS):
        raise RuntimeError(f"unexpected ContainerEntrypoint/ContainerArguments {spec.get('ContainerEntrypoint')} "
                           f"{spec.get('ContainerArguments')}: the SageMaker SDK no longer starts {TRAIN_SCRIPT} "
                           "as launch.use_container_init expects")
    spec["ContainerEntrypoint"] = ["/bin/bash", CONTAINER_INIT]
    spec["ContainerArguments"] = [f"{SM_DRIVERS_CONTAINER_PATH}/{TRAIN_SCRIPT}"]


def channels(sm: DictConfig) -> list:
    """ModelTrainer channels for ``sm.inputs`` (``None`` entries skipped)."""
    from sagemaker.core.training.configs import Channel, DataSource, S3DataSource

    return [Channel(channel_name=name, input_mode=sm.input_mode,
                    data_source=DataSource(s3_data_source=S3DataSource(
                        s3_data_type="S3Prefix", s3_uri=str(uri), s3_data_distribution_type="FullyReplicated")))
            for name, uri in (sm.inputs or {}).items() if uri]


def make_model_trainer(plan: TrainingJobPlan, session, tmp: Path, *, checkpoint_s3_uri: str | None = None,
                       dry_run: bool = False):
    """A fresh ``ModelTrainer`` for one job (it writes the job's checkpoint URI back into itself), its
    code staged under ``tmp`` (:func:`sagemaker_launch.source.stage_source`).

    Args:
        plan: From :func:`plan_training_job`.
        session: From :func:`make_session`.
        tmp: A folder that lives until the job is submitted.
        checkpoint_s3_uri: Overrides ``sagemaker.checkpoint_s3_uri``; with spot and neither set,
            the SDK picks ``s3://BUCKET/BASE/JOB/checkpoints`` per job.
        dry_run: The session is a dry run's, which refuses every IAM call: the SDK's check of the
            role is switched off (``SAGEMAKER_VALIDATE_ROLE=false``), so it can't warn "access denied".
    """
    from sagemaker.core.training.configs import (CheckpointConfig, Compute, MetricDefinition, SourceCode,
                                                 StoppingCondition, Tag)
    from sagemaker.train.distributed import Torchrun
    from sagemaker.train.model_trainer import ModelTrainer

    sm = plan.sagemaker
    uri = checkpoint_s3_uri or sm.checkpoint_s3_uri
    source_dir = stage_source(tmp / "source", plan.extras)
    with role_check_skipped() if dry_run else contextlib.nullcontext():
        trainer = ModelTrainer(
            sagemaker_session=session,
            role=role_for(sm, dry_run),
            base_job_name=sm.base_job_name,
            training_image=plan.image_uri,
            source_code=SourceCode(source_dir=str(source_dir), entry_script=ENTRY_SCRIPT,
                                   requirements="requirements.txt"),
            distributed=Torchrun(process_count_per_node=plan.processes) if plan.distributed else None,
            compute=Compute(instance_type=sm.instance_type, instance_count=int(sm.instance_count),
                            volume_size_in_gb=int(sm.volume_size_gb), enable_managed_spot_training=bool(sm.spot)),
            stopping_condition=StoppingCondition(
                max_runtime_in_seconds=int(sm.max_run_hours * 3600),
                max_wait_time_in_seconds=int(sm.max_wait_hours * 3600) if sm.spot else None),
            checkpoint_config=CheckpointConfig(s3_uri=uri, local_path=CHECKPOINT_DIR) if (sm.spot or uri) else None,
            environment=plan.environment,
            hyperparameters=dict(plan.hyperparameters),
            tags=[Tag(key=str(k), value=str(v)) for k, v in (sm.tags or {}).items()] or None,
        )
    return trainer.with_metric_definitions([MetricDefinition(name=m["Name"], regex=m["Regex"])
                                            for m in metric_definitions()])


@dataclass
class Submission:
    """What :func:`submit_training_job` did.

    Attributes:
        request: The CreateTrainingJob parameters (sent, or in a dry run what would be sent).
        job_name: The training job's name.
        uploads: S3 objects a dry run would have written.
        dry_run: Nothing was sent.
        files: In a dry run, the contents of ``uploads`` (``s3://bucket/key`` -> bytes): the code and
            the SDK's container drivers (``sm_drivers/``, with the generated ``sm_train.sh``).
    """

    request: dict[str, Any]
    job_name: str
    uploads: list[str]
    dry_run: bool
    files: dict[str, bytes] = field(default_factory=dict, repr=False)


def profiler_config(plan: TrainingJobPlan, session) -> dict[str, Any]:
    """The request's ``ProfilerConfig``: ``plan.profiler`` writing to
    ``s3://<the session's default bucket>/[<its prefix>/]<base_job_name>/profiler`` (SageMaker adds
    the job name), where ModelTrainer puts the job's code and output.
    """
    prefix = "/".join(p for p in (session.default_bucket_prefix, plan.sagemaker.base_job_name) if p)
    return {"S3OutputPath": f"s3://{session.default_bucket()}/{prefix}/profiler", **plan.profiler}


def submit_training_job(plan: TrainingJobPlan, *, dry_run: bool = False, wait: bool = False) -> Submission:
    """Build a fresh ``ModelTrainer`` from ``plan`` and start the job (or, in a dry run, don't).

    Args:
        plan: From :func:`plan_training_job`.
        dry_run: Build and capture the request, send nothing.
        wait: Stream the job's log until it ends.
    """
    sm = plan.sagemaker
    session, hook = make_session(sm, dry_run=dry_run, edits={"CreateTrainingJob": use_container_init})
    if plan.profiler:
        hook.extra["CreateTrainingJob"] = {"ProfilerConfig": profiler_config(plan, session)}
    with tempfile.TemporaryDirectory(prefix="bincount-source-") as tmp:
        trainer = make_model_trainer(plan, session, Path(tmp), dry_run=dry_run)
        try:
            trainer.train(input_data_config=channels(sm) or None, wait=False, logs=False)
        except DryRun as stop:
            return Submission(stop.params, stop.params["TrainingJobName"], list(hook.files), True, dict(hook.files))
    request = hook.sent["CreateTrainingJob"][-1]
    name = request["TrainingJobName"]
    print(f"training job {name}\n  {console_url(sm.region, name)}", flush=True)
    if wait:
        from sagemaker.core.resources import TrainingJob

        TrainingJob.get(training_job_name=name, session=session.boto_session, region=sm.region).wait(logs=True)
    return Submission(request, name, [], False)


def parse_argv(argv: list[str] | None,
               prog: str = "python -m sagemaker_launch.launch") -> tuple[argparse.Namespace, list[str]]:
    """Split ``--dry-run``/``--no-wait`` from the Hydra overrides of ``argv`` (``None``: ``sys.argv[1:]``, as
    argparse reads it; ``prog``: the command ``--help`` names)."""
    parser = argparse.ArgumentParser(prog=prog, add_help=True, description="Hydra overrides of conf/launch.yaml, plus:")
    parser.add_argument("--dry-run", action="store_true", help="print the request and the cost, send nothing")
    parser.add_argument("--no-wait", action="store_true", help="don't stream the job's log")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> Submission:
    """Compose, check, and submit (or dry-run) one training job; see the module docstring."""
    flags, overrides = parse_argv(argv)
    cfg = compose("launch", overrides)
    plan = plan_training_job(cfg, overrides)
    dry_run = flags.dry_run or bool(cfg.sagemaker.dry_run)
    sub = submit_training_job(plan, dry_run=dry_run, wait=bool(cfg.sagemaker.wait) and not flags.no_wait)
    if dry_run:
        print(f"DRY RUN: CreateTrainingJob {sub.job_name} (not sent)")
        print(describe_request(sub.request, sub.uploads))
        print(f"train.py {shlex.join(plan.overrides)}")
        print(f"precision: {precision_text(cfg, overrides)}")
        print(cost_text(cfg.sagemaker))
    return sub


if __name__ == "__main__":
    from sagemaker_launch import run

    run(main)
