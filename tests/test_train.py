import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from bincount.data.abid import IMAGE_DIR
from bincount.data.decode import decode_rgb_file
from bincount.data.transforms import CountingPresetEval
from bincount.evaluate import evaluate, load_for_eval
from bincount.models.backbones import build_backbone
from bincount.models.card import EvalPreset, ModelCard
from bincount.models.decoding import decode_counts, with_tta
from bincount.models.export import load_model_dir, save_model_dir
from bincount.models.module import BinCountModule
from bincount.serve.model import CountingModel, forward, preprocess
from bincount.train import train
from bincount.config import compose
from tests.fakes import FAST, set_output_dir

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"acc", "obo_acc", "mae", "rmse", "n", "per_class_acc", "confusion_matrix",
               "baseline_majority_acc", "baseline_majority_mae"}


def test_hparams_search_composes_an_optuna_sweep_over_the_optimizer():
    cfg = compose("train", ["hparams_search=lr_optuna", "+experiment=quickstart"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert (cfg.optimized_metric, sweeper.direction) == ("val/mae_best", "minimize")
    assert set(sweeper.params) == {"model.optimizer.lr", "model.optimizer.weight_decay"}
    for key in sweeper.params:  # every searched key is a key of the training config
        assert OmegaConf.select(cfg, key) is not None, key


def test_the_local_sweep_keeps_the_trial_with_the_lowest_val_mae():
    """What the Optuna sweeper does with ``hparams_search=lr_optuna``: its own direction handling
    makes the study, and each trial's value is what ``main()`` returns (``optimized_metric``)."""
    import optuna
    from hydra.utils import instantiate
    cfg = compose("train", ["hparams_search=lr_optuna", "+experiment=quickstart"], return_hydra_config=True)
    assert cfg.optimized_metric == "val/mae_best"
    sweeper = instantiate(cfg.hydra.sweeper).sweeper  # hydra-optuna-sweeper's OptunaSweeperImpl
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=sweeper._get_directions())
    for mae in (0.8, 0.3, 0.5):
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=mae))
    assert study.best_value == 0.3


def test_misspelt_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose("train", ["data.rooot=x"])
    with pytest.raises(ConfigCompositionException):
        compose("train", ["+experiment=quickstrat"])


