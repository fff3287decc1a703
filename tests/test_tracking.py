"""logger=mlflow (bincount.tracking), against real MLflow
stores: the local SQLite default, SQLite files, and a tracking server on loopback (``mlflow_server``,
last in this module: it boots while the others run)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from bincount import tracking
from bincount.config import compose
from bincount.tracking import JOB_NAME_TAG, RUN_DIR_TAG, SWEEP_DIR_TAG, TRIAL_TAG, Sweep, current_sweep
from bincount.train import train
from bincount.trainer import instantiate_trainer

EXPERIMENT = "bincount"  # conf/logger/mlflow.yaml's experiment_name
PARENT_TAG = "mlflow.parentRunId"
TEST_KEYS = ("test/acc", "test/obo_acc", "test/mae", "test/rmse")


def the_run(client, out_dir: Path):
    """The one run of the default experiment that trained in ``out_dir``."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{RUN_DIR_TAG}` = '{out_dir.resolve()}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_without_a_tracking_uri_runs_and_sweeps_go_to_mlflow_db_in_the_working_folder(train_cfg, mlflow_env,
                                                                                       tmp_path):
    """A tiny run (no test or export), then three sweep trials as a multirun job would start and
    end them (without the training between): two of one sweep and one of another. With nothing
    set, all go to MLflow's default store, ``mlflow.db`` in the working folder, where ``mlflow ui``
    looks; each sweep's trials nest under one parent run."""
    import mlflow
    from mlflow import MlflowClient

    project = tmp_path / "project"
    project.mkdir()
    mlflow_env.chdir(project)
    single = train_cfg("logger=mlflow", "test=false")
    train(single)
    first, second = str(project / "multirun/2026-01-02/03-04-05"), str(project / "multirun/2026-01-02/09-00-00")
    trials = {}
    for sweep in (Sweep(first, 0), Sweep(first, 1), Sweep(second, 0)):
        cfg = train_cfg("logger=mlflow", f"seed={sweep.trial}", out=Path(sweep.dir) / str(sweep.trial))
        out = Path(cfg.paths.output_dir)
        trainer = instantiate_trainer(cfg)
        trials[sweep] = tracking.start(trainer, cfg, out, sweep=sweep, environ={})
        out.mkdir(parents=True)
        (out / "config.yaml").write_text(f"seed: {sweep.trial}\n")
        tracking.log_outputs(trainer, out)

    assert (project / "mlflow.db").is_file()
    mlflow.set_tracking_uri(None)  # what MLflow (and `mlflow ui`) use here with nothing set
    assert mlflow.get_tracking_uri() == f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(mlflow.get_tracking_uri())

    run = the_run(client, Path(single.paths.output_dir))
    assert run.info.status == "FINISHED" and run.data.params["seed"] == str(single.seed)
    assert "val/mae" in run.data.metrics and "test/mae" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    assert run.info.artifact_uri.startswith(str(project / "mlruns"))  # mlflow ui serves them from there
    assert JOB_NAME_TAG not in run.data.tags and PARENT_TAG not in run.data.tags
    assert run.info.run_name == "/".join(Path(single.paths.output_dir).parts[-2:])  # not one made-up name per seed

    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = {r.info.run_id: r for r in client.search_runs([experiment])}
    assert len(runs) == 1 + 5  # the run, three trials, two parents
    parents = {sweep: runs[run_id].data.tags[PARENT_TAG] for sweep, run_id in trials.items()}
    assert parents[Sweep(first, 0)] == parents[Sweep(first, 1)] != parents[Sweep(second, 0)]
    for sweep, run_id in trials.items():
        parent, trial = runs[parents[sweep]], runs[run_id]
        assert parent.data.tags[SWEEP_DIR_TAG] == sweep.dir and not parent.data.params
        assert parent.info.status == "FINISHED"
        assert trial.data.tags[TRIAL_TAG] == str(sweep.trial) and JOB_NAME_TAG not in trial.data.tags
        assert trial.info.run_name == f"trial {sweep.trial}" and parent.info.run_name.startswith("sweep 2026-01-02/")
        assert trial.data.params["seed"] == str(sweep.trial)
        folder = str(Path(sweep.dir) / str(sweep.trial))
        assert trial.data.params["paths/output_dir"] == trial.data.tags[RUN_DIR_TAG] == folder
        assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]


