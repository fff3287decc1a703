"""The launcher side: the real SageMaker SDK builds each request and sends it to a local moto
server; the tests read what moto received (its request recording), not mocks of our code."""

import copy
import io
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import MissingMandatoryValue

from bincount.callbacks import PREFIX, format_metrics
from bincount.config import compose
from sagemaker_launch import cost, launch, plan, session, tune
from sagemaker_launch.hyperparameters import decode_hyperparameters
from tests.moto_server import BUCKET, ROLE, aws, moto_server  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
TRAIN_S3 = f"s3://{BUCKET}/abid/subset"


def only_training_overrides(hyperparameters: dict) -> list[str]:
    return decode_hyperparameters(hyperparameters)


def test_dry_run_prints_the_request_and_cost_and_sends_nothing(aws, capsys):
    sub = launch.main(["+experiment=resnet50_subset", "sagemaker=gpu_multi", "sagemaker.instance_count=2",
                       "sagemaker.spot=true", f"sagemaker.inputs.train={TRAIN_S3}", "--dry-run"])
    streaming = launch.main(["data=abid_stream", f"data.uri=s3://{BUCKET}/abid/v1", "--dry-run"])
    assert f"data.uri=s3://{BUCKET}/abid/v1" in only_training_overrides(streaming.request["HyperParameters"])
    assert not any(c["ChannelName"] == "train" for c in streaming.request["InputDataConfig"])
    out = capsys.readouterr().out
    assert aws.requests() == []  # not even an S3 upload reached the server
    assert sub.dry_run and sub.request["EnableManagedSpotTraining"] is True
    assert sub.request["ResourceConfig"] == {"InstanceType": "ml.g5.xlarge", "InstanceCount": 2, "VolumeSizeInGB": 50}
    assert f"DRY RUN: CreateTrainingJob {sub.job_name} (not sent)" in out
    assert json.loads(out[out.index("{"):out.index("\nwould upload")]) == json.loads(json.dumps(sub.request))
    assert re.search(r"would upload \d+ files to: s3://bincount-test/bincount/bincount-[-\d]+/input/code/", out)
    assert re.search(r"ml\.g5\.xlarge\s+2\s+8\.0\s+16\.0\s+1\.408\s+22\.53\s+6\.76", out)


def test_a_dry_run_does_not_warn_that_the_role_cannot_be_verified(aws, monkeypatch, caplog):
    import logging

    monkeypatch.delenv("SAGEMAKER_VALIDATE_ROLE")  # the SDK checks the role, as for a newcomer
    caplog.set_level(logging.INFO)
    launch.main(["+experiment=quickstart", "sagemaker=cpu", f"sagemaker.inputs.train={TRAIN_S3}", "--dry-run"])
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("sagemaker.core.helper.iam_role_resolver")
                and ("access denied" in r.getMessage() or r.levelno >= logging.WARNING)]
    assert "SAGEMAKER_VALIDATE_ROLE" not in os.environ  # the check is off in the dry run only


@pytest.mark.parametrize(("instance_type", "extra", "precision", "why"), [
    ("ml.g5.xlarge", [], "bf16-mixed", "ml.g5.xlarge computes in bfloat16"),  # A10G
    ("ml.g4dn.xlarge", [], "16-mixed", "no native bfloat16"),  # T4
    ("ml.m5.xlarge", [], "32-true", "no bfloat16 instructions"),
    ("ml.g5.xlarge", ["trainer.precision=32-true"], "32-true", "set on the command line"),
])
def test_the_dry_run_shows_the_precision_the_job_trains_in(aws, capsys, instance_type, extra, precision, why):
    sub = launch.main(["+experiment=resnet18_subset", f"sagemaker.instance_type={instance_type}", *extra,
                       f"sagemaker.inputs.train={TRAIN_S3}", "--dry-run"])
    sent = only_training_overrides(sub.request["HyperParameters"])
    assert [o for o in sent if o.startswith("trainer.precision=")] == [f"trainer.precision={precision}"]
    assert compose("train", sent).trainer.precision == precision  # what the container composes
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("precision: "))
    assert line.startswith(f"precision: {precision} (") and why in line


