"""LightningDataModules: the base the folder and the streaming ones share, and the one over an ABID folder."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from bincount.data.abid import BinRecord, build_index
from bincount.data.dataset import BinImageDataset, collate_skip_none
from bincount.data.splits import block_split, per_image_split
from bincount.data.transforms import CountingPresetEval, CountingPresetTrain
from bincount.data.workers import init_loader_worker

log = logging.getLogger(__name__)

SPLITS = ("block", "per_image", "all")


class CountingDataModule(L.LightningDataModule):
    """What the folder and the streaming data modules share: presets, splits, loaders by split.

    ``train()`` relies on ``root``, ``splits`` (lists of :class:`BinRecord` per split, after
    ``setup()``), ``datasets``, ``eval_preset`` (evaluation sets the model's before ``setup()``),
    ``num_classes`` and ``hparams.min_count``. A subclass saves ``min_count``, ``max_count``,
    ``batch_size`` and ``num_workers`` as hyperparameters, fills ``splits`` and ``datasets`` in
    ``setup()`` and builds a loader in :meth:`_loader`.

    Args:
        root: Where the photos come from (a folder, or the URI of prepared shards).
        image_size: Side of the square network input, pixels.
        train_transform: Keyword arguments of :class:`CountingPresetTrain` besides ``image_size``.
    """

    def __init__(self, root, *, image_size: int, train_transform: dict | None) -> None:
        super().__init__()
        self.root = root
        self.eval_preset = CountingPresetEval(image_size=image_size)
        self.train_preset = CountingPresetTrain(image_size=image_size, **(train_transform or {}))
        self.splits: dict[str, list[BinRecord]] = {}
        self.datasets: dict = {}

    @property
    def num_classes(self) -> int:
        return self.hparams.max_count - self.hparams.min_count + 1

    def preset(self, split: str):
        """The augmenting preset for ``"train"``, the deterministic one for the other splits."""
        return self.train_preset if split == "train" else self.eval_preset

    def loader_kwargs(self) -> dict:
        """Keyword arguments every split's loader gets: batch size, workers, their init, the collate."""
        return {"batch_size": self.hparams.batch_size, "num_workers": self.hparams.num_workers,
                "collate_fn": collate_skip_none, "worker_init_fn": init_loader_worker}

    def _loader(self, name: str):
        raise NotImplementedError(f"{type(self).__name__} builds no loader for the {name} split")

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")


class ABIDDataModule(CountingDataModule):
    """Bin photos and counts from an ABID-layout folder, split by id blocks.

    Args:
        root: Folder with ``bin-images/``, ``metadata/`` and/or ``labels.csv``.
        min_count: Smallest count (class 0). Photos outside ``[min_count, max_count]`` are dropped.
        max_count: Largest count (class ``max_count - min_count``).
        label_list: Optional ``file_list.json`` / counting-split JSON / id list selecting the photos.
        split: ``"block"``: train/val/test from :func:`bincount.data.splits.block_split`;
            ``"per_image"``: the same test photos, train/val split per photo
            (:func:`bincount.data.splits.per_image_split`; for comparing with projects that do so);
            ``"all"``: every photo is in the test set, for evaluating a held-out folder.
        val_fraction: Approximate share of photos for validation.
        test_fraction: Approximate share of photos for test.
        block_size: Ids ``n // block_size`` equal stay on one side of the split.
        seed: Seed of the split (independent of the training seed on purpose).
        image_size: Side of the square network input, pixels.
        batch_size: Photos per batch (per device under DDP).
        num_workers: DataLoader worker processes.
        decoder: ``"torchvision"`` or ``"pil"`` (see ``benchmarks/decode.py``).
        train_transform: Keyword arguments of :class:`CountingPresetTrain` besides ``image_size``.
        cache_images: Decode every photo once in ``setup`` and keep it resized to ``image_size`` in
            memory (``3 * image_size**2`` bytes a photo; for data sets that fit, like the shared sample).
        balance: Draw training photos with probability inversely proportional to the frequency of
            their count (``WeightedRandomSampler``, with replacement), so every count is seen equally often.
    """

    def __init__(
        self,
        root: str,
        *,
        min_count: int = 1,
        max_count: int = 5,
        label_list: str | None = None,
        split: str = "block",
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        block_size: int = 20,
        seed: int = 0,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 2,
        decoder: str = "torchvision",
        train_transform: dict | None = None,
        cache_images: bool = False,
        balance: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: must be one of {SPLITS}")
        super().__init__(Path(root), image_size=image_size, train_transform=train_transform)
        self.save_hyperparameters(logger=False)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        records, _ = build_index(
            self.root, min_count=hp.min_count, max_count=hp.max_count, label_list=hp.label_list
        )
        if hp.split == "all":
            self.splits = {"train": [], "val": [], "test": records}
        else:
            split_fn = block_split if hp.split == "block" else per_image_split
            self.splits = split_fn(
                records,
                val_fraction=hp.val_fraction,
                test_fraction=hp.test_fraction,
                seed=hp.seed,
                block_size=hp.block_size,
            )
        for name, recs in self.splits.items():
            counts = Counter(r.expected_quantity for r in recs)
            log.info("%s: %d photos, by count %s", name, len(recs), dict(sorted(counts.items())))
            self.datasets[name] = BinImageDataset(
                self.root, recs, min_count=hp.min_count, transform=self.preset(name), decoder=hp.decoder,
                cache_size=hp.image_size if hp.cache_images else None,
            )

    def _balanced_sampler(self) -> WeightedRandomSampler:
        counts = torch.tensor([r.expected_quantity for r in self.datasets["train"].records])
        frequency = {int(c): int(n) for c, n in zip(*counts.unique(return_counts=True))}
        weights = torch.tensor([1.0 / frequency[int(c)] for c in counts], dtype=torch.float64)
        return WeightedRandomSampler(weights, num_samples=len(weights), replacement=True)

    def _loader(self, name: str) -> DataLoader:
        if not self.datasets[name]:
            raise ValueError(f"the {name} split of {self.root} is empty (data.split={self.hparams.split})")
        shuffle = name == "train"
        sampler = self._balanced_sampler() if shuffle and self.hparams.balance else None
        return DataLoader(
            self.datasets[name],
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            persistent_workers=self.hparams.num_workers > 0,
            drop_last=shuffle and len(self.datasets[name]) > self.hparams.batch_size,
            **self.loader_kwargs(),
        )
