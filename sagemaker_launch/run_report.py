"""A training run's held-out evaluation, as ``python -m sagemaker_launch.register`` reads it: from
a local run folder or from a training job's ``output.tar.gz``."""

from __future__ import annotations

import csv
import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from botocore.exceptions import ClientError
from omegaconf import OmegaConf

from bincount.data.s3 import is_not_found, split_s3_uri
from bincount.models.card import ModelCard

# the run folder's files a registration reads (a job's output.tar.gz holds the whole run folder)
REPORT_FILES = ("metrics.json", "predictions.csv", "config.yaml", "model/model_config.json")

@dataclass(frozen=True)
class Evaluation:
    """A run's held-out evaluation, as its run folder records it: ``metrics`` (``metrics.json``), the
    ``eval_set`` (:func:`eval_set_id`), and, where the folder has them, the ``split`` in words and the
    ``data`` it was taken from (``config.yaml``) and the exported model's ``card``."""

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
        card = ModelCard.read(json.loads((run_dir / "model" / "model_config.json").read_text()))
    return Evaluation(metrics, eval_set_id(run_dir / "predictions.csv"), split, data, card)


def fetch_job_run(output_tar_gz: str, session, into: Path) -> Path:
    """Download a training job's ``output.tar.gz`` and extract :data:`REPORT_FILES` into ``into``.

    Raises:
        ValueError: If there is no such object (the job has not finished, or wrote no output).
    """
    bucket, key = split_s3_uri(output_tar_gz)
    archive = into / "output.tar.gz"
    try:
        session.client("s3").download_file(bucket, key, str(archive))
    except ClientError as err:
        if not is_not_found(err):
            raise
        raise ValueError(f"{output_tar_gz} not found: has the job finished and written its run folder?") from None
    with tarfile.open(archive) as tar:
        wanted = [m for m in tar.getmembers() if m.isfile()
                  and str(PurePosixPath(m.name)) in REPORT_FILES]
        tar.extractall(into / "run", members=wanted, filter="data")
    return into / "run"