def test_the_tuning_dry_run_shows_the_trials_precision(aws, capsys):
    sub = tune.main(["+experiment=quickstart", "hparams_search=lr_optuna", "sagemaker.instance_type=ml.g4dn.xlarge",
                     f"sagemaker.inputs.train={TRAIN_S3}", "--dry-run"])
    static = sub.request["TrainingJobDefinition"]["StaticHyperParameters"]
    assert "trainer.precision=16-mixed" in only_training_overrides(static)
    assert "precision: 16-mixed (ml.g4dn.xlarge's GPUs have no native bfloat16)" in capsys.readouterr().out


def test_an_instance_the_table_does_not_know_decides_its_precision_itself(aws, capsys):
    sub = launch.main(["sagemaker.instance_type=ml.g6.xlarge", "sagemaker.processes_per_instance=1",
                       f"sagemaker.inputs.train={TRAIN_S3}", "--dry-run"])
    sent = only_training_overrides(sub.request["HyperParameters"])
    assert not any(o.startswith("trainer.precision=") for o in sent)
    assert compose("train", sent).trainer.precision == "auto"
    assert "precision: auto (ml.g6.xlarge: not in conf/sagemaker/prices.yaml, decided on the instance)" in (
        capsys.readouterr().out)


def test_typos_and_missing_data_fail_before_any_request(aws):
    for bad in (["data.rooot=x"], ["sagemaker.instance_cont=2"], ["+experiment=quickstrat"], ["sagemaker=gpu_mutli"]):
        with pytest.raises(ConfigCompositionException):
            launch.main([*bad, f"sagemaker.inputs.train={TRAIN_S3}"])
    with pytest.raises(ValueError, match="no training data"):
        launch.main(["+experiment=quickstart"])
    with pytest.raises(ValueError, match="s3://"):
        launch.main(["sagemaker.inputs.train=/local/abid"])
    with pytest.raises(ValueError, match="not reachable"):  # streaming shards: the job reads S3, not this disk
        launch.main(["data=abid_stream", "data.uri=data/abid-shards"])
    with pytest.raises(MissingMandatoryValue):
        launch.main([f"sagemaker.inputs.train={TRAIN_S3}", "data.label_list=???"])
    with pytest.raises(ValueError, match="max_wait"):
        launch.main([f"sagemaker.inputs.train={TRAIN_S3}", "sagemaker.spot=true", "sagemaker.max_wait_hours=1"])
    assert aws.requests() == []


