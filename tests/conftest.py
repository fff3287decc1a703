from __future__ import annotations

import os
from pathlib import Path

# with -n auto each xdist worker (one a core) computes on one thread, and so do the processes it
# starts: two workers of two threads each on two cores mostly wait for each other
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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


# the one trained run that the tests of a run's outputs share: every option of the quickstart's
# recipe (soft ordinal labels, median decoding, flip TTA, one-cycle, EMA, balanced sampling, cached
# photos) and bfloat16 training steps, so each output contract is checked on the hardest case
TRAINED_RUN = ["model.loss=soft_ce", "model.label_sigma=0.8", "model.decode=median", "model.tta=flips",
               "model/scheduler=onecycle", "trainer.max_epochs=2", "trainer.precision=bf16-mixed",
               "data.cache_images=true", "data.balance=true",
               "callbacks.ema={_target_: lightning.pytorch.callbacks.EMAWeightAveraging, decay: 0.5}"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, fake_abid) -> tuple[DictConfig, dict[str, float]]:
    """One tiny ``train()`` on the fake folder (:data:`TRAINED_RUN`), shared by the test session.

    Returns:
        The run's config (its folder is ``cfg.paths.output_dir``) and what ``train()`` returned.
        Tests read its files and never change them.
    """
    from bincount.train import train

    root, _ = fake_abid
    cfg = compose("train", [f"data.root={root}", *FAST, "callbacks.rich_model_summary=null", *TRAINED_RUN])
    cfg = set_output_dir(cfg, tmp_path_factory.mktemp("trained_run") / "run")
    return cfg, train(cfg)


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


# a test that starts one of these servers runs in the slow lane
SERVERS = {"moto_server", "s3_server", "mlflow_server"}


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config, items) -> None:
    """Two lanes: ``-m "not slow"`` is the fast lane (unit tests on tiny fakes), ``-m slow`` the
    rest. An ``integration`` test (the shared real sample, SageMaker's container code) or one that
    starts a local server is ``slow`` too.

    The files that hold slow tests run first, the others after, each in its own order: with
    ``-n auto`` (``--dist loadfile``: a file goes to one worker) the long files start at once and
    the short ones fill the workers in after, so no worker is left alone with a long file at the end."""
    for item in items:
        if item.get_closest_marker("integration") or SERVERS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # a stable sort
