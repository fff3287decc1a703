"""LightningDataModule that streams shards written by ``bincount data prepare`` from S3 or a local folder.

Usage:
    python train.py +experiment=quickstart data=abid_stream data.uri=s3://BUCKET/abid/v1
    python train.py +experiment=quickstart data=abid_stream data.uri=data/abid-shards      # no S3 at all
    torchrun --nproc_per_node 2 train.py +experiment=quickstart data=abid_stream data.uri=s3://BUCKET/abid/v1 \
        trainer.strategy=ddp trainer.devices=2

Each split is a ``litdata.StreamingDataset`` read through a ``StreamingDataLoader``, built in
``setup()`` because litdata reads the rank and world size when the dataset is constructed. litdata
shards by rank and by worker itself (Lightning's distributed sampler does not reach an iterable
dataset): under DDP each rank gets an equal, disjoint share, and the remainder (fewer than
``world_size * batch_size`` photos) is left out of that epoch. The loader's ``state_dict`` is
stored in Lightning checkpoints, so a run resumed mid-epoch continues where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from bincount.data.datamodule import CountingDataModule
from bincount.data.decode import decode_rgb_bytes
from bincount.data.s3 import is_s3_uri, join_uri, resolve_endpoint
from bincount.data.shards import SPLIT_NAMES, read_manifest, read_sample, split_records

log = logging.getLogger(__name__)


def allow_http_in_litdata(endpoint_url: str | None = None) -> bool:
    """Let litdata's obstore path talk to a plain-``http`` S3 endpoint.

    litdata 0.2.x builds its obstore ``S3Store`` from the client options
    ``litdata.streaming.downloader._OBSTORE_CLIENT_OPTIONS`` without ``allow_http``, so every chunk
    read from an ``http://`` endpoint fails ("BadScheme"). This adds it there, in every process that
    reads chunks: importing this module does it for ``$AWS_ENDPOINT_URL``, the datamodule and its
    workers for an explicit endpoint.

    Returns:
        Whether the option was set (``False`` for https or AWS).

    Raises:
        RuntimeError: If litdata no longer has that option table (an upgrade changed it).
    """
    endpoint = resolve_endpoint(endpoint_url)
    if not endpoint or not endpoint.startswith("http://"):
        return False
    from litdata.streaming import downloader

    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if not isinstance(options, dict):
        raise RuntimeError(
            "litdata.streaming.downloader._OBSTORE_CLIENT_OPTIONS is gone (litdata upgrade?): "
            "bincount.data.stream.allow_http_in_litdata cannot enable http endpoints; revisit it"
        )
    options["allow_http"] = "true"
    return True


class ShardSample:
    """litdata transform: a stored sample -> ``(image, target, index)`` like :class:`BinImageDataset`.

    ``index`` is the photo's position in the manifest's list for its split (``datamodule.splits``),
    found by its ``image_id`` (the order inside the chunks is litdata's). A photo that fails to
    decode yields ``None`` with a warning; :func:`collate_skip_none` drops it.

    Args:
        image_ids: The split's ids in manifest order.
        min_count: Count of class 0.
        transform: Applied to the ``uint8`` ``(3, H, W)`` tensor.
        decoder: ``"torchvision"`` or ``"pil"``.
        endpoint_url: Re-applies the litdata http workaround in spawned worker processes.
    """

    def __init__(self, image_ids, *, min_count: int, transform, decoder: str = "torchvision",
                 endpoint_url: str | None = None) -> None:
        self.position = {image_id: i for i, image_id in enumerate(image_ids)}
        self.min_count = min_count
        self.transform = transform
        self.decoder = decoder
        self.endpoint_url = endpoint_url

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        allow_http_in_litdata(self.endpoint_url)

    def __call__(self, sample: dict):
        image_id, count, data = read_sample(sample)
        try:
            image = decode_rgb_bytes(data, self.decoder)
        except ValueError as err:
            log.warning("skipping photo %s: %s", image_id, err)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, count - self.min_count, self.position[image_id]


class ABIDStreamDataModule(CountingDataModule):
    """Bin photos and counts streamed from prepared shards (``bincount data prepare``).

    ``root`` is the URI; ``splits`` are the manifest's (after ``setup()``).

    Args:
        uri: ``s3://BUCKET/PREFIX`` or a local folder holding ``manifest.json``.
        min_count: Must equal the manifest's (the classes were fixed when the shards were made).
        max_count: Must equal the manifest's.
        label_list: Accepted so experiment files written for ``data=abid`` compose; the shards
            already hold the selection, so a list other than the manifest's only warns.
        cache_images: Accepted so experiment files written for ``data=abid`` compose; streamed
            photos are not kept in memory (litdata caches their chunks on disk, ``cache_dir``).
        split: ``"block"`` (the manifest's train/val/test); the only split shards have.
        image_size: Side of the square network input, pixels.
        batch_size: Photos per batch (per device under DDP).
        num_workers: DataLoader worker processes per rank (litdata gives each a disjoint share).
        decoder: ``"torchvision"`` or ``"pil"``.
        train_transform: Keyword arguments of :class:`CountingPresetTrain` besides ``image_size``.
        shuffle: Reshuffle the training photos every epoch.
        seed: Seed of litdata's shuffle (the epoch is mixed in).
        cache_dir: Where chunks from S3 are cached, in a subfolder per rank (and litdata's per
            split URI). Required for S3: litdata's default location is a shared system path.
        max_cache_size: Cache budget, e.g. ``"20GB"`` (litdata evicts chunks already read).
        max_pre_download: Chunks each worker downloads ahead.
        endpoint_url: S3-compatible endpoint (default ``$AWS_ENDPOINT_URL`` or AWS).
    """

    def __init__(
        self,
        uri: str,
        *,
        min_count: int = 1,
        max_count: int = 5,
        label_list: str | None = None,
        cache_images: bool = False,
        split: str = "block",
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 2,
        decoder: str = "torchvision",
        train_transform: dict | None = None,
        shuffle: bool = True,
        seed: int = 0,
        cache_dir: str | None = None,
        max_cache_size: str | None = None,
        max_pre_download: int = 2,
        endpoint_url: str | None = None,
    ) -> None:
        if split != "block":
            raise ValueError(f"split={split!r}: shards keep the split they were prepared with; use 'block'")
        if is_s3_uri(uri) and not cache_dir:
            raise ValueError(f"data.cache_dir is required to stream {uri} (chunks are cached there)")
        super().__init__(uri, image_size=image_size, train_transform=train_transform)
        self.save_hyperparameters(logger=False)
        self.manifest: dict | None = None

    def _global_rank(self) -> int:
        if self.trainer is not None:
            return self.trainer.global_rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return 0

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        from litdata import StreamingDataset

        hp = self.hparams
        endpoint = resolve_endpoint(hp.endpoint_url)
        allow_http_in_litdata(endpoint)
        self.manifest = read_manifest(self.root, endpoint_url=endpoint)
        if (self.manifest["min_count"], self.manifest["max_count"]) != (hp.min_count, hp.max_count):
            raise ValueError(
                f"{self.root} was prepared for counts {self.manifest['min_count']}..{self.manifest['max_count']}, "
                f"but data.min_count={hp.min_count}, data.max_count={hp.max_count}: set them to match "
                f"or prepare the shards again with --min-count/--max-count"
            )
        listed = self.manifest.get("label_list")
        if hp.label_list and Path(hp.label_list).name != Path(listed or "").name:
            log.warning("data.label_list=%s, but %s was prepared with %s; the shards decide", hp.label_list,
                        self.root, listed or "every labelled photo")
        storage_options = {"endpoint_url": endpoint} if endpoint else None
        cache_dir = None  # litdata reads local chunks in place
        if is_s3_uri(self.root):
            # one folder per rank: ranks read disjoint chunks anyway, and litdata's cache set-up
            # deletes a folder another process is creating when two build datasets at once
            cache_dir = str(Path(hp.cache_dir) / f"rank{self._global_rank()}")
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        max_cache_size = hp.max_cache_size
        if max_cache_size is None:
            # litdata's default budget, resolved once here: every dataset in every worker would
            # otherwise resolve it again and log "max_cache_size is unset" each time
            from litdata.utilities.format import _resolve_max_cache_size

            max_cache_size = _resolve_max_cache_size(None, cache_dir or self.root)
        for name in SPLIT_NAMES:
            entry = self.manifest["splits"][name]
            self.splits[name] = split_records(self.manifest, name)
            by_count = dict(sorted(Counter(entry["counts"]).items()))
            rank_zero_info(f"{name}: {len(entry['image_ids'])} photos from {self.root}, by count {by_count}")
            if not entry["image_ids"]:
                continue
            train = name == "train"
            self.datasets[name] = StreamingDataset(
                join_uri(self.root, entry["dir"]),
                cache_dir=cache_dir,  # litdata keeps a subfolder per input URI and index version
                shuffle=train and hp.shuffle,
                seed=hp.seed,
                max_cache_size=max_cache_size,
                max_pre_download=hp.max_pre_download,
                storage_options=storage_options,
                transform=ShardSample(entry["image_ids"], min_count=hp.min_count, transform=self.preset(name),
                                      decoder=hp.decoder, endpoint_url=endpoint),
            )

    def _loader(self, name: str):
        from litdata import StreamingDataLoader

        if name not in self.datasets:
            raise ValueError(f"the {name} split of {self.root} is empty")
        return StreamingDataLoader(self.datasets[name], **self.loader_kwargs())


with contextlib.suppress(ImportError):  # litdata comes with bincount[data]; without it this module still imports
    allow_http_in_litdata()