def test_single_instance_job(aws):
    sub = launch.main(["+experiment=quickstart", "sagemaker=gpu_single", f"sagemaker.inputs.train={TRAIN_S3}",
                       "trainer.max_epochs=3", "model.optimizer.lr=0.003", "--no-wait"])
    [req] = aws.calls("CreateTrainingJob")
    assert req["TrainingJobName"] == sub.job_name and req["RoleArn"] == ROLE
    spec = req["AlgorithmSpecification"]
    assert spec["TrainingImage"] == "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.8.0-gpu-py312"
    # PID 1 is our wrapper around the SDK's sm_train.sh (tests/test_sagemaker_container.py runs it)
    assert spec["ContainerEntrypoint"] == ["/bin/bash", launch.CONTAINER_INIT]
    assert spec["ContainerArguments"] == ["/opt/ml/input/data/sm_drivers/sm_train.sh"]
    assert req["ResourceConfig"] == {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50}
    # the user's overrides, plus the GPU trainer (quickstart picks cpu) in the A10G's bfloat16
    assert only_training_overrides(req["HyperParameters"]) == [
        "+experiment=quickstart", "trainer.max_epochs=3", "model.optimizer.lr=0.003", "trainer.accelerator=gpu",
        "trainer.precision=bf16-mixed"]
    cfg = compose("train", only_training_overrides(req["HyperParameters"]))  # what the container composes
    assert cfg.trainer.max_epochs == 3 and cfg.model.optimizer.lr == 0.003 and cfg.trainer.accelerator == "gpu"
    assert req["Environment"] == {"SM_CHECKPOINT_DIR": "/opt/ml/checkpoints", "PYTHONUNBUFFERED": "1"}
    assert not req.get("EnableManagedSpotTraining") and "CheckpointConfig" not in req and "ProfilerConfig" not in req
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 8 * 3600}
    train = next(c for c in req["InputDataConfig"] if c["ChannelName"] == "train")
    assert train["DataSource"]["S3DataSource"]["S3Uri"] == TRAIN_S3
    # the metric regexes read our log lines
    line = f"{PREFIX} validation epoch=2 global_step=30 {format_metrics({'val/acc': 0.75, 'val/acc_best': 0.8, 'val/obo_acc': 0.9})}"
    found = {m["Name"]: re.search(m["Regex"], line) for m in spec["MetricDefinitions"]}
    assert found["val/acc"].group(1) == "0.75" and found["val/acc_best"].group(1) == "0.8"
    # the code the job runs: bincount's wheel, which the container pip-installs, and the two scripts
    # SageMaker starts before that, as the wheel holds them
    prefix = f"{BUCKET}/bincount/{sub.job_name}/input/code/"
    code = {k[len(prefix):]: v for k, v in aws.puts(prefix).items()}
    [wheel] = [n for n in code if n.endswith(".whl")]
    assert re.fullmatch(r"bincount-[^-]+-py3-none-any\.whl", wheel)
    assert set(code) == {wheel, "requirements.txt", "sagemaker_launch/entry.py", "sagemaker_launch/container_init.sh"}
    assert code["requirements.txt"].decode().splitlines()[-1] == f"./{wheel}"
    with zipfile.ZipFile(io.BytesIO(code[wheel])) as archive:
        names = set(archive.namelist())
        assert {"bincount/train.py", "bincount/conf/train.yaml", "bincount/conf/sagemaker/prices.yaml",
                "sagemaker_launch/launch.py",
                "hydra_plugins/bincount_sagemaker_launcher/sagemaker_launcher.py"} <= names
        for script in ("sagemaker_launch/entry.py", "sagemaker_launch/container_init.sh"):
            assert archive.read(script) == code[script] == (REPO / script).read_bytes()
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    drivers = f"{BUCKET}/bincount/{sub.job_name}/input/sm_drivers/"
    puts = aws.puts(drivers)
    assert json.loads(puts[drivers + "sourcecode.json"])["entry_script"] == "sagemaker_launch/entry.py"
    assert json.loads(puts[drivers + "distributed.json"]) == {}  # one process: no torchrun
    assert "install_requirements.py requirements.txt" in puts[drivers + "sm_train.sh"].decode()


def test_multi_instance_spot_profiled_job(aws):
    args = ["+experiment=resnet50_subset", "sagemaker=gpu_multi", "sagemaker.instance_count=2", "sagemaker.spot=true",
            "sagemaker.profiler=true", f"sagemaker.inputs.train={TRAIN_S3}", "--no-wait"]
    first, second = launch.main(args), launch.main(args)
    reqs = aws.calls("CreateTrainingJob")
    assert [r["TrainingJobName"] for r in reqs] == [first.job_name, second.job_name]
    req = reqs[0]
    assert req["ResourceConfig"]["InstanceCount"] == 2 and req["EnableManagedSpotTraining"] is True
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 8 * 3600, "MaxWaitTimeInSeconds": 16 * 3600}
    # a checkpoint URI per job (a fresh ModelTrainer each time), synced with SM_CHECKPOINT_DIR
    assert [r["CheckpointConfig"] for r in reqs] == [
        {"S3Uri": f"s3://{BUCKET}/bincount/{s.job_name}/checkpoints", "LocalPath": "/opt/ml/checkpoints"}
        for s in (first, second)]
    assert req["ProfilerConfig"] == {"S3OutputPath": f"s3://{BUCKET}/bincount/profiler",
                                     "ProfilingIntervalInMilliseconds": 500, "DisableProfiler": False}
    hps = req["HyperParameters"]
    assert {"trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy=ddp",
            "++trainer.profiler=simple"} <= set(only_training_overrides(hps))
    cfg = compose("train", only_training_overrides(hps))
    assert cfg.trainer.devices * cfg.trainer.num_nodes == 2 and cfg.trainer.strategy == "ddp"
    drivers = f"{BUCKET}/bincount/{first.job_name}/input/sm_drivers/"
    puts = aws.puts(drivers)
    assert json.loads(puts[drivers + "distributed.json"]) == {"process_count_per_node": 1, "smp": None}
    assert "torchrun_driver.py" in puts[drivers + "sm_train.sh"].decode()


