import logging

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image

from bincount.config import compose
from bincount.data.abid import build_index
from bincount.data.datamodule import ABIDDataModule
from bincount.data.dataset import BinImageDataset, collate_skip_none
from bincount.data.decode import decode_rgb_bytes, decode_rgb_file
from bincount.data.splits import block_split
from bincount.data.transforms import CountingPresetEval, CountingPresetTrain
from bincount.models.card import EvalPreset
from tests.fakes import corrupt_middle, make_fake_abid


def test_decoders_agree(fake_abid):
    root, _ = fake_abid
    path = root / "bin-images" / "00001.jpg"
    tv, pil = decode_rgb_file(path, "torchvision"), decode_rgb_file(path, "pil")
    assert tv.shape == pil.shape == (3, 64, 64) and tv.dtype == pil.dtype == torch.uint8
    assert (tv.float() - pil.float()).abs().mean() < 2.0
    with pytest.raises(ValueError, match="unknown decoder"):
        decode_rgb_file(path, "opencv")
    with pytest.raises(ValueError, match="unknown decoder"):
        decode_rgb_bytes(path.read_bytes(), "opencv")


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_file_and_bytes_decode_a_known_photo_to_its_pixels(tmp_path, decoder):
    path = tmp_path / "red.jpg"
    Image.new("RGB", (48, 32), (200, 10, 30)).save(path, format="JPEG", quality=95)
    image = decode_rgb_file(path, decoder)
    assert image.shape == (3, 32, 48) and image.dtype == torch.uint8  # (channels, height, width)
    assert torch.equal(image, decode_rgb_bytes(path.read_bytes(), decoder))
    expected = torch.tensor([200, 10, 30]).view(3, 1, 1).expand(3, 32, 48)
    assert (image.int() - expected).abs().max() <= 3  # JPEG rounding of a flat colour


def test_decode_errors_name_the_file_and_the_reason_not_the_build_path(tmp_path):
    path = tmp_path / "half.jpg"
    Image.new("RGB", (64, 64), (90, 90, 90)).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError) as from_bytes:
        decode_rgb_bytes(path.read_bytes())
    with pytest.raises(ValueError) as from_file:
        decode_rgb_file(path)
    assert str(from_file.value) == f"{path}: {from_bytes.value}"
    assert str(from_bytes.value).startswith("cannot decode JPEG (") and ".cpp" not in str(from_bytes.value)
    with pytest.raises(ValueError, match="^cannot decode image"):
        decode_rgb_bytes(b"not a photo", "pil")


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_a_photo_too_small_to_show_a_bin_is_refused(tmp_path, decoder):
    path = tmp_path / "pixel.jpg"
    Image.new("RGB", (1, 1), (90, 90, 90)).save(path, format="JPEG")
    with pytest.raises(ValueError, match=rf"^{path}: photo is 1x1 pixels; a bin photo is at least 32 pixels"):
        decode_rgb_file(path, decoder)


def test_photo_that_fails_to_decode_is_skipped_not_fatal(tmp_path, caplog):
    make_fake_abid(tmp_path, n=4, bad=False)
    corrupt_middle(tmp_path / "bin-images" / "00002.jpg")
    records, _ = build_index(tmp_path, min_count=1, max_count=5)
    assert len(records) == 4  # the cheap check cannot see it; the decode can
    ds = BinImageDataset(tmp_path, records, min_count=1, transform=CountingPresetEval(image_size=16))
    with caplog.at_level(logging.WARNING, logger="bincount"):
        batch = collate_skip_none([ds[i] for i in range(4)])
    images, targets, indices = batch
    assert images.shape == (3, 3, 16, 16)
    assert indices.tolist() == [0, 2, 3]
    assert targets.tolist() == [records[i].expected_quantity - 1 for i in (0, 2, 3)]
    assert any("00002" in m for m in caplog.messages)
    assert collate_skip_none([None, None]) is None


