"""Hydra overrides reach the container's entry unchanged, through both ways SageMaker hands a job
its hyperparameters, run with SageMaker's own installed code (sagemaker_launch/hyperparameters.py, the codec):

- a training job (ModelTrainer): the SDK's ``environment.py`` ``set_env`` writes the env file,
  ``bash`` sources it under ``set -e`` as ``sm_train.sh`` does, then the SDK's basic-script driver
  runs the entry with ``hyperparameters_to_cli_args(json.loads($SM_HPS))`` (the torchrun driver
  builds the same arguments);
- a tuning trial: the ``sagemaker-training`` toolkit of the AWS PyTorch image reads
  ``hyperparameters.json`` and runs the entry with ``Environment().to_cmd_args()``.

The entry is replaced by a probe that runs the real ``parse_argv`` + ``decode_hyperparameters``
on the arguments it gets and writes the overrides down; the test composes ``conf/train.yaml`` with
them and with the original overrides, and compares.

Also here: what the launcher refuses, and the serving image's ``code/requirements.txt``.
"""

import importlib.metadata
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bincount.config import compose
from sagemaker_launch.container import ContainerEnv
from sagemaker_launch.entry import drop_trial_checkpoints
from sagemaker_launch.model_archive import serving_requirements
from sagemaker_launch.hyperparameters import (decode_hyperparameters, encode_overrides, is_tuning_trial, parse_argv,
                                              tuned_name)
from sagemaker_launch.plan import plan_training_job

REPO = Path(__file__).resolve().parents[1]
DRIVERS = Path(importlib.util.find_spec("sagemaker").submodule_search_locations[0]) / "train" / "container_drivers"
EMA = "{_target_: lightning.pytorch.callbacks.EMAWeightAveraging, decay: 0.995}"

# jobs of overrides a user can type locally; each job composes with conf/train.yaml
JOBS = {
    "nulls": ["data.label_list=null", "callbacks.ema=null", "model.weights_path=null", "ckpt_path=null",
              "~callbacks.lr_monitor", "~callbacks.rich_model_summary=null"],
    "quoted": ["+experiment=quickstart", "data.label_list='my list.txt'",
               'model.weights_path="/opt/ml/input/data/w/r 18.pt"', "++trainer.max_time='00:00:30:00'",
               "+data.code='007'", '+data.code2="007"', "+data.apostrophe='it\\'s 100%'", "+data.said=\"say 'hi'\"",
               "+data.empty=''", "+data.unicode='Größe ü'", "+data.tab='a\tb'", "+data.lines='line 1\nline 2'",
               "+data.interp='${data.batch_size} photos'", "+data.plain=a b c", '+data.win="C:\\\\new"'],
    "typed": ["trainer.max_epochs=20", "test=false", "trainer.deterministic=True", "model.optimizer.lr=1e-3",
              "seed=-1", "+data.big=1e400", "+data.tags=[a, 'b c', \"d\", 1, null, true]",
              "+data.meta={k: 'v w', n: null, l: [1, 2]}", "++trainer.profiler=simple", "data=abid_stream",
              "data.uri=s3://bucket/abid shards/v1"],
    # Hydra applies these in order: the other way round, each pair fails
    "ordered": [f"callbacks.ema={EMA}", "callbacks.ema.decay=0.9", "~callbacks.lr_monitor",
                "+callbacks.lr_monitor={_target_: lightning.pytorch.callbacks.LearningRateMonitor, "
                "logging_interval: step}"],
}

# the job's entry, standing in for sagemaker_launch/entry.py: what it would compose with
PROBE = """import json, os, sys
from sagemaker_launch.hyperparameters import decode_hyperparameters, parse_argv
with open(os.environ["PROBE_OUT"], "w") as f:
    json.dump({"argv": sys.argv[1:], "overrides": decode_hyperparameters(parse_argv(sys.argv[1:]))}, f)
"""


def hydra_view(overrides: list[str]) -> list[tuple]:
    """The overrides as Hydra reads them: type, key, package, value (quote style aside)."""
    return [(o.type, o.key_or_group, o.package, o.value()) for o in OverridesParser.create().parse_overrides(overrides)]