def test_processes_follow_the_instance_type(aws):
    cfg = compose("launch", ["sagemaker.instance_type=ml.g5.12xlarge", "sagemaker.instance_count=3"])
    assert plan.trainer_overrides(cfg, []) == ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed",
                                                 "trainer.devices=4", "trainer.num_nodes=3", "trainer.strategy=ddp"]
    cpu = compose("launch", ["sagemaker=cpu", "+experiment=resnet18_subset"])  # a GPU experiment on a CPU box
    assert plan.trainer_overrides(cpu, []) == ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    with pytest.raises(KeyError, match="processes_per_instance"):
        plan.trainer_overrides(compose("launch", ["sagemaker.instance_type=ml.x9.huge"]), [])
    # the instance decides the accelerator, also when processes_per_instance is given
    g5 = compose("launch", ["sagemaker.instance_type=ml.g5.12xlarge", "sagemaker.processes_per_instance=4"])
    assert plan.trainer_overrides(g5, [])[:3] == ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed",
                                                    "trainer.devices=4"]
    quick = compose("launch", ["+experiment=quickstart", "sagemaker.instance_type=ml.g5.12xlarge",
                                   "sagemaker.processes_per_instance=2"])  # quickstart's trainer is cpu
    assert plan.trainer_overrides(quick, [])[0] == "trainer.accelerator=gpu"
    m5 = compose("launch", ["sagemaker=cpu", "sagemaker.processes_per_instance=2"])
    assert plan.trainer_overrides(m5, [])[0] == "trainer.accelerator=cpu"
    g6 = compose("launch", ["sagemaker.instance_type=ml.g6.xlarge", "sagemaker.processes_per_instance=1"])
    assert plan.trainer_overrides(g6, []) == ["trainer.accelerator=gpu"]  # not in the price table: its family
    with pytest.raises(KeyError, match="can't tell"):
        plan.trainer_overrides(compose("launch", ["sagemaker.instance_type=ml.trn1.2xlarge",
                                                        "sagemaker.processes_per_instance=2"]), [])


def test_profiler_output_goes_to_the_sessions_default_bucket(aws, monkeypatch):
    monkeypatch.delenv("SAGEMAKER_BUCKET")  # no sagemaker.bucket: the SDK's default bucket for the account
    from sagemaker.core.helper import session_helper

    # the SDK asks STS for the account at a fixed regional URL (not AWS_ENDPOINT_URL): point it at moto
    monkeypatch.setattr(session_helper, "sts_regional_endpoint", lambda region: aws.url)
    sub = launch.main(["sagemaker=cpu", "sagemaker.profiler=true", f"sagemaker.inputs.train={TRAIN_S3}", "--no-wait"])
    [req] = aws.calls("CreateTrainingJob")
    default = "sagemaker-us-east-1-123456789012"  # moto's account
    assert req["ProfilerConfig"]["S3OutputPath"] == f"s3://{default}/bincount/profiler"
    assert req["OutputDataConfig"]["S3OutputPath"] == f"s3://{default}/bincount"  # where the SDK puts the rest
    assert sub.job_name == req["TrainingJobName"]


