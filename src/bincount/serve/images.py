"""Encoded photo -> ``uint8`` RGB tensor, refusing what is too large before decoding it.

The header is read first (Pillow, lazily), so a photo that declares too many pixels is refused
before any memory is spent on it; the pixels are decoded by torchvision, the decoder training
uses.
"""

from __future__ import annotations

import io

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype

from bincount.data.decode import check_photo_size, decoder_reason
from bincount.serve.errors import RequestError
from bincount.serve.settings import Limits

IMAGE_FORMATS = ("JPEG", "PNG")


def read_image_header(data: bytes, *, limits: Limits, expected_format: str | None = None) -> tuple[str, int, int]:
    """Check an encoded photo's size and header without decoding its pixels.

    Args:
        data: The encoded photo.
        limits: Size limits.
        expected_format: ``"JPEG"`` or ``"PNG"`` when the content type named one; ``None``: either.

    Returns:
        ``(format, width, height)``, width and height in pixels.

    Raises:
        RequestError: (400) Empty, over ``limits``, under :data:`bincount.data.decode.MIN_SIDE`
            pixels on a side, not a JPEG/PNG, or not the declared format.
    """
    if not data:
        raise RequestError("empty image: send the bytes of a JPEG or PNG photo")
    if len(data) > limits.max_image_bytes:
        raise RequestError(f"image is {len(data)} bytes; the limit is {limits.max_image_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
            fmt, (width, height) = img.format, img.size
    except Image.DecompressionBombError as err:
        raise RequestError(f"image refused as a decompression bomb ({err})") from None
    except UnidentifiedImageError:
        raise RequestError("not an image: the data is neither JPEG nor PNG") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise RequestError(f"corrupt or truncated image header ({err})") from None
    if fmt not in IMAGE_FORMATS:
        raise RequestError(f"unsupported image format {fmt}: send JPEG or PNG")
    if expected_format is not None and fmt != expected_format:
        raise RequestError(f"the body is a {fmt} image but Content-Type says {expected_format}")
    if width * height > limits.max_pixels:
        raise RequestError(f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}")
    try:
        check_photo_size(width, height)
    except ValueError as err:
        raise RequestError(str(err)) from None
    return fmt, width, height


def decode_image_pixels(data: bytes, fmt: str) -> torch.Tensor:
    """Decode the pixels of a photo whose header :func:`read_image_header` has checked.

    Args:
        data: The encoded photo.
        fmt: Its format, ``"JPEG"`` or ``"PNG"`` (for the error message).

    Returns:
        ``uint8`` RGB tensor ``(3, H, W)``; 16-bit PNGs are scaled to the 8 bits training photos have.

    Raises:
        RequestError: (400) Truncated or corrupt pixels.
    """
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise RequestError(f"corrupt or truncated {fmt} image ({decoder_reason(err)})") from None
    return to_dtype(image, torch.uint8, scale=True)


def decode_image_bytes(data: bytes, *, limits: Limits, expected_format: str | None = None) -> torch.Tensor:
    """Check and decode one encoded photo: :func:`read_image_header`, then :func:`decode_image_pixels`.

    Args:
        data: The encoded photo.
        limits: Size limits.
        expected_format: ``"JPEG"`` or ``"PNG"`` when the content type named one; ``None``: either.

    Returns:
        ``uint8`` RGB tensor ``(3, H, W)``.

    Raises:
        RequestError: (400) See :func:`read_image_header` and :func:`decode_image_pixels`.
    """
    fmt, _, _ = read_image_header(data, limits=limits, expected_format=expected_format)
    return decode_image_pixels(data, fmt)
