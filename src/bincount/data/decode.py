"""Photo decoding: files for the folder dataset, the bytes in shards for ``prepare`` and streaming.

Both entry points give the same tensor for the same photo and decoder. Serving uses this module
too; it imports neither Hydra nor Lightning.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg, read_file

DECODERS = ("torchvision", "pil")
# the shorter side of the smallest photo taken for a bin: ABID's are hundreds of pixels on a side,
# and a few-pixel image (a thumbnail, a tracking pixel) upscaled to the model's input shows no items
MIN_SIDE = 32


def check_photo_size(width: int, height: int) -> None:
    """Refuse a photo too small to show a bin's items.

    Raises:
        ValueError: If ``width`` or ``height`` is under :data:`MIN_SIDE` pixels.
    """
    if min(width, height) < MIN_SIDE:
        raise ValueError(f"photo is {width}x{height} pixels; a bin photo is at least {MIN_SIDE} pixels on each side")


def decoder_reason(err: Exception) -> str:
    """What the decoder said went wrong, without the source file and line it names.

    torchvision's message reads ``"decode_jpeg, /path/to/decode_jpeg.cpp:171, Image is
    incomplete or truncated"``: a client needs the last part, not the build path.
    """
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    return re.split(r"\S+\.(?:cpp|cc|c|h|hpp):\d+,?\s*", line)[-1].strip() or type(err).__name__


def _decode(source: bytes | bytearray | memoryview | Path, decoder: str) -> torch.Tensor:
    """Decode ``source`` (encoded bytes, or the file holding them) to ``uint8`` RGB ``(3, H, W)``."""
    if decoder == "torchvision":  # libjpeg-turbo
        try:
            raw = read_file(str(source)) if isinstance(source, Path) else torch.frombuffer(
                bytearray(source), dtype=torch.uint8)
            image = decode_jpeg(raw, mode=ImageReadMode.RGB)
        except RuntimeError as err:
            raise ValueError(f"cannot decode JPEG ({decoder_reason(err)})") from None
    elif decoder == "pil":
        try:
            with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
                rgb = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot decode image ({err})") from None
        image = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
    else:
        raise ValueError(f"unknown decoder {decoder!r}: use {' or '.join(map(repr, DECODERS))}")
    check_photo_size(image.shape[-1], image.shape[-2])
    return image


def decode_rgb_bytes(data: bytes | bytearray | memoryview, decoder: str = "torchvision") -> torch.Tensor:
    """Decode an encoded photo to a ``uint8`` RGB tensor of shape ``(3, H, W)``.

    Args:
        data: The encoded photo (JPEG; ``"pil"`` also reads other formats).
        decoder: ``"torchvision"`` (libjpeg-turbo via ``torchvision.io.decode_jpeg``) or ``"pil"``.

    Raises:
        ValueError: If the bytes are not a decodable image or ``decoder`` is unknown; the message
            is ``"cannot decode JPEG (<reason>)"`` / ``"cannot decode image (<reason>)"``. If the
            photo is under :data:`MIN_SIDE` pixels on a side (:func:`check_photo_size`).
    """
    return _decode(data, decoder)


def decode_rgb_file(path: str | Path, decoder: str = "torchvision") -> torch.Tensor:
    """Decode a photo file to a ``uint8`` RGB tensor of shape ``(3, H, W)``.

    Equal to ``decode_rgb_bytes(Path(path).read_bytes(), decoder)``; the torchvision decoder reads
    the file straight into a tensor.

    Args:
        path: The photo (JPEG; ``"pil"`` also reads other formats).
        decoder: See :func:`decode_rgb_bytes`.

    Raises:
        ValueError: If the file cannot be read or decoded, is too small (:func:`check_photo_size`),
            or ``decoder`` is unknown; the message starts with ``path``.
    """
    try:
        return _decode(Path(path), decoder)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
