"""The counting-quality options: soft ordinal labels, median decoding, flip TTA, EMA, one-cycle,
image cache, balanced sampling, the per-image split, and the recipe comparison's report."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from bincount.config import compose
from bincount.data.abid import BinRecord
from bincount.data.datamodule import ABIDDataModule
from bincount.data.dataset import BinImageDataset
from bincount.data.splits import block_split, per_image_split
from bincount.data.transforms import CountingPresetEval
from bincount.models.decoding import FlipTTA, decode_counts, with_tta
from bincount.models.module import BinCountModule, soft_count_targets
from bincount.models.export import load_model_dir
from bincount.serve.model import CountingModel, make_predictions

REPO = Path(__file__).resolve().parents[1]


def test_soft_targets_peak_at_the_count_and_spread_symmetrically():
    targets = torch.tensor([0, 2, 4])
    soft = soft_count_targets(targets, 5, sigma=1.0)
    assert torch.allclose(soft.sum(dim=1), torch.ones(3))
    assert soft.argmax(dim=1).tolist() == [0, 2, 4]
    assert soft[1, 1] == pytest.approx(soft[1, 3].item()) and soft[1, 1] > soft[1, 0]
    sharp = soft_count_targets(targets, 5, sigma=0.3)
    assert (sharp.max(dim=1).values > soft.max(dim=1).values).all()


def test_median_decoding_differs_from_argmax_and_minimises_expected_absolute_error():
    probs = torch.tensor([[0.45, 0.0, 0.0, 0.15, 0.40]])
    assert decode_counts(probs, "argmax")[1].tolist() == [0]
    confidence, index = decode_counts(probs, "median")
    assert index.tolist() == [3] and confidence.tolist() == pytest.approx([0.15])

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(500, 5, generator=g) ** 3  # peaked, often bimodal distributions
    probs = probs / probs.sum(dim=1, keepdim=True)
    k = torch.arange(5.0)

    def expected_abs_error(index):
        return (probs * (k[None, :] - index[:, None].float()).abs()).sum(dim=1)

    median_err = expected_abs_error(decode_counts(probs, "median")[1])
    argmax_err = expected_abs_error(decode_counts(probs, "argmax")[1])
    assert (median_err <= argmax_err + 1e-6).all() and median_err.mean() < argmax_err.mean()
    with pytest.raises(ValueError, match="unknown decode rule"):
        decode_counts(probs, "mode")


def test_flip_tta_answers_the_same_for_a_photo_and_its_flips():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
    x = torch.randn(2, 3, 8, 8)
    tta = with_tta(net, "flips")
    assert isinstance(tta, FlipTTA) and with_tta(net, "none") is net
    with torch.no_grad():
        out = tta(x)
        assert out.shape == (2, 5)
        for flipped in (x.flip(-1), x.flip(-2), x.flip(-1, -2)):
            assert torch.allclose(tta(flipped), out, atol=1e-5)
        assert not torch.allclose(net(x.flip(-1)), net(x), atol=1e-5)  # the bare net is not invariant


def test_unknown_options_fail_at_construction():
    for kwargs in ({"loss": "mse"}, {"decode": "mode"}, {"tta": "rot"}, {"scheduler_interval": "batch"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            BinCountModule(**kwargs)
    with pytest.raises(ValueError, match="label_sigma"):
        BinCountModule(loss="soft_ce", label_smoothing=0.1)


def _records(n_blocks: int = 30) -> list[BinRecord]:
    return [BinRecord(f"{i:05d}", 1 + (i * 7 // 3) % 5) for i in range(n_blocks * 20)]


def test_per_image_split_keeps_the_block_test_set_and_mixes_blocks_across_train_and_val():
    records = _records()
    kw = {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0, "block_size": 20}
    blocks, per_image = block_split(records, **kw), per_image_split(records, **kw)
    assert per_image["test"] == blocks["test"]
    assert {r.image_id for r in per_image["train"] + per_image["val"]} == {
        r.image_id for r in blocks["train"] + blocks["val"]}
    assert len(per_image["val"]) == len(blocks["val"])
    block_of = lambda recs: {int(r.image_id) // 20 for r in recs}  # noqa: E731
    assert not block_of(blocks["train"]) & block_of(blocks["val"])
    assert block_of(per_image["train"]) & block_of(per_image["val"])  # the leak this split exists to show


def test_cached_photos_match_decoding_every_time_and_bad_photos_stay_skipped(fake_abid):
    root, info = fake_abid
    dm = ABIDDataModule(str(root), image_size=32, num_workers=0, block_size=2, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    records = dm.splits["train"] + [BinRecord("90003", 2)]  # not a JPEG
    assert info["bad"]["90003"] == "not a JPEG"
    preset = CountingPresetEval(image_size=32)
    plain = BinImageDataset(root, records, min_count=1, transform=preset)
    cached = BinImageDataset(root, records, min_count=1, transform=preset, cache_size=32)
    for i in range(len(records)):
        a, b = plain[i], cached[i]
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a[0], b[0]) and a[1:] == b[1:]
    assert plain[len(records) - 1] is None and cached[len(records) - 1] is None


def test_balanced_sampling_draws_every_count_about_equally(fake_abid):
    root, _ = fake_abid
    dm = ABIDDataModule(str(root), image_size=32, num_workers=0, block_size=2, val_fraction=0.2,
                        test_fraction=0.2, balance=True, batch_size=4)
    dm.setup()
    skewed = [r for r in dm.splits["train"] if r.expected_quantity != 1] + [
        r for r in dm.splits["train"] if r.expected_quantity == 1][:1]
    dm.datasets["train"].records = skewed
    torch.manual_seed(0)
    drawn = Counter()
    for _ in range(200):
        drawn.update(skewed[i].expected_quantity for i in dm.train_dataloader().sampler)
    shares = [n / sum(drawn.values()) for n in drawn.values()]
    assert len(drawn) == 5 and max(shares) - min(shares) < 0.05


def test_training_with_every_option_exports_what_serving_answers_with(trained_run):
    cfg, _ = trained_run
    out = Path(cfg.paths.output_dir)
    report = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "model" / "model_config.json").read_text())
    assert report["decode"] == config["decode"] == "median" and config["tta"] == "flips"
    ckpt = torch.load(next((out / "checkpoints").glob("epoch_*.ckpt")), map_location="cpu", weights_only=False)
    assert "current_model_state" in ckpt  # EMA: the checkpoint's state_dict is the average

    model = CountingModel.load(out / "model", device="cpu")
    net, _ = load_model_dir(out / "model")
    x = torch.randn(3, 3, model.preset.image_size, model.preset.image_size)
    with torch.no_grad():
        flipped, plain = FlipTTA(net)(x), net(x)
    [served] = model.session.run(["logits"], {"images": x.numpy()})  # the averaged flips, not the photo alone
    assert (torch.from_numpy(served) - flipped).abs().max() < 1e-4 < (torch.from_numpy(served) - plain).abs().max()
    probs = torch.tensor([[0.45, 0.0, 0.0, 0.15, 0.40]])
    assert make_predictions(probs, [None], model)[0]["count"] == model.card.min_count + 3  # the median, not argmax

    # the exported model's test predictions, decoded by the median, are what the report counted
    rows = (out / "predictions.csv").read_text().splitlines()[1:]
    for row in rows:
        _, _, predicted, *p = row.split(",")
        probs = torch.tensor([[float(x) for x in p]])
        assert int(predicted) == model.card.min_count + int(decode_counts(probs, "median")[1])


def _load_recipe_compare():
    spec = importlib.util.spec_from_file_location("recipe_compare", REPO / "benchmarks" / "recipe_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_recipe_composes_into_a_training_config():
    rc = _load_recipe_compare()
    recipes = rc.load_recipes()
    assert {"udacity_capstone", "quickstart"} <= set(recipes)
    for name, recipe in recipes.items():
        cfg = compose("train", [*recipe["overrides"], "data.root=x"])  # a misspelt key raises here
        assert cfg.model.arch == "resnet18", name
    assert compose("train", recipes["quickstart_pretrained"]["overrides"]).model.weights == "IMAGENET1K_V1"


@pytest.mark.slow
def test_a_failed_run_names_its_error(tmp_path):
    rc = _load_recipe_compare()
    with pytest.raises(RuntimeError, match=r"(?s)failed.*model\.no_such_key"):
        rc.run_one("typo", ["model.no_such_key=1"], 0, str(tmp_path), 0.1, tmp_path)


@pytest.mark.slow
def test_recipe_compare_runs_a_recipe_and_reports_it_against_the_reference(fake_abid, tmp_path):
    rc = _load_recipe_compare()
    root, _ = fake_abid
    fast = ["trainer.accelerator=cpu", "data.num_workers=0", "data.image_size=32", "data.batch_size=8",
            "data.val_fraction=0.2", "data.test_fraction=0.2", "data.block_size=2", "trainer.max_epochs=1",
            "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null", "logger.tensorboard=null"]
    results = [rc.run_one("tiny", [*fast, "model.decode=median"], seed, str(root), 0.5, tmp_path) for seed in (0, 1)]
    for r in results:
        assert r["test"]["decode"] == "median" and r["val"]["epochs_run"] == 1 and r["wall_min"] > 0
    ref = [{**r, "recipe": "ref", "test": {**r["test"], "acc": r["test"]["acc"] - 0.5, "mae": r["test"]["mae"] + 1}}
           for r in results]
    text = rc.summarise(ref + results, "ref")
    assert "| tiny | 2 |" in text and "| ref | 2 |" in text
    assert "acc +0.500" in text and "MAE -1.000" in text
    rc.plot(ref + results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
