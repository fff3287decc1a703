"""Streaming prepared shards into training: once per epoch, disjoint equal DDP shares, mid-epoch resume, S3.

Run as a module under torchrun, this file is also the 2-process DDP worker of
``test_real_ddp_ranks_get_disjoint_equal_shares``.
"""

import functools
import json
import logging
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from litdata import StreamingDataset

from bincount.config import compose
from bincount.data.prepare import prepare
from bincount.data.stream import ABIDStreamDataModule, ShardSample, allow_http_in_litdata
from bincount.models.module import BinCountModule
from tests.conftest import set_output_dir
from tests.conftest_s3 import DATA_BUCKET, free_ports
from tests.fakes import make_fake_abid

REPO = Path(__file__).resolve().parents[1]
SPLIT = {"val_fraction": 0.2, "test_fraction": 0.2, "block_size": 2, "seed": 0}
S3_URI = f"s3://{DATA_BUCKET}/stream-test/v1"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Local shards of 40 fake photos (24 train / 8 val / 8 test), ~2 photos per chunk."""
    base = tmp_path_factory.mktemp("stream")
    make_fake_abid(base / "abid", n=40, bad=False)
    manifest = prepare(base / "abid", str(base / "shards"), chunk_bytes="8KB", num_workers=2, start_method="fork",
                       eda=False, progress=False, **SPLIT)
    assert manifest["shards"]["train"]["chunks"] >= 4
    return str(base / "shards"), manifest


@pytest.fixture(scope="module")
def s3_shards(s3_server, shards, tmp_path_factory):
    """The same photos prepared straight into the local S3 server."""
    s3_server.empty_bucket(DATA_BUCKET, "stream-test/")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3_server.env().items():
            mp.setenv(name, value)
        abid = Path(shards[0]).parent / "abid"
        manifest = prepare(abid, S3_URI, chunk_bytes="8KB", num_workers=2, start_method="fork", eda=False,
                           progress=False, staging_dir=str(tmp_path_factory.mktemp("staging")), **SPLIT)
    assert manifest["splits"] == shards[1]["splits"]
    return S3_URI, manifest


def epoch_ids(dm: ABIDStreamDataModule, name: str, loader=None) -> list[str]:
    """Image ids of split ``name`` in the order its loader yields them; targets checked against the manifest."""
    ids = []
    for images, targets, indices in loader or getattr(dm, f"{name}_dataloader")():
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 16)
        for target, index in zip(targets.tolist(), indices.tolist()):
            record = dm.splits[name][index]
            assert target == record.expected_quantity - dm.hparams.min_count
            ids.append(record.image_id)
    return ids


def make_dm(uri, **kwargs) -> ABIDStreamDataModule:
    dm = ABIDStreamDataModule(uri, image_size=16, **{"batch_size": 4, "num_workers": 0, **kwargs})
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_photo_once_per_epoch_and_reshuffled(shards, num_workers):
    uri, manifest = shards
    dm = make_dm(uri, num_workers=num_workers)
    loader = dm.train_dataloader()
    epochs = [epoch_ids(dm, "train", loader) for _ in range(2)]
    for ids in epochs:
        assert Counter(ids) == Counter(manifest["splits"]["train"]["image_ids"])
    assert epochs[0] != epochs[1], "the training order must change between epochs"
    val = dm.val_dataloader()
    assert epoch_ids(dm, "val", val) == epoch_ids(dm, "val", val)
    assert sorted(epoch_ids(dm, "val", val)) == sorted(manifest["splits"]["val"]["image_ids"])
    assert sorted(epoch_ids(dm, "test")) == sorted(manifest["splits"]["test"]["image_ids"])
    assert dm.num_classes == 5 and dm.eval_preset.image_size == 16


def test_ranks_and_workers_share_an_epoch_disjointly_and_equally(shards, monkeypatch):
    """litdata takes the rank from GLOBAL_RANK when there is no process group (not from RANK)."""
    uri, manifest = shards
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        dm = make_dm(uri, batch_size=3, num_workers=2)
        per_rank.append({name: epoch_ids(dm, name) for name in ("train", "val")})
    for name in ("train", "val"):
        a, b = per_rank[0][name], per_rank[1][name]
        split = manifest["splits"][name]["image_ids"]
        assert len(a) == len(b) and len(set(a)) == len(a) and not set(a) & set(b)
        assert set(a) | set(b) <= set(split)
        assert len(split) - len(a) - len(b) < 2 * 3  # litdata's drop_last: < world_size * batch_size


def test_loader_state_dict_resumes_mid_epoch(shards):
    uri, manifest = shards
    dm = make_dm(uri, num_workers=2)
    loader = dm.train_dataloader()
    iterator = iter(loader)
    first = [dm.splits["train"][i].image_id for _ in range(3) for i in next(iterator)[2].tolist()]
    state = loader.state_dict()
    del iterator

    resumed_dm = make_dm(uri, num_workers=2)
    resumed = resumed_dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = [dm.splits["train"][i].image_id for batch in resumed for i in batch[2].tolist()]
    assert not set(first) & set(rest), "a photo was repeated after the resume"
    assert Counter(first + rest) == Counter(manifest["splits"]["train"]["image_ids"])


def test_undecodable_sample_is_skipped_with_a_warning(shards, caplog):
    uri, manifest = shards
    to_item = ShardSample(["a", "b"], min_count=1, transform=None)
    good = Path(uri).parent / "abid" / "bin-images" / "00003.jpg"
    image, target, index = to_item({"image_id": "b", "count": 3, "image": good.read_bytes()})
    assert image.shape == (3, 64, 64) and (target, index) == (2, 1)
    with caplog.at_level(logging.WARNING, logger="bincount"):
        assert to_item({"image_id": "a", "count": 1, "image": b"\xff\xd8 not a photo"}) is None
    assert any("a" in m and "decode" in m for m in caplog.messages)


def test_config_errors_are_clear(shards, tmp_path):
    uri, _ = shards
    with pytest.raises(ValueError, match="prepared for counts 1..5"):
        make_dm(uri, min_count=0)
    with pytest.raises(FileNotFoundError, match="bincount data prepare"):
        make_dm(str(tmp_path))
    with pytest.raises(ValueError, match="cache_dir is required"):
        ABIDStreamDataModule("s3://bucket/abid/v1")
    with pytest.raises(ValueError, match="split="):
        ABIDStreamDataModule(uri, split="all")
    cfg = compose("train", ["data=abid_stream", "data.uri=s3://b/p", "+experiment=resnet18_subset"])
    assert cfg.data.uri == "s3://b/p" and cfg.data._target_.endswith("ABIDStreamDataModule")


@pytest.mark.integration
def test_stream_from_s3_delivers_the_same_photos_as_local_shards(s3_shards, s3_env, tmp_path):
    uri, manifest = s3_shards
    for num_workers in (0, 2):
        dm = make_dm(uri, num_workers=num_workers, cache_dir=str(tmp_path / f"cache{num_workers}"))
        for name in ("train", "val", "test"):
            ids = epoch_ids(dm, name)
            assert Counter(ids) == Counter(manifest["splits"][name]["image_ids"]), (num_workers, name)
    assert list((tmp_path / "cache0").rglob("chunk-*.bin")), "chunks are cached under cache_dir"


@pytest.mark.integration
def test_litdata_http_endpoint_workaround_is_still_needed(s3_shards, s3_env, tmp_path):
    """Fails loudly if a litdata upgrade reads http endpoints on its own (drop the workaround then)."""
    from litdata.streaming import downloader

    uri, _ = s3_shards
    options = downloader._OBSTORE_CLIENT_OPTIONS
    saved = dict(options)
    options.pop("allow_http", None)
    try:
        bare = StreamingDataset(f"{uri}/train", cache_dir=str(tmp_path / "a"))
        with pytest.raises(Exception, match="builder error|BadScheme"):
            next(iter(bare))
    finally:
        options.clear()
        options.update(saved)
    assert allow_http_in_litdata() and options["allow_http"] == "true"
    assert next(iter(StreamingDataset(f"{uri}/train", cache_dir=str(tmp_path / "b"))))["image_id"]


@pytest.mark.integration
@pytest.mark.slow
def test_train_one_short_epoch_from_s3_shards(s3_shards, s3_env, tmp_path, caplog):
    from bincount.train import train

    uri, manifest = s3_shards
    cfg = compose("train", [
        "data=abid_stream", f"data.uri={uri}", f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=32",
        "data.batch_size=8", "data.num_workers=0", "trainer.accelerator=cpu", "trainer.max_epochs=1",
        "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null",
    ])
    with caplog.at_level("INFO"):
        metrics = train(set_output_dir(cfg, tmp_path / "run"))
    assert {"train/loss", "val/acc", "test/acc"} <= metrics.keys()
    # litdata's default cache budget is resolved (and logged) once, not by each split's dataset
    assert sum("max_cache_size is unset" in r.getMessage() for r in caplog.records) == 1
    predicted = (tmp_path / "run" / "predictions.csv").read_text().splitlines()[1:]
    assert sorted(line.split(",")[0] for line in predicted) == sorted(manifest["splits"]["test"]["image_ids"])
    assert (tmp_path / "run" / "model" / "model_config.json").is_file()


class RecordIds(L.Callback):
    """Records the image ids of every training and validation batch this rank sees."""

    def __init__(self, datamodule: ABIDStreamDataModule) -> None:
        self.datamodule = datamodule
        self.ids: dict[str, list[str]] = {"train": [], "val": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids["train"] += [self.datamodule.splits["train"][i].image_id for i in batch[2].tolist()]

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.ids["val"] += [self.datamodule.splits["val"][i].image_id for i in batch[2].tolist()]


def fit(uri: str, root_dir: Path, *, ckpt_path=None, callbacks=(), **trainer_kwargs):
    """A tiny ResNet-18 run on the shards; returns (trainer, recorder)."""
    dm = ABIDStreamDataModule(uri, image_size=32, batch_size=2, num_workers=2, cache_dir=str(root_dir / "cache"))
    model = BinCountModule(arch="resnet18", min_count=1, max_count=5,
                           optimizer=functools.partial(torch.optim.SGD, lr=0.01))
    recorder = RecordIds(dm)
    trainer = L.Trainer(accelerator="cpu", default_root_dir=root_dir, logger=False,
                        enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[recorder, *callbacks], **trainer_kwargs)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, recorder


@pytest.mark.slow
def test_lightning_checkpoint_resumes_mid_epoch_without_repeats(shards, tmp_path):
    """A checkpoint written after step 3 of an epoch resumes at step 4: nothing repeated, nothing skipped."""
    uri, manifest = shards
    every_3_steps = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}",
                                                        every_n_train_steps=3, save_top_k=-1)
    _, full = fit(uri, tmp_path, callbacks=[every_3_steps], max_epochs=1, limit_val_batches=0)
    ckpt = tmp_path / "ckpt" / "step=3.ckpt"
    assert torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert Counter(full.ids["train"]) == Counter(manifest["splits"]["train"]["image_ids"])

    _, resumed = fit(uri, tmp_path, ckpt_path=ckpt, max_epochs=1, limit_val_batches=0)
    assert resumed.ids["train"] == full.ids["train"][3 * 2:], "the resumed epoch must continue where step 3 left off"


@pytest.mark.integration
@pytest.mark.slow
def test_real_ddp_ranks_get_disjoint_equal_shares(s3_shards, s3_env, tmp_path):
    """Shards in S3, two CPU processes (gloo) under torchrun sharing one cache, two loader workers each."""
    uri, manifest = s3_shards
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_ports(1)[0]), "-m", "tests.test_stream", uri, str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "GLOBAL_RANK", "LOCAL_RANK")}
    # its own session, so that a hang is ended with every worker process, not just torchrun
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"DDP run hung:\n{output[-3000:]}")
    assert proc.returncode == 0, "\n".join(line for line in output.splitlines() if "[rank" in line)[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for name, batch_size in (("train", 2), ("val", 2)):
        a, b = ranks[0][name], ranks[1][name]
        split = manifest["splits"][name]["image_ids"]
        assert a and len(a) == len(b), (name, len(a), len(b))
        assert len(set(a)) == len(a) and not set(a) & set(b), name
        assert set(a) | set(b) <= set(split)
        assert len(split) - len(a) - len(b) < 2 * batch_size, name  # the documented drop_last remainder


def _ddp_main(uri: str, out: str) -> None:
    trainer, recorder = fit(uri, Path(out), strategy="ddp", devices=2, max_epochs=1)
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps({"world_size": trainer.world_size,
                                                                        **recorder.ids}))


if __name__ == "__main__":
    _ddp_main(*sys.argv[1:3])