def test_dry_run_checks_the_request_against_the_service_model(aws):
    sub = launch.main(["+experiment=quickstart", "sagemaker=cpu", f"sagemaker.inputs.train={TRAIN_S3}", "--dry-run"])
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker").operation_model("CreateTrainingJob")
    assert session.request_errors(sub.request, model) == []

    def errors(**changes) -> list[str]:
        req = copy.deepcopy(sub.request)
        for path, value in changes.items():
            *parents, last = path.split("__")
            node = req
            for key in parents:
                node = node[key]
            node[last] = value
        return session.request_errors(req, model)

    # what botocore's ParamValidator alone lets through
    assert errors(TrainingJobName="j" * 64) == ["CreateTrainingJob.TrainingJobName: 64 characters, at most 63"]
    [role] = errors(RoleArn="SageMakerExecutionRoleName")
    assert role.startswith("CreateTrainingJob.RoleArn='SageMakerExecutionRoleName': does not match 'arn:aws")
    [bad_type] = errors(ResourceConfig__InstanceType="ml.g5.3xlarge")
    assert "ResourceConfig.InstanceType='ml.g5.3xlarge': not one of SageMaker's" in bad_type
    [too_long] = errors(HyperParameters__note="x" * 2501)
    assert too_long == "CreateTrainingJob.HyperParameters['note']: 2501 characters, at most 2500"
    assert errors(ResourceConfig__KeepAlivePeriodInSeconds=21601) == [
        "CreateTrainingJob.ResourceConfig.KeepAlivePeriodInSeconds=21601: at most 21600"]
    [metrics] = errors(AlgorithmSpecification__MetricDefinitions=[{"Name": f"m{i}", "Regex": "x"} for i in range(41)])
    assert metrics == "CreateTrainingJob.AlgorithmSpecification.MetricDefinitions: 41 items, at most 40"
    # and what ParamValidator itself finds
    assert any("VolumeSizeInGB" in e for e in errors(ResourceConfig__VolumeSizeInGB="50"))
    # through the launcher: the dry run fails instead of printing a request SageMaker would refuse
    with pytest.raises(ValueError, match="would refuse this CreateTrainingJob request"):
        launch.main(["sagemaker=cpu", "sagemaker.instance_type=ml.g5.3xlarge", "sagemaker.processes_per_instance=1",
                     f"sagemaker.inputs.train={TRAIN_S3}", "--dry-run"])
    assert aws.requests() == []


def test_a_long_base_job_name_is_refused(aws):
    base = "b" * plan.BASE_JOB_NAME_MAX
    sub = launch.main([f"sagemaker.base_job_name={base}", f"sagemaker.inputs.train={TRAIN_S3}", "--dry-run"])
    assert re.fullmatch(base + r"-\d{14}", sub.job_name)  # 63 characters, the timestamp whole
    with pytest.raises(ValueError, match="loses the timestamp"):
        launch.main([f"sagemaker.base_job_name={base}x", f"sagemaker.inputs.train={TRAIN_S3}", "--dry-run"])
    with pytest.raises(ValueError, match="job name pattern"):
        launch.main(["sagemaker.base_job_name=-x", f"sagemaker.inputs.train={TRAIN_S3}", "--dry-run"])
    assert plan.job_base_name("a" * 60, "-261202102330-7") == "a" * 33 + "-261202102330-7"
    assert aws.requests() == []


def test_cost_table():
    line = cost.estimate("ml.g5.xlarge", 4, 2.5)
    assert line.instance_hours == 10 and line.on_demand_usd == pytest.approx(14.08)
    assert line.spot_usd == pytest.approx(14.08 * 0.3)
    text = cost.main(["sagemaker=gpu_multi", "sagemaker.instance_count=4", "sagemaker.expected_hours=2.5"])
    assert re.search(r"ml\.g5\.xlarge\s+4\s+2\.5\s+10\.0\s+1\.408\s+14\.08\s+4\.22 <-", text)
    assert "as of 2024-11-01 (https://aws.amazon.com/sagemaker/pricing/)" in text
    assert cost.instance_gpus("ml.p4d.24xlarge") == 8 and cost.instance_gpus("ml.m5.xlarge") == 0


