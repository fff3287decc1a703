"""The photos of a request: an encoded photo or an S3 object -> ``uint8`` RGB tensor, within :class:`Limits`.

Pillow reads the header first, so a photo that declares too many pixels costs no memory;
torchvision, training's decoder, decodes the pixels.
"""

from __future__ import annotations

import io
import os
import re
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch
from PIL import Image, UnidentifiedImageError
from pydantic import TypeAdapter, ValidationError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype

from bincount.data.decode import check_photo_size, decoder_reason
from bincount.serve.errors import RequestError

IMAGE_FORMATS = ("JPEG", "PNG")
ALLOWED_S3_PREFIXES = "BINCOUNT_ALLOWED_S3_PREFIXES"
ENV_KINDS = {int: "an integer", float: "a number", bool: "true or false"}


def env_value(name: str, kind: type[int] | type[float] | type[bool], default: Any = None) -> Any:
    """``$name`` read by pydantic as ``kind`` (a bool: ``true``/``false``, ``1``/``0``, ``yes``/``no``, ``on``/``off``).

    Returns:
        The value, or ``default`` if the variable is unset or empty.

    Raises:
        ValueError: If it is set but not a ``kind``, naming the variable.
    """
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError:
        raise ValueError(f"environment variable {name}={value!r} must be {ENV_KINDS[kind]}") from None


def parse_s3_prefixes(value: str) -> tuple[tuple[str, str], ...]:
    """``"bins-a, s3://bins-b/bin-images/"`` -> ``(("bins-a", ""), ("bins-b", "bin-images/"))``.

    Entries are separated by commas or white space; each is a bucket (``bins-a`` or
    ``s3://bins-a``: all of it) or an S3 prefix (``s3://bins-b/bin-images/``), matched as S3
    matches prefixes (``s3://b/bin`` also covers ``s3://b/bin-old/``; end a folder with ``/``).

    Raises:
        ValueError: An entry that is not a bucket or an ``s3://`` prefix.
    """
    prefixes = []
    for entry in re.split(r"[\s,]+", value.strip()):
        if not entry:
            continue
        parsed = urlparse(entry if "://" in entry else f"s3://{entry}")
        if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
            raise ValueError(f"{ALLOWED_S3_PREFIXES}: {entry!r} is not a bucket or an s3://BUCKET/PREFIX")
        prefixes.append((parsed.netloc, parsed.path.removeprefix("/")))
    return tuple(prefixes)


@dataclass(frozen=True)
class Limits:
    """What one request may hold, and the S3 objects it may name.

    Args:
        max_image_bytes: Encoded size of one photo, bytes.
        max_pixels: Width x height of one photo (guards decompression bombs: checked on the
            header, before any pixel is decoded).
        max_instances: Photos in one JSON request.
        allowed_s3_prefixes: ``(bucket, key prefix)`` pairs (:func:`parse_s3_prefixes`): an
            ``s3_uri`` must name an object under one of them. ``None``: any object the server's
            AWS identity can read.
    """

    max_image_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_instances: int = 64
    allowed_s3_prefixes: tuple[tuple[str, str], ...] | None = None

    @classmethod
    def from_env(cls) -> Limits:
        """Defaults overridden by ``BINCOUNT_MAX_IMAGE_BYTES``, ``BINCOUNT_MAX_PIXELS``,
        ``BINCOUNT_MAX_INSTANCES`` and ``BINCOUNT_ALLOWED_S3_PREFIXES`` (unset or empty: no restriction).

        Raises:
            ValueError: If one of them is set but malformed.
        """
        allowed = os.environ.get(ALLOWED_S3_PREFIXES, "")
        return cls(
            max_image_bytes=env_value("BINCOUNT_MAX_IMAGE_BYTES", int, cls.max_image_bytes),
            max_pixels=env_value("BINCOUNT_MAX_PIXELS", int, cls.max_pixels),
            max_instances=env_value("BINCOUNT_MAX_INSTANCES", int, cls.max_instances),
            allowed_s3_prefixes=parse_s3_prefixes(allowed) if allowed.strip() else None,
        )


