import socket

import pytest
import torch
import torchvision

from bincount.models import backbones
from bincount.models.backbones import WeightsUnavailableError, build_backbone
from bincount.models.export import load_model_dir, save_model_dir
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
    save_model_dir(model.net, tmp_path, arch="resnet18", min_count=0, max_count=5,
                   preset={"image_size": 32, "mean": [0, 0, 0], "std": [1, 1, 1]})
    net, config = load_model_dir(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(net(x), model(x), atol=1e-5)
    assert config["num_classes"] == 6 and config["preset"]["image_size"] == 32
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        load_model_dir(tmp_path / "missing")