def test_tuning_job_uses_the_optuna_search_space(aws):
    sub = tune.main(["+experiment=quickstart", "hparams_search=lr_optuna", "sagemaker=gpu_multi", "sagemaker.spot=true",
                     f"sagemaker.inputs.train={TRAIN_S3}", "model.optimizer.lr=0.005", "--no-wait"])
    [req] = aws.calls("CreateHyperParameterTuningJob")
    assert req["HyperParameterTuningJobName"] == sub.job_name and len(sub.job_name) <= 32
    config = req["HyperParameterTuningJobConfig"]
    # the local sweep's objective and direction (tests/test_train.py runs them through Optuna)
    optuna = compose("train", ["hparams_search=lr_optuna"], return_hydra_config=True)
    assert config["Strategy"] == "Bayesian"
    assert config["HyperParameterTuningJobObjective"] == {
        "MetricName": optuna.optimized_metric, "Type": optuna.hydra.sweeper.direction.capitalize()}
    assert config["HyperParameterTuningJobObjective"] == {"MetricName": "val/mae_best", "Type": "Minimize"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 6, "MaxParallelTrainingJobs": 1}
    assert config["ParameterRanges"]["ContinuousParameterRanges"] == [
        {"Name": "model__optimizer__lr", "MinValue": "0.0002", "MaxValue": "0.01", "ScalingType": "Logarithmic"},
        {"Name": "model__optimizer__weight_decay", "MinValue": "0.0", "MaxValue": "0.1", "ScalingType": "Auto"}]
    job = req["TrainingJobDefinition"]
    static = job["StaticHyperParameters"]
    assert "model__optimizer__lr" not in static and "hparams_search" not in static  # tuned / launcher-only
    assert static["sagemaker_program"] == "sagemaker_launch/entry.py"
    assert static["sagemaker_torch_distributed_enabled"] == "true"  # the legacy toolkit path drops Torchrun
    assert {"+experiment=quickstart", "trainer.num_nodes=2"} <= set(only_training_overrides(static))
    assert job["EnableManagedSpotTraining"] is True
    assert job["CheckpointConfig"]["S3Uri"] == f"s3://{BUCKET}/bincount/{sub.job_name}/checkpoints"
    assert job["Environment"]["SM_CHECKPOINT_DIR"] == "/opt/ml/checkpoints"
    # the objective's regex reads it from the validation line training logs (val/mae_best next to val/mae)
    regex = {m["Name"]: m["Regex"] for m in job["AlgorithmSpecification"]["MetricDefinitions"]}["val/mae_best"]
    line = f"{PREFIX} validation epoch=1 global_step=6 " + format_metrics(
        {"val/acc": 0.5, "val/acc_best": 0.625, "val/mae": 0.75, "val/mae_best": 0.5625})
    assert re.search(regex, line).group(1) == "0.5625"
    tarball = aws.puts(static["sagemaker_submit_directory"][len("s3://"):])
    assert len(tarball) == 1


def test_search_space_translation():
    space = {k: v for k, v in ((s, tune.parameter_range(s)) for s in (
        "tag(int, interval(1, 8))", "choice(32, 64)", "range(1, 5)", "range(0.1, 0.4, 0.1)", "tag(log, interval(1e-4, 1e-2))"))}
    assert type(space["tag(int, interval(1, 8))"]).__name__ == "IntegerParameter"
    assert space["tag(int, interval(1, 8))"].min_value == 1
    assert space["choice(32, 64)"].values == ["=32", "=64"]  # escaped like the static overrides (categorical_value)
    assert type(space["range(1, 5)"]).__name__ == "IntegerParameter" and space["range(1, 5)"].max_value == 4
    assert type(space["range(0.1, 0.4, 0.1)"]).__name__ == "CategoricalParameter"
    assert space["tag(log, interval(1e-4, 1e-2))"].scaling_type == "Logarithmic"
    with pytest.raises(ValueError, match="not a sweep"):
        tune.parameter_range("0.5")
    with pytest.raises(ValueError, match="hparams_search"):
        tune.search_space(compose("launch", [], return_hydra_config=True))


def documented_commands(module) -> list[list[str]]:
    """The commands of a module docstring's "Usage:" block, as argv lists."""
    usage = module.__doc__.split("Usage:\n", 1)[1].split("\n\n", 1)[0]
    return [shlex.split(cmd) for cmd in usage.replace("\\\n", " ").splitlines() if cmd.strip()]


