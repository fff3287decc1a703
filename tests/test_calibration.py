import json
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from torch import nn

from bincount.models.calibration import (
    NEVER,
    calibrate,
    choose_review_threshold,
    expected_calibration_error,
    fit_temperature,
    held_out_report,
)
from bincount.models.module import BinCountModule
from bincount.serve.model import CountingModel


def sample_labels(logits: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Labels drawn from ``softmax(logits)``: those logits are calibrated by construction."""
    return torch.multinomial(logits.softmax(dim=1), 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)


def test_fit_temperature_recovers_the_temperature_that_made_the_logits_overconfident():
    torch.manual_seed(0)
    z = 2 * torch.randn(8000, 5)
    y = sample_labels(z)
    assert fit_temperature(2.5 * z, y) == pytest.approx(2.5, rel=0.06)
    assert fit_temperature(0.5 * z, y) == pytest.approx(0.5, rel=0.06)
    with pytest.raises(ValueError, match="zero samples"):
        fit_temperature(torch.empty(0, 5), torch.empty(0, dtype=torch.long))


def test_ece_is_the_bin_weighted_confidence_accuracy_gap():
    # 4 photos, 2 bins: confidences 0.9, 0.9 (both right) and 0.6, 0.6 (one right)
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    targets = torch.tensor([0, 1, 0, 0])
    # bin (0.5, 1.0]: all four, mean confidence 0.75, accuracy 0.75 -> gap 0
    assert expected_calibration_error(probs, targets, n_bins=2) == pytest.approx(0.0, abs=1e-6)
    # 10 bins: bin 0.9 holds 2 (conf 0.9, acc 1.0), bin 0.6 holds 2 (conf 0.6, acc 0.5)
    assert expected_calibration_error(probs, targets, n_bins=10) == pytest.approx(0.5 * 0.1 + 0.5 * 0.1, abs=1e-6)


@pytest.mark.parametrize(
    ("target", "threshold"),
    [(1.0, 0.8), (0.75, 0.6), (0.6, 0.5), (0.5, 0.5)],
)
def test_review_threshold_is_the_lowest_meeting_the_precision(target, threshold):
    confidence = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = torch.tensor([True, True, False, True, False])
    # precision of answers at or above each threshold: 1, 1, 2/3, 3/4, 3/5
    assert choose_review_threshold(confidence, correct, target, min_support=1) == pytest.approx(threshold)


def test_review_threshold_needs_enough_answered_photos():
    confidence = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = torch.tensor([True, True, False, True, False])
    # 100% precision holds on the top 2 photos only
    assert choose_review_threshold(confidence, correct, 1.0, min_support=2) == pytest.approx(0.8)
    assert choose_review_threshold(confidence, correct, 1.0, min_support=3) == NEVER
    # 75% holds on 4 photos
    assert choose_review_threshold(confidence, correct, 0.75, min_support=4) == pytest.approx(0.6)
    assert choose_review_threshold(confidence, correct, 0.75, min_support=5) == NEVER
    assert choose_review_threshold(confidence, torch.ones(5, dtype=torch.bool), 0.9, min_support=6) == NEVER


def test_review_threshold_edge_cases():
    confidence = torch.tensor([0.9, 0.4])
    assert choose_review_threshold(confidence, torch.tensor([False, False]), 0.5, min_support=1) == NEVER > 1.0
    assert choose_review_threshold(confidence, torch.tensor([True, True]), 0.99, min_support=1) == pytest.approx(0.4)
    # the only right answer is the least confident one: 50% is the best reachable precision
    assert choose_review_threshold(confidence, torch.tensor([False, True]), 0.9, min_support=1) == NEVER
    with pytest.raises(ValueError, match="target_precision"):
        choose_review_threshold(confidence, torch.tensor([True, True]), 0.0)


class Overconfident(nn.Module):
    """A fixed linear 'network' whose logits are 3x the calibrated ones."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(3 * weight)

    def forward(self, x):
        return self.fc(x)


def test_calibrate_lowers_ece_keeps_predictions_and_gives_a_json_entry():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 8, generator=g)
    x = torch.randn(4000, 8, generator=g)
    y = sample_labels(x @ weight.T, seed=2)
    net = Overconfident(weight).eval()
    with torch.no_grad():
        logits = net(x)

    out = calibrate(logits, y, target_precision=0.9)

    assert json.loads(json.dumps(out)) == out
    assert out["n"] == 4000 and out["target_precision"] == 0.9
    assert out["temperature"] == pytest.approx(3.0, rel=0.1)
    assert out["ece_after"] < 0.03 < 0.1 < out["ece_before"]
    # coverage and precision are those of the answers at or above the threshold
    with torch.no_grad():
        conf = (net(x) / out["temperature"]).softmax(1).max(1)
    right = conf.indices == y
    answered = conf.values >= out["review_threshold"]
    assert 0 < answered.sum() < 4000
    assert out["coverage"] == pytest.approx(answered.float().mean().item())
    assert out["precision"] == pytest.approx(right[answered].float().mean().item()) and out["precision"] >= 0.9
    # the threshold is the lowest with that precision: one step lower would miss it
    below = conf.values[conf.values < out["review_threshold"]].max()
    assert right[conf.values >= below].float().mean() < 0.9


def test_calibrate_needs_photos():
    with pytest.raises(ValueError, match="yielded none"):
        calibrate(torch.empty(0, 5), torch.empty(0, dtype=torch.long))


def test_held_out_report_rebuilds_logits_from_probabilities():
    torch.manual_seed(3)
    z = 3 * torch.randn(500, 5)
    y = sample_labels(z / 3, seed=4)
    cal = {"temperature": 3.0, "review_threshold": 0.6, "target_precision": 0.9}
    out = held_out_report(z.softmax(1), y, cal)
    direct = (z / 3).softmax(1)
    assert out["ece_after"] == pytest.approx(expected_calibration_error(direct, y), abs=1e-5)
    assert out["ece_before"] == pytest.approx(expected_calibration_error(z.softmax(1), y), abs=1e-6)
    confident = direct.max(1).values >= 0.6
    assert out["review_coverage"] == pytest.approx(confident.float().mean().item())
    assert out["review_precision"] == pytest.approx((direct.argmax(1) == y)[confident].float().mean().item())


def test_train_stores_calibration_for_serving(trained_run):
    cfg, _ = trained_run
    run = Path(cfg.paths.output_dir)
    config = json.loads((run / "model" / "model_config.json").read_text())
    cal = config["calibration"]
    assert {"temperature", "review_threshold", "target_precision", "ece_before", "ece_after"} <= cal.keys()
    # it is the calibration of the exported weights on the validation photos
    model = BinCountModule.load_from_checkpoint(run / "checkpoints" / config["checkpoint"], map_location="cpu")
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    val = model.gather_rows(trainer.predict(model, datamodule.val_dataloader()), "logits")
    assert cal["n"] == len(val["target"]) > 0
    again = calibrate(val["logits"], val["target"], decode=model.hparams.decode)
    assert again.keys() == cal.keys()
    for key, value in cal.items():
        assert again[key] == (value if value is None else pytest.approx(value, rel=1e-3, abs=1e-5)), key
    report = json.loads((run / "metrics.json").read_text())
    assert {"ece_before", "ece_after", "review_coverage", "review_precision"} <= report.keys()
    assert report["temperature"] == cal["temperature"]
    served = CountingModel.load(run / "model", device="cpu")
    assert served.temperature == cal["temperature"] and served.review_threshold == cal["review_threshold"]
