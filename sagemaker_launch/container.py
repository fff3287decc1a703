"""Where a training job's process runs: SageMaker's folders and torchrun's ranks, read from the
environment (:class:`ContainerEnv`), and the checkpoint a restarted job resumes from."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContainerEnv:
    """Where this process runs: SageMaker's folders and torchrun's ranks.

    Attributes:
        model_dir: ``$SM_MODEL_DIR`` (becomes model.tar.gz).
        output_data_dir: ``$SM_OUTPUT_DATA_DIR`` (becomes output.tar.gz).
        checkpoint_dir: ``$SM_CHECKPOINT_DIR/$TRAINING_JOB_NAME`` (synced with the checkpoint S3 URI).
        train_channel: ``$SM_CHANNEL_TRAIN`` or ``None``.
        scratch_dir: ``$SM_INPUT_DIR/scratch``: caches that must not land in an archive.
        failure_file: ``$SM_OUTPUT_FAILURE`` (``/opt/ml/output/failure``): the job's ``FailureReason``.
        job_name: ``$TRAINING_JOB_NAME`` (``local`` outside SageMaker).
        rank: Global rank (``$RANK``), 0 without torchrun.
        world_size: Processes in the job (``$WORLD_SIZE``), 1 without torchrun.
        local_world_size: Processes on this instance (``$LOCAL_WORLD_SIZE``).
    """

    model_dir: Path
    output_data_dir: Path
    checkpoint_dir: Path
    train_channel: Path | None
    scratch_dir: Path
    failure_file: Path
    job_name: str
    rank: int
    world_size: int
    local_world_size: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> ContainerEnv:
        job_name = environ.get("TRAINING_JOB_NAME", "local")
        world_size = int(environ.get("WORLD_SIZE", 1))
        channel = environ.get("SM_CHANNEL_TRAIN")
        return cls(
            model_dir=Path(environ.get("SM_MODEL_DIR", "/opt/ml/model")),
            output_data_dir=Path(environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data")),
            checkpoint_dir=Path(environ.get("SM_CHECKPOINT_DIR", "/opt/ml/checkpoints")) / job_name,
            train_channel=Path(channel) if channel else None,
            scratch_dir=Path(environ.get("SM_INPUT_DIR", "/opt/ml/input")) / "scratch",
            failure_file=Path(environ.get("SM_OUTPUT_FAILURE",
                                          Path(environ.get("SM_OUTPUT_DIR", "/opt/ml/output")) / "failure")),
            job_name=job_name,
            rank=int(environ.get("RANK", 0)),
            world_size=world_size,
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world_size)),
        )


def newest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The ``*.ckpt`` in ``checkpoint_dir`` with the highest ``global_step``, or ``None``.

    By step, not file time: a restarted spot job gets the folder back from S3 with download
    times. Checkpoints are memory-mapped, so only their small metadata is read.
    """
    import pickle

    import torch

    found: list[tuple[int, float, Path]] = []
    for path in checkpoint_dir.glob("*.ckpt") if checkpoint_dir.is_dir() else []:
        try:
            step = int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
        except (RuntimeError, EOFError, OSError, KeyError, pickle.UnpicklingError) as err:
            # a file cut short by the kill: skip it, resume from another
            log.warning("ignoring unreadable checkpoint %s: %s", path, err)
            continue
        found.append((step, path.stat().st_mtime, path))
    return max(found)[2] if found else None