def run_multirun(argv: list[str], sweep_dir: Path) -> subprocess.CompletedProcess:
    assert argv[:2] == ["python", "train.py"], argv
    args = [a.replace("s3://BUCKET/", f"s3://{BUCKET}/") for a in argv[2:]]
    run = subprocess.run([sys.executable, "train.py", *args, f"hydra.sweep.dir={sweep_dir}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.integration
def test_hydra_multirun_with_the_sagemaker_launcher(aws, tmp_path):
    from hydra_plugins.bincount_sagemaker_launcher import sagemaker_launcher

    submit, _ = documented_commands(sagemaker_launcher)
    run_multirun(submit, tmp_path / "sweep")
    reqs = aws.calls("CreateTrainingJob")
    names = [r["TrainingJobName"] for r in reqs]
    sweep = re.fullmatch(r"bincount-(\d{12})-0-\d{14}", names[0]).group(1)
    assert [n.rsplit("-", 1)[0] for n in names] == [f"bincount-{sweep}-{i}" for i in range(3)]
    for req, lr in zip(reqs, ("0.0003", "0.001", "0.003"), strict=True):
        # only the training overrides reach the job; the GPU instance sets the trainer
        assert sorted(only_training_overrides(req["HyperParameters"])) == sorted([
            "+experiment=resnet18_subset", f"model.optimizer.lr={lr}", "trainer.accelerator=gpu",
            "trainer.precision=bf16-mixed"])
        assert req["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
        assert req["OutputDataConfig"]["S3OutputPath"] == f"s3://{BUCKET}/{req['TrainingJobName'].rsplit('-', 1)[0]}"
    assert (tmp_path / "sweep" / "multirun.yaml").is_file()



def test_sagemaker_launcher_checkpoint_uris_are_per_job_and_sweep(aws, tmp_path):
    run = subprocess.run([sys.executable, "train.py", "-m", "hydra/launcher=sagemaker", "sagemaker=cpu",
                          f"sagemaker.inputs.train={TRAIN_S3}", f"sagemaker.checkpoint_s3_uri=s3://{BUCKET}/ckpt",
                          "sagemaker.base_job_name=" + "b" * 48, "sagemaker.dry_run=true", "+experiment=quickstart",
                          "model.optimizer.lr=0.001,0.003", f"hydra.sweep.dir={tmp_path}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    uris = re.findall(r'"S3Uri": "(s3://bincount-test/ckpt/[^"]+)"', run.stdout)
    names = re.findall(r"DRY RUN: CreateTrainingJob (\S+) \(not sent\)", run.stdout)
    assert len(set(uris)) == 2 and len(names) == 2
    for uri, name in zip(uris, names, strict=True):
        assert uri == f"s3://{BUCKET}/ckpt/{name.rsplit('-', 1)[0]}" and len(name) <= 63
        assert re.search(r"-\d{12}-[01]-\d{14}$", name)  # sweep, job and time survive a long base
    assert aws.requests() == []


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["sagemaker_launch.launch", "+experiment=quickstart", "sagemaker=cpu", "sagemaker.inputs.train=s3://b/abid"],
     "error: Unable to locate credentials (configure AWS credentials, or add --dry-run)"),
    (["sagemaker_launch.tune", "+experiment=quickstart", "hparams_search=lr_optuna", "sagemaker=cpu",
      "sagemaker.inputs.train=s3://b/abid"], "error: Unable to locate credentials"),
    (["sagemaker_launch.launch", "data.rooot=x"], "error: Could not override 'data.rooot'."),
    (["sagemaker_launch.deploy", "job=x", "endpoint=bincount-prod"], "error: the model needs an execution role"),
    (["sagemaker_launch.transform", "model=x", "input=s3://b/in/", "output=s3://b/out/"],
     "error: the model needs an execution role"),
])
def test_commands_without_aws_or_with_a_typo_print_one_error_line(args, message, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SAGEMAKER_"))}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    run = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and message in run.stderr, run.stderr[-2000:]