def test_train_writes_the_run_folder(trained_run):
    cfg, metrics = trained_run
    run = Path(cfg.paths.output_dir)
    for name in ("config.yaml", "metrics.json", "predictions.csv", "confusion_matrix.png",
                 "checkpoints/last.ckpt", "model/model.pt", "model/model_config.json", "csv/version_0/metrics.csv"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    report = json.loads((run / "metrics.json").read_text())
    assert METRIC_KEYS <= report.keys()
    # what main() returns to a sweep (hparams_search=lr_optuna): the lowest val/mae of the epochs
    objective = compose("train", ["hparams_search=lr_optuna"]).optimized_metric
    val_mae = [float(r["val/mae"]) for r in csv.DictReader((run / "csv/version_0/metrics.csv").open()) if r["val/mae"]]
    assert len(val_mae) == 2 and metrics[objective] == pytest.approx(min(val_mae), abs=1e-6)
    assert report["acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    rows = list(csv.DictReader((run / "predictions.csv").open()))
    assert len(rows) == report["n"] == sum(map(sum, report["confusion_matrix"]))
    assert list(rows[0]) == ["image_id", "expected_quantity", "predicted", "prob_1", "prob_2", "prob_3", "prob_4", "prob_5"]
    assert sum(float(rows[0][f"prob_{k}"]) for k in range(1, 6)) == pytest.approx(1, abs=1e-3)
    # the logged test MAE is the mean miscount of the photos in predictions.csv
    miscount = [abs(int(r["predicted"]) - int(r["expected_quantity"])) for r in rows]
    assert metrics["test/mae"] == pytest.approx(sum(miscount) / len(rows), abs=1e-6)


def test_test_and_export_use_the_validated_average_and_eval_reproduces_the_run(trained_run, tmp_path):
    """With EMA, the checkpoint's ``state_dict`` is the average that validation scored: the test,
    ``model/`` and ``eval.py`` (from ``model/`` or from the checkpoint) all use it, photo by photo."""
    cfg, _ = trained_run
    run = Path(cfg.paths.output_dir)
    config = json.loads((run / "model" / "model_config.json").read_text())
    ckpt = torch.load(run / "checkpoints" / config["checkpoint"], map_location="cpu", weights_only=False)
    exported = torch.load(run / "model" / "model.pt", weights_only=True)
    averaged = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    raw = {k.removeprefix("net."): v for k, v in ckpt["current_model_state"].items() if k.startswith("net.")}
    assert exported.keys() == averaged.keys()
    assert all(torch.equal(exported[k], averaged[k]) for k in exported)
    assert not all(torch.equal(exported[k], raw[k]) for k in exported)  # the average is not the raw weights

    report = json.loads((run / "metrics.json").read_text())
    for name, source in (("from_model_dir", f"model_dir={run / 'model'}"),
                         ("from_checkpoint", f"ckpt_path={run / 'checkpoints' / config['checkpoint']}")):
        eval_cfg = compose("eval", [f"data.root={cfg.data.root}", *FAST, "data.split=block", source])
        again = evaluate(set_output_dir(eval_cfg, tmp_path / name))
        assert (again["acc"], again["mae"], again["confusion_matrix"]) == (
            report["acc"], report["mae"], report["confusion_matrix"]), name
        assert (tmp_path / name / "predictions.csv").read_text() == (run / "predictions.csv").read_text(), name


def test_eval_all_from_checkpoint_and_load_without_hydra(trained_run, tmp_path, fake_abid):
    root, made = fake_abid
    cfg, _ = trained_run
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    model = BinCountModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert model.hparams.arch == "resnet18" and model.num_classes == 5
    eval_cfg = compose("eval", [f"data.root={root}", *FAST, f"ckpt_path={ckpt}"])
    set_output_dir(eval_cfg, tmp_path / "eval")
    report = evaluate(eval_cfg)
    assert report["n"] == len(made["good"])
    neither = compose("eval", [f"data.root={root}"])
    with pytest.raises(ValueError, match="exactly one"):
        evaluate(set_output_dir(neither, tmp_path / "e2"))


def test_eval_feeds_the_net_what_the_model_card_says_as_serving_does(fake_abid, tmp_path):
    """The card's whole preset (size and normalisation), not the data config's, prepares eval.py's photos."""
    root, _ = fake_abid
    card = ModelCard(arch="resnet18", min_count=1, max_count=5,
                     preset=EvalPreset(image_size=24, mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7)))
    save_model_dir(build_backbone("resnet18", card.num_classes), tmp_path / "model", card)
    _, datamodule = load_for_eval(compose("eval", [f"data.root={root}", *FAST, f"model_dir={tmp_path / 'model'}"]))
    datamodule.setup("test")
    test = datamodule.datasets["test"]
    fed, _, index = next(sample for sample in test if sample is not None)
    photo = decode_rgb_file(root / IMAGE_DIR / f"{test.records[index].image_id}.jpg")
    assert torch.equal(fed, card.preset.build()(photo))  # what serving and predict feed the net
    assert not torch.allclose(fed, CountingPresetEval(image_size=24)(photo))  # the default normalisation differs


@pytest.mark.slow
def test_resume_from_last_continues_the_step_count(train_cfg, tmp_path):
    out = tmp_path / "run"
    train(train_cfg("trainer.max_epochs=1", "test=false", out=out))
    first = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    train(train_cfg("trainer.max_epochs=2", "ckpt_path=last", "test=false", out=out))
    second = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert second["global_step"] == 2 * first["global_step"] > 0
    logged = [[row["epoch"] for row in csv.DictReader((out / "csv" / v / "metrics.csv").open()) if row.get("train/loss_epoch")]
              for v in ("version_0", "version_1")]
    assert logged == [["0"], ["1"]]  # the first run's log is kept, the second starts at epoch 1


@pytest.mark.slow
def test_cli_typo_fails_before_training():
    bad = subprocess.run([sys.executable, "train.py", "trainer.max_epochs=1", "data.batchsize=4"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "batchsize" in bad.stderr


@pytest.mark.integration
@pytest.mark.skipif(not (REPO.parent / "shared" / "abid").is_dir(), reason="../shared/abid not present")
def test_the_smoke_run_on_real_abid_photos_from_the_command_line(tmp_path):
    """``python train.py +experiment=smoke`` (cut to one epoch here) trains, tests the whole test
    split, calibrates and exports, as the quickstart does."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "+experiment=smoke", f"data.root={REPO.parent / 'shared' / 'abid'}",
                           "trainer.max_epochs=1", "data.cache_images=false", "callbacks.rich_progress_bar=null",
                           f"hydra.run.dir={run}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "model" / "model.pt").is_file() and (run / "model" / "model_config.json").is_file()
    report = json.loads((run / "metrics.json").read_text())
    assert report["n"] > 200  # the whole block-split test set of the real sample
    # the reported accuracy and the majority baseline are those of the photos in predictions.csv
    rows = list(csv.DictReader((run / "predictions.csv").open()))
    assert len(rows) == report["n"]
    right = sum(int(r["predicted"]) == int(r["expected_quantity"]) for r in rows)
    assert report["acc"] == pytest.approx(right / len(rows), abs=1e-6)
    counts = Counter(int(r["expected_quantity"]) for r in rows)
    assert counts[report["baseline_majority_count"]] == max(counts.values())
    assert report["baseline_majority_acc"] == pytest.approx(max(counts.values()) / len(rows))

    # serving's forward (ONNX Runtime, model.onnx) answers the test photos as the PyTorch model does
    model = CountingModel.load(run / "model", device="cpu")
    net, card = load_model_dir(run / "model")
    photos = [decode_rgb_file(REPO.parent / "shared" / "abid" / IMAGE_DIR / f"{r['image_id']}.jpg") for r in rows]
    x = preprocess(model, photos)
    with torch.no_grad():
        expected = (with_tta(net, card.tta)(x) / model.temperature).softmax(dim=1)
    served = forward(model, x)
    assert torch.equal(decode_counts(served, card.decode)[1], decode_counts(expected, card.decode)[1])
    assert (served - expected).abs().max() <= 1e-4
