"""Tiny stand-ins for ABID data and an exported model, made inside a test (in the spirit of
Lightning's BoringModel), the real Hydra config settings for a small, fast CPU run, and a free port
for a test's server."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

from omegaconf import DictConfig, open_dict
import torch
from PIL import Image, ImageDraw
from torch import nn

from bincount.data.decode import decode_rgb_file
from bincount.data.transforms import CountingPresetEval
from bincount.models.backbones import build_backbone
from bincount.models.card import Calibration, EvalPreset, ModelCard
from bincount.models.export import load_model_dir, save_model_dir

# the tiny served model of make_model_dir
IMAGE_SIZE = 32
THRESHOLD = 0.75
MIN_COUNT, MAX_COUNT = 1, 5



def write_bin_photo(path: Path, count: int, *, size: int = 64, seed: int = 0) -> None:
    """A small JPEG of a grey bin with ``count`` coloured boxes in it."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (90, 90, 90))
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        x, y = rng.randrange(0, size - 12), rng.randrange(0, size - 12)
        draw.rectangle([x, y, x + 10, y + 10], fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=90)


def write_metadata(path: Path, count: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": count}))


def make_fake_abid(root: Path, n: int = 40, *, min_count: int = 1, max_count: int = 5, bad: bool = True) -> dict:
    """An ABID-layout folder with ``n`` good labelled photos (ids ``00001``...; counts cycle
    ``min_count..max_count``) and, when ``bad``, one of each kind of bad input.

    Returns:
        ``{"good": {id: count}, "bad": {id: reason}, "out_of_range": {id: count}}``.
    """
    good: dict[str, int] = {}
    for i in range(1, n + 1):
        image_id = f"{i:05d}"
        count = min_count + (i - 1) % (max_count - min_count + 1)
        write_bin_photo(root / "bin-images" / f"{image_id}.jpg", count, seed=i)
        write_metadata(root / "metadata" / f"{image_id}.json", count)
        good[image_id] = count
    out = {"good": good, "bad": {}, "out_of_range": {}}
    if not bad:
        return out
    images, meta = root / "bin-images", root / "metadata"
    # a photo whose count is outside the class range
    write_bin_photo(images / "90001.jpg", max_count + 3, seed=1)
    write_metadata(meta / "90001.json", max_count + 3)
    out["out_of_range"]["90001"] = max_count + 3
    # truncated JPEG (no end-of-image marker)
    write_bin_photo(images / "90002.jpg", 2, seed=2)
    data = (images / "90002.jpg").read_bytes()
    (images / "90002.jpg").write_bytes(data[: len(data) // 2])
    write_metadata(meta / "90002.json", 2)
    out["bad"]["90002"] = "truncated JPEG"
    # not an image at all
    (images / "90003.jpg").write_text("this is not a photo")
    write_metadata(meta / "90003.json", 2)
    out["bad"]["90003"] = "not a JPEG"
    # malformed metadata JSON
    write_bin_photo(images / "90004.jpg", 3, seed=4)
    (meta / "90004.json").write_text("{ not json")
    out["bad"]["90004"] = "malformed metadata"
    # non-integer count
    write_bin_photo(images / "90005.jpg", 3, seed=5)
    write_metadata(meta / "90005.json", 2.5)
    out["bad"]["90005"] = "malformed metadata"
    # no metadata file and no other label
    write_bin_photo(images / "90006.jpg", 3, seed=6)
    out["bad"]["90006"] = "no label"
    return out


def corrupt_middle(path: Path) -> None:
    """Overwrite the middle of a JPEG with junk, keeping its start and end markers (passes the
    cheap index check, fails at decode time)."""
    data = bytearray(path.read_bytes())
    data[4:-2] = b"\x00" * (len(data) - 6)
    path.write_bytes(bytes(data))


# small, fast, CPU-only and quiet: what every test run of train()/evaluate() uses
FAST = [
    "trainer.accelerator=cpu",
    "data.num_workers=0",
    "data.image_size=32",
    "data.batch_size=8",
    "data.val_fraction=0.2",
    "data.test_fraction=0.2",
    "data.block_size=2",
    "callbacks.rich_progress_bar=null",
]


def set_output_dir(cfg: DictConfig, out: Path) -> DictConfig:
    """``cfg`` with ``paths.output_dir`` (``${hydra:runtime.output_dir}`` outside ``@hydra.main``) set to ``out``."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg
def free_port() -> int:
    """A TCP port on the loopback interface that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model_dir(out: Path, photos: list[Path]) -> Path:
    """An exported ``model/`` folder: an untrained resnet18 (counts ``MIN_COUNT..MAX_COUNT``,
    ``IMAGE_SIZE`` pixels) whose head is centred on ``photos``' features, so its counts and
    confidences differ from photo to photo (a fresh head says the same count for all);
    calibrated with temperature 1 and review threshold :data:`THRESHOLD`."""
    torch.manual_seed(0)
    net = build_backbone("resnet18", MAX_COUNT - MIN_COUNT + 1).eval()
    preset = CountingPresetEval(image_size=IMAGE_SIZE)
    head, net.fc = net.fc, nn.Identity()
    with torch.no_grad():
        features = net(torch.stack([preset(decode_rgb_file(p)) for p in photos]))
        centre, spread = features.mean(0), features.std(0).mean()
        weight = 3 * torch.randn(head.out_features, head.in_features) / (spread * head.in_features**0.5)
        head.weight.copy_(weight)
        head.bias.copy_(-weight @ centre)
    net.fc = head
    return save_model_dir(net, out, ModelCard(arch="resnet18", min_count=MIN_COUNT, max_count=MAX_COUNT,
                                              preset=EvalPreset.of(preset),
                                              calibration=Calibration(temperature=1.0, review_threshold=THRESHOLD)))


def reference_probs(model_dir: Path, paths: list[Path], decoder: str = "torchvision") -> list[torch.Tensor]:
    """Calibrated probabilities ``(C,)`` of each photo, computed the way training evaluates: no serving code.

    Args:
        model_dir: An exported ``model/`` folder.
        paths: Photo files (``decoder="pil"`` for PNGs).
        decoder: See :func:`bincount.data.decode.decode_rgb_file`.
    """
    net, card = load_model_dir(model_dir)
    x = torch.stack([card.preset.build()(decode_rgb_file(p, decoder)) for p in paths])
    temperature = card.calibration.temperature if card.calibration else 1.0
    with torch.no_grad():
        return list((net(x) / temperature).softmax(1))


def write_run_report(run_dir: Path, *, wrong: int, n: int = 20, first_id: int = 1) -> dict:
    """A training run's folder as ``bincount.train`` leaves it for registration, from made-up test
    predictions written by the real report code: ``metrics.json`` (with the held-out calibration),
    ``predictions.csv``, ``config.yaml`` and ``model/model_config.json`` (no weights).

    Photos ``first_id..first_id+n-1`` (ids ``00001``...), true counts cycling ``MIN_COUNT..MAX_COUNT``;
    the first ``wrong`` of them are counted one off, so the MAE is ``wrong / n``.

    Returns:
        The metrics written to ``metrics.json``.
    """
    from omegaconf import OmegaConf

    from bincount.models.calibration import calibrate, held_out_report
    from bincount.report import write_report

    classes = MAX_COUNT - MIN_COUNT + 1
    target = torch.arange(n) % classes
    pred = target.clone()
    pred[:wrong] = torch.where(target[:wrong] < classes - 1, target[:wrong] + 1, target[:wrong] - 1)
    noise = torch.randn(n, classes, generator=torch.Generator().manual_seed(0))
    logits = 3 * nn.functional.one_hot(pred, classes).float() + 0.1 * noise
    held_out = held_out_report(logits.softmax(1), target, calibrate(logits, target, min_support=1))
    metrics = write_report(run_dir, [f"{first_id + i:05d}" for i in range(n)], target, logits.softmax(1),
                           min_count=MIN_COUNT, title="test split", extra=held_out)
    OmegaConf.save({"data": {"root": "s3://bincount-test/abid/subset", "split": "block", "test_fraction": 0.15,
                             "block_size": 20, "seed": 0, "label_list": None, "min_count": MIN_COUNT,
                             "max_count": MAX_COUNT}}, run_dir / "config.yaml")
    card = ModelCard(arch="resnet18", min_count=MIN_COUNT, max_count=MAX_COUNT, preset=EvalPreset(image_size=IMAGE_SIZE))
    (run_dir / "model").mkdir(exist_ok=True)
    (run_dir / "model" / "model_config.json").write_text(json.dumps(card.model_dump(mode="json")))
    return metrics


def model_archive(*names: str) -> bytes:
    """A ``model.tar.gz`` holding ``names`` (a few bytes each), packed as SageMaker packs ``$SM_MODEL_DIR``;
    by default what a complete export holds: ``model.onnx``, ``model.pt``, ``model_config.json``, ``code/inference.py``."""
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name in names or ("model.onnx", "model.pt", "model_config.json", "code/inference.py"):
            info = tarfile.TarInfo(name)
            info.size = len(data := name.encode())
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()
