"""Tune an experiment with a SageMaker hyperparameter tuning job over its ``hparams_search`` space.

Usage:
    python -m sagemaker_launch.tune +experiment=quickstart hparams_search=lr_optuna sagemaker=cpu \
        sagemaker.inputs.train=s3://BUCKET/abid/sample
    python -m sagemaker_launch.tune +experiment=resnet50_subset hparams_search=lr_optuna sagemaker=gpu_multi \
        sagemaker.spot=true sagemaker.inputs.train=s3://BUCKET/abid/subset --dry-run

The ``hydra.sweeper.params`` of ``hparams_search`` become the tuning job's ranges
(:func:`parameter_range`), ``optimized_metric`` and ``hydra.sweeper.direction`` its objective,
``n_trials``/``n_jobs`` its limits. Trials bypass ModelTrainer's drivers: the PyTorch image's
training toolkit runs ``sagemaker_program`` and drops the Torchrun config, so a multi-process trial
gets ``sagemaker_torch_distributed_enabled=true``. With spot, the trials share one checkpoint URI (a
tuning job takes one ``CheckpointConfig``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bincount.config import compose
from sagemaker_launch.hyperparameters import (MAX_CATEGORICAL_CHARS, SEP, categorical_value, encode_overrides,
                                              tuned_name)
from sagemaker_launch.launch import Submission, channels, make_model_trainer, parse_argv
from sagemaker_launch.plan import cost_text, metric_definitions, plan_training_job, precision_text
from sagemaker_launch.session import DryRun, console_url, describe_request, make_session

# SageMaker's limit on a tuning job's name
TUNING_NAME_MAX = 32


def reads_as(text: str, value: Any) -> bool:
    """Whether Hydra reads the override ``key=<text>`` as ``value`` (its ``Override.value()``);
    ``False`` for text that is not Hydra's override syntax."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(f"key={text}").value() == value
    except HydraException:
        return False


def hydra_text(value: Any) -> str:
    """A value of a parsed Hydra sweep written back as override text that Hydra reads as ``value``.

    ``None`` -> ``null``, ``True`` -> ``true``, ``"adam"`` -> ``adam``, ``"true"`` -> ``"true"``
    (quoted: unquoted it would be a boolean), lists and dicts element by element.

    Raises:
        ValueError: If the text would not read back as ``value``.
    """
    from hydra.core.override_parser.types import Quote, QuotedString

    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, list):
        text = "[" + ", ".join(hydra_text(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k}: {hydra_text(v)}" for k, v in value.items()) + "}"
    else:
        text = str(value)
        if not reads_as(text, value):
            text = QuotedString(text=text, quote=Quote.double).with_quotes()
    if not reads_as(text, value):
        raise ValueError(f"sweep value {value!r} can't be written as a Hydra override value")
    return text


def categorical_values(values: list[Any]) -> list[str]:
    """A sweep's values as a ``CategoricalParameter``'s (:func:`sagemaker_launch.hyperparameters.categorical_value`).

    Raises:
        ValueError: If an encoded value exceeds SageMaker's 256 characters.
    """
    out = [categorical_value(hydra_text(v)) for v in values]
    for value in out:
        if len(value) > MAX_CATEGORICAL_CHARS:
            raise ValueError(f"categorical value {value[:40]!r}... is {len(value)} characters once encoded; "
                             f"SageMaker takes at most {MAX_CATEGORICAL_CHARS}")
    return out


def parameter_range(spec: str):
    """A Hydra sweep expression as a SageMaker parameter range.

    Args:
        spec: e.g. ``"tag(log, interval(0.0002, 0.01))"``, ``"interval(0.0, 0.1)"``,
            ``"tag(int, interval(1, 8))"``, ``"choice(32, 64)"``, ``"range(1, 5)"``.

    Returns:
        A ``ContinuousParameter`` (``interval``), ``IntegerParameter`` (``tag(int, interval(...))``, a
        ``range`` of integers) or ``CategoricalParameter`` (``choice``, other ranges; values from
        :func:`categorical_values`); logarithmic when tagged ``log``.

    Raises:
        ValueError: A fixed value or a sweep SageMaker can't express.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from sagemaker.core.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter

    sweep = OverridesParser.create().parse_overrides([f"x={spec}"])[0].value()
    tags = getattr(sweep, "tags", set())
    scaling = "Logarithmic" if "log" in tags else "Auto"
    if isinstance(sweep, IntervalSweep):
        if "int" in tags:  # as the Optuna sweeper reads it: intervals are float unless tagged int
            return IntegerParameter(int(sweep.start), int(sweep.end), scaling_type=scaling)
        return ContinuousParameter(float(sweep.start), float(sweep.end), scaling_type=scaling)
    if isinstance(sweep, ChoiceSweep):
        return CategoricalParameter(categorical_values(sweep.list))
    if isinstance(sweep, RangeSweep):
        values = list(sweep.range())
        if all(isinstance(v, int) for v in values) and sweep.step == 1:
            return IntegerParameter(values[0], values[-1], scaling_type=scaling)
        return CategoricalParameter(categorical_values(values))
    raise ValueError(f"{spec!r} is not a sweep SageMaker can tune (interval, choice or range)")


def search_space(cfg: DictConfig) -> dict[str, Any]:
    """``hydra.sweeper.params`` as SageMaker ranges keyed by hyperparameter name
    (:func:`sagemaker_launch.hyperparameters.tuned_name`).

    Raises:
        ValueError: If the config has no search space (pick one: ``hparams_search=...``).
    """
    params = (cfg.hydra.sweeper.get("params") or {}) if "sweeper" in cfg.hydra else {}
    if not params:
        raise ValueError("no search space: add hparams_search=<name> (conf/hparams_search/*.yaml)")
    return {tuned_name(str(key)): parameter_range(str(spec)) for key, spec in params.items()}


def static_hyperparameters(overrides: list[str], ranges: dict[str, Any]) -> dict[str, str]:
    """The hyperparameters every trial gets: ``overrides`` but those that set a tuned key (``key=...``),
    which SageMaker sets per trial under the names of ``ranges`` (:func:`search_space`).

    Raises:
        ValueError: See :func:`sagemaker_launch.hyperparameters.encode_overrides`.
    """
    tuned = {name.replace(SEP, ".") for name in ranges}
    return encode_overrides([o for o in overrides if o.partition("=")[0] not in tuned])


def tuning_job_name(base: str) -> str:
    """``<base>-tune-<yymmdd-HHMMSS>``, shortened to SageMaker's 32 characters."""
    stamp = time.strftime("%y%m%d-%H%M%S", time.gmtime())
    return f"{base[:TUNING_NAME_MAX - len(stamp) - 6]}-tune-{stamp}"