def assert_delivered(got: list[str], job: list[str]) -> None:
    """``got`` is ``job`` as Hydra reads it, in the same order, and composes to the same config;
    an override without a ``'`` arrives as typed, character for character."""
    assert hydra_view(got) == hydra_view(job)
    assert [g for g, j in zip(got, job) if "'" not in j] == [j for j in job if "'" not in j]
    assert OmegaConf.to_container(compose("train", got)) == OmegaConf.to_container(compose("train", job))


def model_trainer_request(job: list[str]) -> dict[str, str]:
    """The CreateTrainingJob ``HyperParameters`` ModelTrainer makes of ``encode_overrides(job)``."""
    from sagemaker.train.utils import safe_serialize  # what ModelTrainer applies to each value

    return {name: safe_serialize(value) for name, value in encode_overrides(job).items()}


def run_model_trainer_drivers(hyperparameters: dict[str, str], tmp: Path) -> dict:
    """``sm_train.sh``'s steps for a job with ``hyperparameters``, the SDK's drivers unchanged.

    Redirected: the env file and the config JSON files go to ``tmp`` (``set_env`` takes them as
    arguments; ``environment.py``'s ``main`` reads them from the fixed ``/opt/ml``), and the entry
    is :data:`PROBE`.

    Returns:
        ``{"env": SM_HP_* after sourcing, "probe": what the probe got, "torchrun": torchrun argv}``.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (tmp / "probe.py").write_text(PROBE)
    resource = {"current_host": "algo-1", "current_instance_type": "ml.g5.xlarge", "hosts": ["algo-1"],
                "network_interface_name": "eth0"}
    (tmp / "resourceconfig.json").write_text(json.dumps(resource))
    set_env = (f"import json, logging, sys; sys.path.insert(0, {str(DRIVERS / 'scripts')!r}); "
               "from environment import logger, set_env; logger.setLevel(logging.WARNING); "
               f"set_env(json.load(open('resourceconfig.json')), {{}}, json.load(open('hyperparameters.json')), "
               "output_file='sm_training.env')")
    torchrun = (f"import json, sys; sys.path.insert(0, {str(DRIVERS / 'distributed_drivers')!r}); "
                "from torchrun_driver import create_commands; json.dump(create_commands(), open('torchrun.json', 'w'))")
    script = f"""set -e
