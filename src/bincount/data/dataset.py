"""Map-style dataset of ABID bin photos."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate
from torchvision.transforms.v2 import functional as TF

from bincount.data.abid import IMAGE_DIR, BinRecord
from bincount.data.decode import decode_rgb_file

log = logging.getLogger(__name__)

Sample = tuple[torch.Tensor, int, int]


class BinImageDataset(Dataset):
    """ABID photos with their count class.

    Item ``i`` is ``(image, target, i)``: the transformed image, the class index
    ``expected_quantity - min_count`` and the item's own index (to join predictions back to
    ``records[i].image_id``). A photo that fails to decode yields ``None`` with a warning;
    :func:`collate_skip_none` drops it from the batch, so a bad file never stops an epoch.

    Args:
        root: ABID-layout folder.
        records: The photos and counts to serve.
        min_count: Count of class 0.
        transform: Applied to the ``uint8`` ``(3, H, W)`` tensor.
        decoder: See :func:`bincount.data.decode.decode_rgb_bytes`.
        cache_size: If set, every photo is decoded once here, resized to a ``cache_size`` square
            and kept in memory as ``uint8`` (``3 * cache_size**2`` bytes a photo), so epochs after
            the first cost no JPEG decoding. Exact when ``transform`` starts by resizing to that
            square, as the counting presets do.
    """

    def __init__(
        self,
        root: str | Path,
        records: Sequence[BinRecord],
        *,
        min_count: int,
        transform: Callable | None = None,
        decoder: str = "torchvision",
        cache_size: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.records = list(records)
        self.min_count = min_count
        self.transform = transform
        self.decoder = decoder
        self.cache: list[torch.Tensor | None] | None = None
        if cache_size is not None:
            self.cache = [self._load(i, cache_size) for i in range(len(self.records))]

    def _load(self, index: int, size: int | None = None) -> torch.Tensor | None:
        rec = self.records[index]
        try:
            image = decode_rgb_file(self.root / IMAGE_DIR / f"{rec.image_id}.jpg", self.decoder)
        except (ValueError, OSError) as err:
            log.warning("skipping photo %s: %s", rec.image_id, err)
            return None
        return image if size is None else TF.resize(image, [size, size], antialias=True)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | None:
        image = self._load(index) if self.cache is None else self.cache[index]
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.records[index].expected_quantity - self.min_count, index


def collate_skip_none(batch: list[Sample | None]):
    """``default_collate`` without the samples that failed to load.

    Returns ``None`` when the whole batch failed (the LightningModule skips such a batch).
    """
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None
