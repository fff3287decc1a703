"""Container side of a SageMaker training job: hyperparameters -> Hydra overrides -> ``train(cfg)``.

Usage:
    # what a job runs (ModelTrainer's driver; torchrun on several GPUs or instances):
    python sagemaker_launch/entry.py --overrides "+experiment=quickstart trainer.max_epochs=20"
    torchrun --nnodes=1 --nproc_per_node=2 sagemaker_launch/entry.py --overrides +experiment=quickstart
    # without arguments: the hyperparameters of $SM_HPS or $SM_INPUT_CONFIG_DIR/hyperparameters.json
    python sagemaker_launch/entry.py

The hyperparameters decode to the launcher's Hydra overrides
(:mod:`sagemaker_launch.hyperparameters`). The entry composes ``conf/train.yaml`` with them plus the
container's places, read from the environment when :func:`main` runs (:func:`container_overrides`):
the run folder is ``$SM_OUTPUT_DATA_DIR`` (the job's ``output.tar.gz``; one fixed folder for every
process, no ``${now:...}`` resolved per process); checkpoints go to
``$SM_CHECKPOINT_DIR/$TRAINING_JOB_NAME``, synced with the job's checkpoint S3 URI, and a restarted
(spot) job resumes from the newest (the subfolder keeps a tuning job's trials, which share one URI,
apart); ``data.root`` is the ``train`` channel; a stream cache goes to ``$SM_INPUT_DIR/scratch``
(not into the output archive); under torchrun, ``devices * num_nodes == WORLD_SIZE`` as Lightning
requires (:func:`distributed_overrides`).

Global rank 0 copies the exported ``model/`` to ``$SM_MODEL_DIR`` (:func:`export_or_stop`). A job
stopped by SIGTERM exits non-zero with ``$SM_MODEL_DIR`` empty and writes where it stopped to
SageMaker's failure file before the SDK's driver would write its traceback there
(:func:`write_failure`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import sys
from pathlib import Path

from sagemaker_launch.container import ContainerEnv, newest_checkpoint
from sagemaker_launch.hyperparameters import (decode_hyperparameters, is_tuning_trial, override_key, override_value,
                                              parse_argv, read_hyperparameters)
from sagemaker_launch.model_archive import export_model

log = logging.getLogger("sagemaker_launch.entry")


def distributed_overrides(env: ContainerEnv, user: list[str]) -> list[str]:
    """``trainer.devices``/``num_nodes``/``strategy`` matching torchrun's world.

    Raises:
        ValueError: If the user's ``trainer.devices * trainer.num_nodes`` contradicts the
            processes torchrun started (Lightning would otherwise fail or train apart).
    """
    nodes, rem = divmod(env.world_size, env.local_world_size)
    if rem:
        raise ValueError(f"WORLD_SIZE={env.world_size} is not a multiple of LOCAL_WORLD_SIZE={env.local_world_size}")
    wanted = {"trainer.devices": env.local_world_size, "trainer.num_nodes": nodes}
    for key, value in wanted.items():
        given = override_value(user, key)
        if given is not None and given.isdigit() and int(given) != value:
            raise ValueError(f"{key}={given}, but this job runs {env.world_size} process(es) = {nodes} instance(s) x "
                             f"{env.local_world_size}: Lightning needs trainer.devices * trainer.num_nodes == WORLD_SIZE")
    if env.world_size == 1:
        return []
    out = [f"trainer.devices={env.local_world_size}", f"trainer.num_nodes={nodes}"]
    if override_value(user, "trainer.strategy") is None:
        out.append("trainer.strategy=ddp")
    return out


def container_overrides(env: ContainerEnv, user: list[str], data_keys: set[str]) -> list[str]:
    """The overrides that put a run into the container's folders (see the module docstring).

    Args:
        env: This process's :class:`ContainerEnv`.
        user: The decoded hyperparameters; a key set there is left alone.
        data_keys: The keys of the composed ``data`` config (``root`` or ``uri``/``cache_dir``).

    Returns:
        Overrides to append after ``user``.
    """
    given = {override_key(o) for o in user}
    out = [] if "callbacks" in given else ["callbacks=sagemaker"]
    out += [f"paths.output_dir={env.output_data_dir}", "++trainer.enable_progress_bar=false"]
    if "callbacks.model_checkpoint.dirpath" not in given:
        out.append(f"callbacks.model_checkpoint.dirpath={env.checkpoint_dir}")
        resume = newest_checkpoint(env.checkpoint_dir)
        if resume is not None and "ckpt_path" not in given:
            out.append(f"ckpt_path={resume}")
    if env.train_channel is not None and "data.root" not in given:
        if "root" in data_keys:
            out.append(f"data.root={env.train_channel}")
        else:
            log.warning("a train channel is mounted at %s but the data config has no root; not used", env.train_channel)
    if "cache_dir" in data_keys and "data.cache_dir" not in given:
        out.append(f"data.cache_dir={env.scratch_dir / 'stream_cache'}")
    return out + distributed_overrides(env, user)


def drop_trial_checkpoints(env: ContainerEnv, user: list[str]) -> bool:
    """Delete a finished tuning trial's checkpoint folder (``$SM_CHECKPOINT_DIR/$TRAINING_JOB_NAME``).

    A tuning job's trials share one checkpoint S3 URI, all of which SageMaker copies into each trial's
    container at its start; SageMaker deletes from S3 what the container deletes from the synced
    folder, so later trials download only the checkpoints of unfinished trials.

    Args:
        env: This process's :class:`ContainerEnv`.
        user: The decoded hyperparameters: a ``callbacks.model_checkpoint.dirpath`` of the user's
            own is left alone.

    Returns:
        Whether a folder was deleted.
    """
    if "callbacks.model_checkpoint.dirpath" in {override_key(o) for o in user} or not env.checkpoint_dir.is_dir():
        return False
    shutil.rmtree(env.checkpoint_dir)
    return True


def write_failure(env: ContainerEnv, message: str) -> None:
    """Write ``message`` to SageMaker's failure file unless one exists (the first reason stays, as
    the SDK's drivers and sagemaker-training keep it)."""
    with contextlib.suppress(FileExistsError):
        env.failure_file.parent.mkdir(parents=True, exist_ok=True)
        with open(env.failure_file, "x") as f:
            f.write(message + "\n")