python3 -c {shlex.quote(set_env)}
source sm_training.env
python3 -c 'import json, os; json.dump({{k: v for k, v in os.environ.items() if k.startswith("SM_HP_")}}, open("env.json", "w"))'
export SM_ENTRY_SCRIPT=probe.py SM_DISTRIBUTED_CONFIG='{{"process_count_per_node": 2}}'
python3 {DRIVERS / 'distributed_drivers' / 'basic_script_driver.py'}
python3 -c {shlex.quote(torchrun)}
"""
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp), "LANG": "C.UTF-8",
           "TRAINING_JOB_NAME": "bincount-test", "PYTHONPATH": str(REPO), "PROBE_OUT": str(tmp / "probe.json")}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"env": json.loads((tmp / "env.json").read_text()), "probe": json.loads((tmp / "probe.json").read_text()),
            "torchrun": json.loads((tmp / "torchrun.json").read_text())}


def run_training_toolkit(hyperparameters: dict[str, str], tmp: Path) -> dict:
    """A tuning trial's start in the AWS PyTorch image: the ``sagemaker-training`` toolkit builds the
    entry's arguments from ``hyperparameters.json`` and runs it (``entry_point.run``, as the PyTorch
    container's ``training.main`` does).

    Redirected: ``/opt/ml`` -> ``tmp/opt_ml`` through the toolkit's own ``SAGEMAKER_BASE_DIR``; the
    host is ``localhost`` (the toolkit waits until every host name resolves); the program is
    :data:`PROBE`, already in the code folder (the toolkit skips the download then).

    Returns:
        What the probe got.
    """
    base = tmp / "opt_ml"
    (base / "input" / "config").mkdir(parents=True, exist_ok=True)
    (base / "code").mkdir(parents=True, exist_ok=True)
    (base / "code" / "probe.py").write_text(PROBE)
    trial = {**hyperparameters, "sagemaker_program": "probe.py", "sagemaker_submit_directory": str(base / "code"),
             "sagemaker_container_log_level": "20"}
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(trial))
    (base / "input" / "config" / "inputdataconfig.json").write_text("{}")
    (base / "input" / "config" / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "localhost", "hosts": ["localhost"], "current_instance_type": "ml.g5.xlarge",
         "network_interface_name": "eth0"}))
    code = ("from sagemaker_training import entry_point, environment; env = environment.Environment(); "
            "entry_point.run(uri=env.module_dir, user_entry_point=env.user_entry_point, args=env.to_cmd_args(), "
            "env_vars=env.to_env_vars(), capture_error=True)")
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "PYTHONPATH": str(REPO), "PROBE_OUT": str(tmp / "probe.json"),
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / "probe.json").read_text())


@pytest.mark.parametrize("job", JOBS)
def test_one_codec_round_trips_what_a_launch_plans(job):
    """The launcher's encoding and the entry's decoding are one module: the hyperparameters
    ``plan_training_job`` makes of a real launch (the job's overrides plus the trainer the instance
    needs) decode to those overrides, in any key order and as ``$SM_HPS`` JSON holds them."""
    overrides = [*JOBS[job], "sagemaker=cpu", "sagemaker.inputs.train=s3://bucket/abid"]
    planned = plan_training_job(compose("launch", overrides), overrides)
    assert "trainer.accelerator=cpu" in planned.overrides  # added by the plan, not typed
    shuffled = dict(sorted(planned.hyperparameters.items(), reverse=True))
    assert_delivered(decode_hyperparameters(json.loads(json.dumps(shuffled))), planned.overrides)


@pytest.mark.parametrize("job", JOBS)
def test_training_job_drivers_deliver_every_override(job, tmp_path):
    overrides = JOBS[job]
    # plus what SageMaker adds to a tuning trial's hyperparameters, which this path passes on
    hps = {**model_trainer_request(overrides), "_tuning_objective_metric": "val/acc_best"}
    out = run_model_trainer_drivers(hps, tmp_path)
    assert out["probe"]["argv"][-2:] == ["--_tuning_objective_metric", "val/acc_best"]
    # the env file sourced under set -e, and each SM_HP_<NAME> holds exactly what was sent
    assert out["env"] == {f"SM_HP_{name.upper()}": value for name, value in hps.items()}
    assert_delivered(out["probe"]["overrides"], overrides)
    # the torchrun driver (several GPUs or instances) passes the entry the same arguments
    assert out["torchrun"][-len(out["probe"]["argv"]):] == out["probe"]["argv"]


@pytest.mark.parametrize("job", JOBS)
def test_training_toolkit_delivers_every_override(job, tmp_path):
    overrides = JOBS[job]
    got = run_training_toolkit({**encode_overrides(overrides), "_tuning_objective_metric": "val/acc_best"}, tmp_path)
    assert got["argv"][::2] == sorted(got["argv"][::2])  # the toolkit sorts by name: one value keeps the order
    assert_delivered(got["overrides"], overrides)


def test_tuning_trial_gets_static_categorical_and_tuned_values(tmp_path):
    from sagemaker_launch import tune

    static = ["+experiment=quickstart", "data.label_list=null", "model.optimizer.lr=0.005", "test=false"]
    ema_999 = EMA.replace("0.995", "0.999")
    ranges = {tuned_name(key): tune.parameter_range(spec) for key, spec in (
        ("model.optimizer.lr", "tag(log, interval(0.0002, 0.01))"),
        ("callbacks.ema", f"choice({EMA}, {ema_999})"),
        ("data.label_list", "choice('my list.txt', \"it's.txt\")"),
        ("data.batch_size", "choice(16, 32)"))}
    hps = tune.static_hyperparameters(static, ranges)  # as tune.submit_tuning_job: the tuner sets these per trial
    assert ranges["callbacks__ema"].values == [f"={EMA}".replace(" ", "%20"), f"={ema_999}".replace(" ", "%20")]
    assert ranges["data__label_list"].values == ["=my%20list.txt", '="it%27s.txt"']
    # one trial as SageMaker starts it: tuned values as plain numbers, categorical ones as listed
    trial = {**hps, "model__optimizer__lr": "0.0012345678901234", "callbacks__ema": ranges["callbacks__ema"].values[1],
             "data__label_list": ranges["data__label_list"].values[1], "data__batch_size": "=32",
             "_tuning_objective_metric": "val/acc_best"}
    got = run_training_toolkit(trial, tmp_path)["overrides"]
    assert got == ["+experiment=quickstart", "test=false", f"callbacks.ema={ema_999}", "data.batch_size=32",
                   "data.label_list=\"it%27s.txt\"".replace("%27", "'"), "model.optimizer.lr=0.0012345678901234"]
    cfg = compose("train", got)
    assert cfg.model.optimizer.lr == 0.0012345678901234 and cfg.data.batch_size == 32
    assert cfg.callbacks.ema.decay == 0.999 and cfg.data.label_list == "it's.txt" and cfg.test is False


def test_order_is_explicit():
    ordered = JOBS["ordered"]
    # Hydra applies overrides in order: the toolkit's order (by name, were each its own hyperparameter)
    # deletes the new lr_monitor, and the EMA's decay before the EMA doesn't compose
    assert "lr_monitor" not in compose("train", [ordered[3], ordered[2], ordered[0], ordered[1]]).callbacks
    assert compose("train", ordered).callbacks.lr_monitor.logging_interval == "step"
    with pytest.raises(ConfigCompositionException):
        compose("train", [ordered[1], ordered[0]])
    # tuned values come after the job's own overrides, by name
    assert decode_hyperparameters({"b": 0.5, "a": "=1", **encode_overrides(ordered)}) == [*ordered, "a=1", "b=0.5"]


def test_values_that_would_break_the_env_file_are_sent_without_a_quote():
    [value] = encode_overrides([o for job in JOBS.values() for o in job]).values()
    assert "'" not in value and value.isprintable() and value.isascii()
    assert encode_overrides(["+data.code='007'", "+data.apostrophe='it\\'s 100%'"]) == {
        "overrides": "+data.code=%27007%27 +data.apostrophe=%27it\\%27s%20100%25%27"}


@pytest.mark.parametrize(("encode", "bad", "match"), [
    (tuned_name, "hydra/launcher", "can't be a SageMaker hyperparameter name"),
    (tuned_name, "model@x", "can't be a SageMaker hyperparameter name"),
    (tuned_name, "overrides", "can't be a SageMaker hyperparameter name"),
    (tuned_name, "a_.b", "would come back as 'a._b'"),
    (tuned_name, "a" * 257, "at most 256"),
    (encode_overrides, ["data.label_list=" + "x" * 2500], "at most 2500"),
])
def test_what_sagemaker_cant_carry_is_refused_before_anything_is_sent(encode, bad, match):
    with pytest.raises(ValueError, match=match) as err:
        encode(bad)
    assert str(err.value).count("\n") == 0


def test_one_letter_names_from_the_toolkit():
    assert parse_argv(["-x", "0=1", "--a__b", "1=-2"]) == {"x": "0=1", "a__b": "1=-2"}
    with pytest.raises(ValueError, match="pairs"):
        parse_argv(["-xy", "1"])


def test_a_finished_tuning_trial_deletes_its_checkpoints(tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "hyperparameters.json").write_text('{"_tuning_objective_metric": "val/acc_best", "seed": "0=1"}')
    assert is_tuning_trial({"SM_INPUT_CONFIG_DIR": str(config)})
    assert not is_tuning_trial({"SM_INPUT_CONFIG_DIR": str(tmp_path / "training-job")})
    ckpts = tmp_path / "checkpoints"
    env = ContainerEnv.from_environ({"SM_CHECKPOINT_DIR": str(ckpts), "TRAINING_JOB_NAME": "tune-001"})
    (ckpts / "tune-000").mkdir(parents=True)
    env.checkpoint_dir.mkdir()
    (env.checkpoint_dir / "last.ckpt").write_bytes(b"x")
    assert not drop_trial_checkpoints(env, ["callbacks.model_checkpoint.dirpath=/mine"])  # the user's folder
    assert drop_trial_checkpoints(env, ["trainer.max_epochs=2"])
    assert sorted(p.name for p in ckpts.iterdir()) == ["tune-000"]  # another trial's are left alone
    assert not drop_trial_checkpoints(env, [])


def _distributions() -> dict[str, importlib.metadata.Distribution]:
    out: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions():
        out.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    return out


def _closure(names: set[str], dists: dict[str, importlib.metadata.Distribution]) -> set[str]:
    """``names`` and everything they require (no extras): what pip installs for them."""
    seen, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen or name not in dists:
            continue
        seen.add(name)
        for text in dists[name].requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def test_serving_requirements_are_what_the_handler_imports(tmp_path):
    """Import the handler where only the serving image's packages (torch, torchvision, the inference
    toolkit) and ``code/requirements.txt``'s, each with what it requires, are installed: a
    ``site-packages`` of links to those distributions' files only, ``python -S``. Hydra, Lightning,
    Optuna, TensorBoard, matplotlib, rich... are not there."""
    listed = {canonicalize_name(Requirement(line).name) for line in serving_requirements().splitlines()
              if line and not line.startswith("#")}
    dists = _distributions()
    image = {"torch", "torchvision", "sagemaker-inference"}
    installed = _closure(image | listed, dists)
    assert not installed & {"lightning", "hydra-core", "omegaconf", "optuna", "tensorboard", "matplotlib", "rich"}
    owners: dict[str, set[str]] = {}
    for name, dist in dists.items():
        for file in dist.files or []:
            if file.parts[0] != "..":
                owners.setdefault(file.parts[0], set()).add(name)
    site = tmp_path / "site-packages"
    site.mkdir()
    site_packages = Path(importlib.util.find_spec("torch").submodule_search_locations[0]).parent
    for entry in site_packages.iterdir():
        if owners.get(entry.name, set()) & installed:
            (site / entry.name).symlink_to(entry)
    code = ("import json, sys; import bincount.serve.inference; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names))))")
    proc = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": f"{site}:{REPO / 'src'}",
                          "PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = json.loads(proc.stdout)
    by_module = importlib.metadata.packages_distributions()
    imported = {canonicalize_name(d) for m in modules for d in by_module.get(m, [])}
    declared = {canonicalize_name(Requirement(r).name) for r in importlib.metadata.requires("bincount")
                if Requirement(r).marker is None}
    assert imported & declared - {"torch", "torchvision"} == listed


@pytest.mark.slow
@pytest.mark.integration
def test_a_tuning_trial_trains_exports_and_leaves_only_unfinished_trials_checkpoints(tmp_path, fake_abid, monkeypatch):
    from sagemaker_launch import entry
    from tests.conftest import FAST

    root, _ = fake_abid
    config, ckpts = tmp_path / "input" / "config", tmp_path / "checkpoints"
    environ = {"SM_MODEL_DIR": tmp_path / "model", "SM_OUTPUT_DATA_DIR": tmp_path / "output" / "data",
               "SM_CHECKPOINT_DIR": ckpts, "SM_CHANNEL_TRAIN": root, "SM_INPUT_DIR": tmp_path / "input",
               "SM_INPUT_CONFIG_DIR": config, "TRAINING_JOB_NAME": "bincount-tune-002-1a2b3c4d"}
    for key, value in environ.items():
        monkeypatch.setenv(key, str(value))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "SM_HPS"):
        monkeypatch.delenv(key, raising=False)
    config.mkdir(parents=True)
    hps = encode_overrides([*FAST, "callbacks.rich_model_summary=null", "trainer.max_epochs=1"])
    (config / "hyperparameters.json").write_text(json.dumps(
        {**hps, "model__optimizer__lr": "0.002", "_tuning_objective_metric": "val/acc_best",
         "sagemaker_program": "sagemaker_launch/entry.py"}))
    running = ckpts / "bincount-tune-001-9f8e7d6c"  # another trial's, copied in from the shared URI
    running.mkdir(parents=True)
    (running / "last.ckpt").write_bytes(b"not this trial's")

    metrics = entry.main([])

    assert "test/acc" in metrics and (tmp_path / "model" / "model.pt").is_file()
    assert sorted(p.name for p in ckpts.iterdir()) == [running.name]  # its own deleted, the other's kept