def test_current_sweep_reads_the_multirun_job(tmp_path):
    def hydra_config(*overrides: str):
        cfg = compose("train", [f"hydra.sweep.dir={tmp_path}/sweep", "hydra.job.num=3", *overrides],
                      return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "sweep" / "3")
        return cfg

    try:
        HydraConfig.instance().set_config(hydra_config("hydra.mode=MULTIRUN"))
        assert current_sweep() == Sweep(str(tmp_path / "sweep"), 3)
        HydraConfig.instance().set_config(hydra_config("hydra.mode=RUN"))
        assert current_sweep() is None
    finally:
        HydraConfig.instance().cfg = None
    assert current_sweep() is None  # outside @hydra.main


def test_a_sagemaker_job_tracks_to_a_managed_mlflow_arn(mlflow_env):
    """The launcher's plan: the job installs the track extra, and the container's config (composed
    from the job's overrides, with the job's name in the environment) builds a logger whose store
    is sagemaker-mlflow's (a REST store that signs its requests for the ARN). Nothing is sent."""
    import importlib.metadata

    from sagemaker_mlflow.mlflow_sagemaker_store import MlflowSageMakerStore

    from sagemaker_launch.plan import plan_training_job

    arn = "arn:aws:sagemaker:us-east-1:111122223333:mlflow-tracking-server/bincount"
    launch = ["+experiment=quickstart", "sagemaker=cpu", "sagemaker.inputs.train=s3://bucket/abid"]
    job = plan_training_job(compose("launch", [*launch, "logger=mlflow", f"logger.mlflow.tracking_uri={arn}"]),
                            [*launch, "logger=mlflow", f"logger.mlflow.tracking_uri={arn}"])
    assert job.extras == ("track",) and "track" in importlib.metadata.metadata("bincount").get_all("Provides-Extra")
    assert plan_training_job(compose("launch", launch), launch).extras == ()

    mlflow_env.setenv("TRAINING_JOB_NAME", "bincount-2026-01-02-03-04-05-678")
    logger = instantiate(compose("train", job.overrides).logger.mlflow)
    assert logger._run_name == "bincount-2026-01-02-03-04-05-678"
    store = logger._mlflow_client._tracking_client.store  # what MLFlowLogger will send its requests to
    assert isinstance(store, MlflowSageMakerStore) and store.store_uri == arn


def test_logger_mlflow_comes_on_top_of_csv_and_tensorboard():
    cfg = compose("train", ["logger=mlflow"])
    assert cfg.logger.mlflow.experiment_name == EXPERIMENT
    assert set(compose("train", []).logger) < set(cfg.logger)


def test_a_tracked_run_logs_config_metrics_and_outputs_to_the_server(train_cfg, mlflow_server, mlflow_env, tmp_path):
    from mlflow import MlflowClient

    mlflow_env.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # honoured through the config's ${oc.env:...}
    mlflow_env.setenv("TRAINING_JOB_NAME", "bincount-2026-01-02-03-04-05-678")  # what SageMaker sets in a job
    cfg = train_cfg("logger=mlflow", "trainer.log_every_n_steps=1")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    report = json.loads((out / "metrics.json").read_text())

    client = MlflowClient(mlflow_server.uri)
    run = the_run(client, out)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # artifacts went through the server
    assert run.info.run_name == run.data.tags[JOB_NAME_TAG] == "bincount-2026-01-02-03-04-05-678"
    # params: the resolved config, flattened
    assert float(run.data.params["model/optimizer/lr"]) == cfg.model.optimizer.lr
    assert run.data.params["data/root"] == str(cfg.data.root)
    assert run.data.params["trainer/max_epochs"] == "1"
    # metrics: what Lightning logged, equal to the run's own report
    assert run.data.metrics["test/mae"] == pytest.approx(report["mae"], abs=1e-6)
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert len(client.get_metric_history(run.info.run_id, "val/mae")) == 1  # one epoch
    # per step: the same steps and values as the run folder's CSV log
    logged = {int(r["step"]): float(r["train/loss_step"]) for r in read_csv(out / "csv/version_0/metrics.csv")
              if r["train/loss_step"]}
    history = client.get_metric_history(run.info.run_id, "train/loss_step")
    assert len(logged) > 1 and {m.step: m.value for m in history} == pytest.approx(logged, abs=1e-6)
    # artifacts: the report, the config and model/ with its card, byte for byte
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "predictions.csv", "confusion_matrix.png", "model"} <= names
    got = Path(client.download_artifacts(run.info.run_id, "model", str(tmp_path / "download")))
    for name in ("model_config.json", "model.pt"):
        assert (got / name).read_bytes() == (out / "model" / name).read_bytes(), name