def read_image_header(data: bytes, *, limits: Limits, expected_format: str | None = None) -> tuple[str, int, int]:
    """Check an encoded photo's size and header without decoding its pixels.

    Args:
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
    """Decode the pixels of a photo whose header :func:`read_image_header` has checked (``fmt``: its format).

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
    """Check and decode one encoded photo: :func:`read_image_header` (its arguments and errors), then
    :func:`decode_image_pixels` (its ``(3, H, W)`` ``uint8`` answer and errors)."""
    fmt, _, _ = read_image_header(data, limits=limits, expected_format=expected_format)
    return decode_image_pixels(data, fmt)


_s3_clients: dict[int, Any] = {}
_s3_lock = threading.Lock()


def s3_client():
    """This process's S3 client (:func:`bincount.data.s3.make_client`; a forked worker makes its own),
    unsigned without AWS credentials (public buckets such as ABID's).

    Raises:
        ImportError: If boto3 is not installed (``pip install bincount[serve]``).
    """
    with _s3_lock:
        if os.getpid() not in _s3_clients:
            import boto3

            from bincount.data.s3 import make_client

            anonymous = boto3.session.Session().get_credentials() is None
            _s3_clients[os.getpid()] = make_client(anonymous=anonymous, max_attempts=3, connect_timeout=5,
                                                   read_timeout=30)
        return _s3_clients[os.getpid()]


def _bucket_and_key(uri: str) -> tuple[str, str]:
    from bincount.data.s3 import split_s3_uri

    try:
        return split_s3_uri(uri)
    except ValueError as err:
        raise RequestError(str(err)) from None


def check_s3_allowed(uri: str, allowed: tuple[tuple[str, str], ...] | None) -> None:
    """Refuse an ``s3_uri`` outside the S3 prefixes the operator allows, before anything is sent to S3.

    Args:
        allowed: ``(bucket, key prefix)`` pairs (:attr:`Limits.allowed_s3_prefixes`); ``None``: allow any.

    Raises:
        RequestError: (400) ``uri`` is not an S3 URI; (403) it names an object under none of
            ``allowed``, or its key has a ``.`` or ``..`` segment (while ``allowed`` is set).
    """
    if allowed is None:
        return
    bucket, key = _bucket_and_key(uri)  # the bucket and key read_s3_object would read
    if any(part in (".", "..") for part in key.split("/")) or not any(
            bucket == allowed_bucket and key.startswith(prefix) for allowed_bucket, prefix in allowed):
        raise RequestError(f"s3_uri {uri!r} is outside the S3 prefixes this server may read", 403)


def read_s3_object(uri: str, *, max_bytes: int) -> bytes:
    """The bytes of the S3 object ``uri`` (``s3://bucket/key``), of at most ``max_bytes`` bytes.

    Raises:
        RequestError: (400) Bad URI (botocore's own checks of the bucket name and key included),
            missing object or bucket, access denied, or over ``max_bytes``; (502) S3 cannot be reached.
    """
    from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

    from bincount.data.s3 import explain

    bucket, key = _bucket_and_key(uri)
    try:
        response = s3_client().get_object(Bucket=bucket, Key=key)
        with response["Body"] as body:
            if response["ContentLength"] > max_bytes:
                raise RequestError(f"{uri} is {response['ContentLength']} bytes; the limit is {max_bytes} bytes")
            return body.read()
    except ClientError as err:
        raise RequestError(str(explain(err, uri=uri))) from None
    except ParamValidationError as err:  # refused before sending: the request's fault, not S3's
        raise RequestError(f"s3_uri {uri!r}: " + " ".join(str(err).replace("Parameter validation failed:", "").split())) from None
    except BotoCoreError as err:
        raise RequestError(str(explain(err, uri=uri)), 502) from None