def export_or_stop(env: ContainerEnv, run_model_dir: Path) -> None:
    """:func:`~sagemaker_launch.model_archive.export_model` into ``$SM_MODEL_DIR``, complete or not at all.

    SageMaker uploads whatever ``$SM_MODEL_DIR`` holds, also for a stopped job: a SIGTERM or SIGINT
    during the copy, or an error, empties it before the process exits.

    Raises:
        StoppedRun: With 143 or 130 when a signal stopped the export.
        OSError: If the copy fails.
    """
    from bincount.stop import Stopped, stop_on_sigterm
    from bincount.train import StoppedRun

    try:
        with stop_on_sigterm(sigint=True):
            export_model(run_model_dir, env.model_dir)
    except BaseException as err:
        for path in env.model_dir.iterdir() if env.model_dir.is_dir() else []:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if isinstance(err, Stopped):
            raise StoppedRun(err.signum, f"stopped by {signal.Signals(err.signum).name} while copying the model to "
                                         f"{env.model_dir}; the job's model.tar.gz is empty") from None
        raise


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the job: decode the hyperparameters, compose, train, export (rank 0).

    Args:
        argv: ``--name value`` pairs; ``None`` reads ``sys.argv[1:]``, and no pairs at all read
            :func:`read_hyperparameters`.

    Returns:
        The metrics ``train`` returned (the same on every rank for torchmetrics values).

    Raises:
        ValueError: See :func:`sagemaker_launch.hyperparameters.parse_argv` and :func:`distributed_overrides`.
        bincount.train.StoppedRun: A stop at any phase (exit status 128 + the signal); its line,
            and that the checkpoints are kept, go to the failure file (:func:`write_failure`).
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("sagemaker_launch", "bincount"):  # Lightning's own logger has its handler already
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
    argv = sys.argv[1:] if argv is None else argv
    hyperparameters = parse_argv(argv) if argv else read_hyperparameters()
    env = ContainerEnv.from_environ()
    user = decode_hyperparameters(hyperparameters)

    from lightning.pytorch.utilities import rank_zero_info

    from bincount.callbacks import PREFIX, format_metrics
    from bincount.config import compose
    from bincount.train import StoppedRun, train

    data_keys = set(compose("train", user).data.keys())
    overrides = user + container_overrides(env, user, data_keys)
    rank_zero_info(f"{PREFIX} job {env.job_name}: world_size={env.world_size} "
                   f"({env.world_size // env.local_world_size} instance(s) x {env.local_world_size})")
    rank_zero_info(f"{PREFIX} overrides: {' '.join(overrides)}")
    cfg = compose("train", overrides)
    try:
        metrics = train(cfg)
        if env.rank == 0 and cfg.get("test", True):
            export_or_stop(env, env.output_data_dir / "model")
    except StoppedRun as stopped:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun signals the other workers when one stops
        write_failure(env, f"{stopped.message}; checkpoints in {cfg.callbacks.model_checkpoint.dirpath} (synced with "
                           "the job's checkpoint S3 URI): a restarted spot job resumes from the newest")
        raise

    synced = {k: v for k, v in metrics.items() if "loss" not in k}  # torchmetrics values, synced by DDP
    log.info("%s rank %d/%d world_size=%d %s", PREFIX, env.rank, env.world_size, env.world_size, format_metrics(synced))
    if env.rank == 0:
        (env.output_data_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if cfg.get("test", True):
            rank_zero_info(f"{PREFIX} model exported to {env.model_dir}")
            if is_tuning_trial() and drop_trial_checkpoints(env, user):
                rank_zero_info(f"{PREFIX} tuning trial done: deleted {env.checkpoint_dir} (later trials won't "
                               "download it)")
    return metrics


if __name__ == "__main__":
    main()
