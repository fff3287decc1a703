import json
import socket

import pytest
import torch
import torchvision

from bincount.models import backbones
from bincount.models.backbones import WeightsUnavailableError, build_backbone
from bincount.models.card import EvalPreset, ModelCard
from bincount.models.decoding import NEVER
from bincount.models.export import ONNX_FILE, check_onnx, load_model_dir, read_model_card, save_model_dir
from bincount.models.module import BinCountModule
from bincount.report import count_report


def test_backbone_head_and_errors():
    net = build_backbone("resnet18", 6)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 6)
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("resnet19", 5)
    with pytest.raises(ValueError, match="no fc head"):
        build_backbone("mobilenet_v3_small", 5)
    with pytest.raises(ValueError, match="unknown weights"):
        build_backbone("resnet18", 5, weights="IMAGENET1K_V9")


def test_pretrained_weights_from_a_local_file(tmp_path):
    reference = torchvision.models.resnet18(num_classes=1000)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    net = build_backbone("resnet18", 5, weights="IMAGENET1K_V1", weights_path=str(tmp_path / "resnet18.pth"))
    assert torch.equal(net.conv1.weight, reference.conv1.weight)
    assert net.fc.out_features == 5


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """``TORCH_HOME`` in ``tmp_path``, and resnet18's weights URL on a port nothing listens on (refused, as offline)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setattr(type(weights), "url", property(lambda self: f"http://127.0.0.1:{port}/resnet18-f37072fd.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def test_pretrained_weights_offline_fail_fast_with_advice(offline_torch_home):
    tmp_path = offline_torch_home
    with pytest.raises(WeightsUnavailableError, match="model.weights_path=") as err:
        backbones.build_backbone("resnet18", 5, weights="IMAGENET1K_V1")
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in str(err.value)


def test_pretrained_weights_from_the_torch_hub_cache_need_no_network(offline_torch_home):
    cache = offline_torch_home / "hub" / "checkpoints"  # any download attempt would be refused
    cache.mkdir(parents=True)
    reference = torchvision.models.resnet18(num_classes=1000)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    net = backbones.build_backbone("resnet18", 5, weights="IMAGENET1K_V1")
    assert torch.equal(net.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert net.fc.out_features == 5


def test_count_report_by_hand():
    target = torch.tensor([0, 1, 2, 2, 4])
    preds = torch.tensor([0, 2, 2, 4, 1])
    probs = torch.nn.functional.one_hot(preds, 5).float()
    r = count_report(target, probs, min_count=1)
    assert r["acc"] == pytest.approx(2 / 5)
    assert r["obo_acc"] == pytest.approx(3 / 5)
    assert r["mae"] == pytest.approx((0 + 1 + 0 + 2 + 3) / 5)
    assert r["rmse"] == pytest.approx(((1 + 4 + 9) / 5) ** 0.5)
    assert r["per_class_acc"] == {"1": 1.0, "2": 0.0, "3": 0.5, "4": None, "5": 0.0}
    assert r["confusion_matrix"][2] == [0, 0, 1, 0, 1]
    assert r["baseline_majority_count"] == 3
    assert r["baseline_majority_acc"] == pytest.approx(2 / 5)
    assert r["baseline_majority_mae"] == pytest.approx((2 + 1 + 0 + 0 + 2) / 5)
    assert r["n"] == 5


def test_export_round_trip(tmp_path):
    model = BinCountModule(arch="resnet18", min_count=0, max_count=5).eval()
    card = ModelCard(arch="resnet18", min_count=0, max_count=5,
                     preset=EvalPreset(image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    save_model_dir(model.net, tmp_path, card)
    net, loaded = load_model_dir(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(net(x), model(x), atol=1e-5)
    assert loaded == card and loaded.num_classes == 6 and loaded.preset.image_size == 32
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        load_model_dir(tmp_path / "missing")
    # model.onnx is checked against the network it was exported from, and refused for another one
    other = BinCountModule(arch="resnet18", min_count=0, max_count=5).net.eval()
    onnx_model = (tmp_path / ONNX_FILE).read_bytes()
    assert check_onnx(onnx_model, model.net, card) <= 1e-4
    with pytest.raises(RuntimeError, match="the ONNX export disagrees with the PyTorch forward"):
        check_onnx(onnx_model, other, card)


# model_config.json as a quickstart run writes it (one epoch: an untrained model's calibration);
# num_classes, derived, comes last
RUN_CARD = {
    "arch": "resnet18", "min_count": 1, "max_count": 5,
    "preset": {"image_size": 112, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "bincount_version": "0.1.0", "decode": "median", "tta": "none", "checkpoint": "epoch_000.ckpt",
    "calibration": {"temperature": 2150.3848966957294, "review_threshold": 1.0000000000000002,
                    "target_precision": 0.95, "min_support": 30, "ece_before": 0.8148148059844971,
                    "ece_after": 0.04594673961400986, "coverage": 0.0, "precision": None, "n": 270},
    "num_classes": 5,
}


def test_a_run_card_loads_typed_and_is_written_back_unchanged(tmp_path):
    (tmp_path / "model_config.json").write_text(json.dumps({**RUN_CARD, "a_later_field": 1}, indent=2))
    (tmp_path / "model.pt").write_bytes(b"")  # read_model_card reads the card only
    card = read_model_card(tmp_path)
    assert (card.arch, card.min_count, card.max_count, card.num_classes) == ("resnet18", 1, 5, 5)
    assert (card.decode, card.tta, card.checkpoint, card.preset.image_size) == ("median", "none", "epoch_000.ckpt", 112)
    assert card.calibration.review_threshold == NEVER and card.calibration.precision is None
    written = card.model_dump(mode="json")
    assert written == RUN_CARD  # the unknown key is ignored; the rest round-trips exactly
    assert list(written) == list(RUN_CARD) and list(written["calibration"]) == list(RUN_CARD["calibration"])

    # a card from save_model_dir without decoding, TTA, checkpoint or calibration: their defaults
    bare = {k: RUN_CARD[k] for k in ("arch", "min_count", "max_count", "num_classes", "preset")}
    (tmp_path / "model_config.json").write_text(json.dumps(bare))
    card = read_model_card(tmp_path)
    assert (card.decode, card.tta, card.checkpoint, card.calibration) == ("argmax", "none", None, None)
