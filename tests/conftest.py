from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig

from bincount.config import compose
from tests.fakes import FAST, make_fake_abid, set_output_dir

SHARED_ABID = Path(__file__).resolve().parents[1].parent / "shared" / "abid"


@pytest.fixture(scope="session")
def fake_abid(tmp_path_factory) -> tuple[Path, dict]:
    """A 40-photo fake ABID folder (counts 1..5) plus one photo of each kind of bad input."""
    root = tmp_path_factory.mktemp("fake_abid")
    return root, make_fake_abid(root)


@pytest.fixture
def train_cfg(tmp_path, fake_abid):
    """``train.yaml`` composed for a fast CPU run on the fake folder; extra overrides as args."""
    root, _ = fake_abid

    def make(*overrides: str, out: Path | None = None) -> DictConfig:
        cfg = compose("train", [f"data.root={root}", *FAST, "trainer.max_epochs=1",
                                  "callbacks.rich_model_summary=null", *overrides])
        return set_output_dir(cfg, out or tmp_path / "run")

    return make


# the local S3 server fixtures (s3_server, s3_env) used by the data-at-scale tests; the MLflow
# tracking server (mlflow_server, mlflow_env) used by the tracking tests
pytest_plugins = ["tests.conftest_s3", "tests.conftest_mlflow"]


def pytest_collection_modifyitems(config, items) -> None:
    """The files that hold slow tests run first, the others after, each in its own order: with
    ``-n auto`` (``--dist loadfile``: a file goes to one worker) the long files start at once and
    the short ones fill the workers in after, so no worker is left alone with a long file at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # a stable sort