def test_presets_shapes_and_eval_is_deterministic():
    img = torch.randint(0, 256, (3, 50, 80), dtype=torch.uint8)
    ev = CountingPresetEval(image_size=24)
    assert ev(img).shape == (3, 24, 24) and ev(img).dtype == torch.float32
    assert torch.equal(ev(img), ev(img))
    assert CountingPresetTrain(image_size=24)(img).shape == (3, 24, 24)
    card_entry = EvalPreset.of(ev)
    assert card_entry.model_dump(mode="json") == {"image_size": 24, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert torch.equal(card_entry.build()(img), ev(img))


def test_eval_preset_equals_torchvisions_compose_of_the_same_transforms():
    v2 = torchvision.transforms.v2
    img = torch.randint(0, 256, (3, 61, 97), dtype=torch.uint8)
    ev = CountingPresetEval(image_size=28)
    reference = v2.Compose([v2.ToImage(), v2.Resize((28, 28), antialias=True), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(mean=ev.mean, std=ev.std)])
    assert torch.equal(ev(img), reference(img))
    pil = v2.functional.to_pil_image(img)
    assert torch.equal(ev(pil), reference(pil)) and torch.equal(ev(pil), ev(img))


def test_datamodule_splits_and_batches(fake_abid):
    root, made = fake_abid
    dm = ABIDDataModule(str(root), image_size=32, batch_size=8, num_workers=0, block_size=2,
                        val_fraction=0.2, test_fraction=0.2)
    dm.setup("fit")
    records, _ = build_index(root, min_count=1, max_count=5)
    assert dm.splits == block_split(records, val_fraction=0.2, test_fraction=0.2, seed=0, block_size=2)
    assert sorted(r.image_id for recs in dm.splits.values() for r in recs) == sorted(made["good"])
    images, targets, indices = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32)
    assert targets.tolist() == [made["good"][dm.splits["train"][i].image_id] - 1 for i in indices.tolist()]
    images, targets, indices = next(iter(dm.test_dataloader()))  # not shuffled: the split's order
    assert indices.tolist() == list(range(len(indices)))
    assert targets.tolist() == [made["good"][r.image_id] - 1 for r in dm.splits["test"][: len(indices)]]

    everything = ABIDDataModule(str(root), split="all", image_size=32, num_workers=0)
    everything.setup("test")
    assert len(everything.splits["test"]) == len(made["good"])
    with pytest.raises(ValueError, match="empty"):
        everything.train_dataloader()
    with pytest.raises(ValueError, match="split="):
        ABIDDataModule(str(root), split="random")


def test_both_data_configs_extend_the_shared_base_and_keep_only_their_own_keys():
    folder = compose("train", ["data=abid"]).data
    stream = compose("train", ["data=abid_stream"]).data
    shared = {"_convert_": "all", "min_count": 1, "max_count": 5, "label_list": None, "split": "block",
              "image_size": 224, "batch_size": 32, "num_workers": 2, "decoder": "torchvision",
              "train_transform": {"hflip_prob": 0.5, "vflip_prob": 0.5, "rotation_degrees": 10.0, "min_scale": 0.9,
                                  "color_jitter": 0.2}}
    for cfg in (folder, stream):
        assert {k: OmegaConf.to_container(cfg)[k] for k in shared} == shared
    assert set(folder) - set(shared) == {"_target_", "root", "val_fraction", "test_fraction", "block_size", "seed",
                                         "cache_images", "balance"}
    assert set(stream) - set(shared) == {"_target_", "uri", "shuffle", "seed", "cache_dir", "max_cache_size",
                                         "max_pre_download", "endpoint_url"}
    crop = next(t for t in CountingPresetTrain(image_size=32, **folder.train_transform).transforms.transforms
                if isinstance(t, torchvision.transforms.v2.RandomResizedCrop))
    assert crop.scale == (0.9, 1.0) and crop.ratio == (0.9, 1.1)  # what the transforms docstring says
