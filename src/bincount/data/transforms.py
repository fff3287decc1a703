"""Image presets shared by training, evaluation and serving, so preprocessing cannot drift.

Modelled on torchvision's ``references/classification/presets.py``, with one change for
counting: photos are resized whole to a square instead of centre-cropped, so evaluation and
serving see every item in the bin. Training augmentation can still cut an item at the edge out of
view (see :class:`CountingPresetTrain`).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_image_size(image_size: int) -> int:
    """``image_size`` if it is a positive whole number of pixels.

    Raises:
        ValueError: Otherwise, naming ``data.image_size``.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"data.image_size={image_size!r}: must be a positive whole number of pixels (e.g. 112, 224)")
    return image_size


class CountingPresetEval:
    """Deterministic preprocessing: whole photo -> ``image_size`` square, normalised.

    Input: a ``uint8`` tensor ``(3, H, W)`` or a PIL image. Output: ``float32`` ``(3, S, S)``.
    """

    def __init__(
        self,
        *,
        image_size: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        self.image_size = check_image_size(image_size)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, img):
        # torchvision's functional ops rather than a v2.Compose of the same four transforms: equal
        # output (tested), without the per-call dispatch that costs a served photo ~0.3 ms at 112 px
        if not isinstance(img, torch.Tensor):
            img = TF.to_image(img)  # PIL image or ndarray -> uint8 (3, H, W)
        img = TF.resize(img, [self.image_size, self.image_size], antialias=True)
        return TF.normalize(TF.to_dtype(img, torch.float32, scale=True), self.mean, self.std)


class CountingPresetTrain:
    """Training augmentation: flips, small rotations, a mild random crop and colour jitter.

    Flips and rotations of up to ``rotation_degrees`` (a bin photographed from above has no
    canonical orientation), a ``RandomResizedCrop`` of the resized photo keeping ``min_scale`` to
    all of its area (aspect 0.9 to 1.1), and colour jitter. The crop and the corners the rotation
    fills in can cut an item at the edge partly or wholly out of view while the target stays the
    count of the whole bin; ``min_scale=1.0`` and ``rotation_degrees=0`` keep every item in view.

    Input: a ``uint8`` tensor ``(3, H, W)`` or a PIL image. Output: ``float32`` ``(3, S, S)``.
    """

    def __init__(
        self,
        *,
        image_size: int,
        hflip_prob: float = 0.5,
        vflip_prob: float = 0.5,
        rotation_degrees: float = 10.0,
        min_scale: float = 0.9,
        color_jitter: float = 0.2,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        check_image_size(image_size)
        steps: list = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)]
        if min_scale < 1.0:
            steps.append(
                v2.RandomResizedCrop((image_size, image_size), scale=(min_scale, 1.0), ratio=(0.9, 1.1), antialias=True)
            )
        if hflip_prob > 0:
            steps.append(v2.RandomHorizontalFlip(hflip_prob))
        if vflip_prob > 0:
            steps.append(v2.RandomVerticalFlip(vflip_prob))
        if rotation_degrees > 0:
            steps.append(v2.RandomRotation(rotation_degrees))
        if color_jitter > 0:
            steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std)]
        self.transforms = v2.Compose(steps)

    def __call__(self, img):
        return self.transforms(img)