def submit_tuning_job(cfg: DictConfig, overrides: list[str], *, dry_run: bool = False,
                      wait: bool = False) -> Submission:
    """Plan the trials like a training job, then start a Bayesian tuning job over the search space.

    Args:
        cfg: ``conf/launch.yaml`` composed with ``overrides`` and the Hydra config.
        overrides: The command line's overrides (``hparams_search=...`` included).
        dry_run: Build and capture the request, send nothing.
        wait: Wait until the tuning job ends.

    Raises:
        ValueError: See :func:`search_space` and :func:`sagemaker_launch.plan.plan_training_job`.
    """
    from sagemaker.train.tuner import HyperparameterTuner

    sm = cfg.sagemaker
    ranges = search_space(cfg)
    plan = plan_training_job(cfg, overrides)
    plan.hyperparameters = static_hyperparameters(plan.overrides, ranges)
    if plan.distributed:
        plan.hyperparameters["sagemaker_torch_distributed_enabled"] = "true"
    direction = str(cfg.hydra.sweeper.get("direction", "minimize"))  # the Optuna sweeper's default
    name = tuning_job_name(sm.base_job_name)
    session, hook = make_session(sm, dry_run=dry_run)
    with tempfile.TemporaryDirectory(prefix="bincount-source-") as tmp:
        checkpoints = None
        if sm.spot or sm.checkpoint_s3_uri:  # one URI for all trials: the API has no per-trial one
            checkpoints = sm.checkpoint_s3_uri or f"s3://{session.default_bucket()}/{sm.base_job_name}/{name}/checkpoints"
        trainer = make_model_trainer(plan, session, Path(tmp), checkpoint_s3_uri=checkpoints, dry_run=dry_run)
        tuner = HyperparameterTuner(
            model_trainer=trainer, objective_metric_name=str(cfg.optimized_metric), hyperparameter_ranges=ranges,
            metric_definitions=metric_definitions(), strategy="Bayesian",
            objective_type="Minimize" if direction.lower().startswith("min") else "Maximize",
            max_jobs=int(cfg.hydra.sweeper.get("n_trials", 10)),
            max_parallel_jobs=int(cfg.hydra.sweeper.get("n_jobs", 1)), base_tuning_job_name=sm.base_job_name)
        try:
            tuner.tune(inputs=channels(sm) or None, job_name=name, wait=False)
        except DryRun as stop:
            return Submission(stop.params, name, list(hook.files), True)
    request = hook.sent["CreateHyperParameterTuningJob"][-1]
    print(f"tuning job {name}\n  {console_url(sm.region, name, 'tuning')}", flush=True)
    if wait:
        tuner.wait()
        best = tuner.best_training_job()
        print(f"best training job {best}\n  {console_url(sm.region, best)}")
    return Submission(request, name, [], False)


def main(argv: list[str] | None = None) -> Submission:
    """Compose, check and submit (or dry-run) a tuning job; see the module docstring."""
    flags, overrides = parse_argv(argv, prog="python -m sagemaker_launch.tune")
    cfg = compose("launch", overrides, return_hydra_config=True)
    dry_run = flags.dry_run or bool(cfg.sagemaker.dry_run)
    sub = submit_tuning_job(cfg, overrides, dry_run=dry_run, wait=bool(cfg.sagemaker.wait) and not flags.no_wait)
    if dry_run:
        print(f"DRY RUN: CreateHyperParameterTuningJob {sub.job_name} (not sent)")
        print(describe_request(sub.request, sub.uploads))
        print(f"precision: {precision_text(cfg, overrides)}")
        print(f"{int(cfg.hydra.sweeper.get('n_trials', 10))} trials, each at most:")
        print(cost_text(cfg.sagemaker))
    return sub


if __name__ == "__main__":
    from sagemaker_launch import run

    run(main)
