"""A request body of any supported content type -> decoded photos and their expected quantities."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import torch

from bincount.serve.errors import RequestError
from bincount.serve.fetch import check_s3_allowed, read_s3_object
from bincount.serve.images import decode_image_bytes
from bincount.serve.protocol import IMAGE_CONTENT_TYPES, JSON, check_content_type, parse_custom_attributes
from bincount.serve.schema import Instance, parse_json_body
from bincount.serve.settings import Limits


@dataclass
class CountRequest:
    """Decoded photos and the quantities they are expected to hold.

    Args:
        images: ``uint8`` RGB tensors ``(3, H, W)``.
        expected: One per image: the expected count, or ``None`` (no verification).
    """

    images: list[torch.Tensor]
    expected: list[int | None]


def instance_bytes(instance: Instance, limits: Limits) -> bytes:
    """The encoded photo of one JSON instance: base64-decoded, or fetched from S3.

    Raises:
        RequestError: (400) Over ``limits.max_image_bytes``, invalid base64, or see
            :func:`~bincount.serve.fetch.read_s3_object`; (403) an ``s3_uri`` outside
            ``limits.allowed_s3_prefixes`` (:func:`~bincount.serve.fetch.check_s3_allowed`).
        UpstreamError: (502) S3 cannot be reached.
    """
    if instance.s3_uri is not None:
        check_s3_allowed(instance.s3_uri, limits.allowed_s3_prefixes)
        return read_s3_object(instance.s3_uri, max_bytes=limits.max_image_bytes)
    encoded = instance.image_b64
    if len(encoded) * 3 // 4 > limits.max_image_bytes + 3:  # 4 base64 characters per 3 bytes
        raise RequestError(f"image is over the limit of {limits.max_image_bytes} bytes")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"image_b64 is not valid base64 ({err})") from None


def decode_json(body: bytes | str, limits: Limits) -> CountRequest:
    """Decode ``{"instances": [{"image_b64"|"s3_uri": ...}, ...], "expected_quantity": [...]}``.

    Raises:
        RequestError: Malformed JSON, a wrong structure or type
            (:func:`~bincount.serve.schema.parse_json_body`), or a bad photo (the message names
            the instance).
    """
    doc = parse_json_body(body, max_instances=limits.max_instances)
    images = []
    for i, instance in enumerate(doc.instances):
        try:
            images.append(decode_image_bytes(instance_bytes(instance, limits), limits=limits))
        except RequestError as err:
            raise RequestError(f"instances[{i}]: {err.message}", err.status_code) from None
    return CountRequest(images, doc.expected())


def decode_request(body: bytes | str, content_type: str | None, *, limits: Limits,
                   custom_attributes: str | None = None) -> CountRequest:
    """Decode a request body of any supported content type.

    Args:
        body: Raw body (the SageMaker toolkit may hand JSON over as ``str``).
        content_type: The ``Content-Type`` header.
        limits: Size limits.
        custom_attributes: The ``X-Amzn-SageMaker-Custom-Attributes`` header (single photos).

    Raises:
        UnsupportedContentType: (415) Not JPEG, PNG, x-image or JSON.
        RequestError: (400) See :func:`~bincount.serve.images.decode_image_bytes` and :func:`decode_json`;
            (403) an ``s3_uri`` outside ``limits.allowed_s3_prefixes``.
    """
    kind = check_content_type(content_type)
    if kind == JSON:
        return decode_json(body, limits)
    data = body.encode() if isinstance(body, str) else bytes(body)
    image = decode_image_bytes(data, limits=limits, expected_format=IMAGE_CONTENT_TYPES[kind])
    return CountRequest([image], [parse_custom_attributes(custom_attributes)])
