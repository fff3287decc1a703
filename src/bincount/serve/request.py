"""The wire format of the endpoint, and a request body -> decoded photos.

Requests: ``image/jpeg``, ``image/png`` or ``application/x-image`` (one photo; an expected
quantity may come in the ``X-Amzn-SageMaker-Custom-Attributes`` header as ``expected_quantity=3``),
or ``application/json``, a body :class:`CountRequestBody` validates::

    {"instances": [{"image_b64": "..."}, {"s3_uri": "s3://bucket/key.jpg"}], "expected_quantity": [3, null]}

Answers: ``application/json``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import BaseModel, Field, StrictInt, StrictStr, ValidationError, ValidationInfo, field_validator, \
    model_validator

from bincount.serve.errors import RequestError
from bincount.serve.images import Limits, check_s3_allowed, decode_image_bytes, read_s3_object

JSON = "application/json"
IMAGE_CONTENT_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "application/x-image": None}
"""Image media type -> the format its body must have (``None``: JPEG or PNG)."""
CONTENT_TYPES = (*IMAGE_CONTENT_TYPES, JSON)
ACCEPT_TYPES = (JSON, "application/*", "*/*")
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
BODY_SHAPE = 'JSON body must be an object with an "instances" list'
INSTANCE_SHAPE = 'must be an object with a string "image_b64" or "s3_uri" (not both)'


def check_content_type(content_type: str | None) -> str:
    """The media type, one of :data:`CONTENT_TYPES`, of a ``Content-Type`` header
    (``"Image/JPEG; charset=x"`` reads as ``"image/jpeg"``).

    Raises:
        RequestError: (415) Not JPEG, PNG, x-image or JSON.
    """
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind not in CONTENT_TYPES:
        raise RequestError(f"unsupported Content-Type {content_type!r}: send one of {', '.join(CONTENT_TYPES)}", 415)
    return kind


def check_accept(accept: str | None) -> str:
    """The content type to answer with, ``"application/json"``, for an ``Accept`` header (``None``,
    empty or ``*/*``: JSON).

    Raises:
        RequestError: (406) If no media range of ``accept`` (with ``q > 0``) covers JSON.
    """
    if not accept or not accept.strip():
        return JSON
    for media_range in accept.split(","):
        kind, *params = (p.strip().lower() for p in media_range.split(";"))
        q = next((p.split("=", 1)[1] for p in params if p.startswith("q=")), "1")
        try:
            wanted = float(q) > 0
        except ValueError:
            wanted = False
        if kind in ACCEPT_TYPES and wanted:
            return JSON
    raise RequestError(f"cannot answer with Accept {accept!r}: this endpoint answers {JSON}", 406)


def parse_custom_attributes(header: str | None) -> int | None:
    """The expected quantity in ``X-Amzn-SageMaker-Custom-Attributes`` (``expected_quantity=3``; pairs
    separated by ``;`` or ``,``, other keys ignored), or ``None`` if the header does not name one.

    Raises:
        RequestError: (400) If ``expected_quantity`` is not a non-negative integer.
    """
    for pair in (header or "").replace(",", ";").split(";"):
        key, _, value = pair.partition("=")
        if key.strip() == "expected_quantity":
            value = value.strip()
            if not value.isdigit():
                raise RequestError(f"{CUSTOM_ATTRIBUTES}: expected_quantity must be a non-negative integer, "
                                   f"got {value!r}")
            return int(value)
    return None


class Instance(BaseModel):
    """One photo: its encoded bytes in base64, or the S3 URI of its object (exactly one of them)."""

    image_b64: StrictStr | None = None
    s3_uri: StrictStr | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Instance:
        if (self.image_b64 is None) == (self.s3_uri is None):
            raise ValueError(INSTANCE_SHAPE)
        return self

    def photo_bytes(self, limits: Limits) -> bytes:
        """The encoded photo: base64-decoded, or fetched from S3.

        Raises:
            RequestError: (400) Over ``limits.max_image_bytes``, invalid base64, or see
                :func:`~bincount.serve.images.read_s3_object`; (403) an ``s3_uri`` outside
                ``limits.allowed_s3_prefixes`` (:func:`~bincount.serve.images.check_s3_allowed`);
                (502) S3 cannot be reached.
        """
        if self.s3_uri is not None:
            check_s3_allowed(self.s3_uri, limits.allowed_s3_prefixes)
            return read_s3_object(self.s3_uri, max_bytes=limits.max_image_bytes)
        if len(self.image_b64) * 3 // 4 > limits.max_image_bytes + 3:  # 4 base64 characters per 3 bytes
            raise RequestError(f"image is over the limit of {limits.max_image_bytes} bytes")
        try:
            return base64.b64decode(self.image_b64, validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(f"image_b64 is not valid base64 ({err})") from None


class CountRequestBody(BaseModel):
    """Photos to count and, optionally, the quantity each is expected to hold; validate with
    ``context={"max_instances": n}`` to limit the number of photos.

    Attributes:
        instances: 1 to ``max_instances`` photos.
        expected_quantity: One entry per instance, a non-negative integer or ``None`` (no
            verification); ``None`` for all of them when absent.
    """

    instances: list[Instance]
    expected_quantity: list[Annotated[StrictInt, Field(ge=0)] | None] | None = None

    @field_validator("instances", mode="before")
    @classmethod
    def _within_limit(cls, value: Any, info: ValidationInfo) -> Any:
        # before the photos are validated: a request over the limit is refused as a whole
        limit = (info.context or {}).get("max_instances")
        if isinstance(value, list) and limit is not None and not 1 <= len(value) <= limit:
            raise ValueError(f'"instances" must hold 1 to {limit} photos, got {len(value)}')
        return value

    @model_validator(mode="after")
    def _one_expected_per_instance(self) -> CountRequestBody:
        if self.expected_quantity is not None and len(self.expected_quantity) != len(self.instances):
            raise ValueError(_expected_length_message(len(self.instances), self.expected_quantity))
        return self

    def expected(self) -> list[int | None]:
        """One expected quantity (or ``None``) per instance."""
        return list(self.expected_quantity) if self.expected_quantity is not None else [None] * len(self.instances)


def _expected_length_message(instances: int, expected: Any) -> str:
    return (f'"expected_quantity" must be a list with one entry (integer or null) per instance ({instances}), '
            f"got {json.dumps(expected)[:100]}")


def _describe(error: dict, doc: Any) -> str:
    """One line that names the field, for the first of pydantic's ``ValidationError.errors()`` on ``doc``,
    e.g. ``instances[1]: must be an object with a string "image_b64" or "s3_uri" (not both)``."""
    loc, message = error["loc"], error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and len(loc) < 2:  # raised by our own validators
        return message
    if not loc or loc == ("instances",):
        return BODY_SHAPE
    if loc[0] == "instances":
        return f"instances[{loc[1]}]: {INSTANCE_SHAPE}"
    if loc == ("expected_quantity",):
        return _expected_length_message(len(doc["instances"]), error["input"])
    return f"expected_quantity[{loc[1]}] must be a non-negative integer or null, got {json.dumps(error['input'])}"


def parse_json_body(body: bytes | str, *, max_instances: int) -> CountRequestBody:
    """Parse and validate a JSON request body (the SageMaker toolkit may hand it over as ``str``).

    Raises:
        RequestError: (400) Malformed JSON, or a structure or value the schema refuses; the
            message names the field.
    """
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: absurd nesting
        raise RequestError(f"malformed JSON: {err}") from None
    try:
        return CountRequestBody.model_validate(doc, context={"max_instances": max_instances})
    except ValidationError as err:
        raise RequestError(_describe(err.errors(include_url=False)[0], doc)) from None


@dataclass
class CountRequest:
    """Decoded photos and the quantities they are expected to hold.

    Attributes:
        images: ``uint8`` RGB tensors ``(3, H, W)``.
        expected: One per image: the expected count, or ``None`` (no verification).
    """

    images: list[torch.Tensor]
    expected: list[int | None]


def decode_request(body: bytes | str, content_type: str | None, *, limits: Limits,
                   custom_attributes: str | None = None) -> CountRequest:
    """Decode a request body of any supported content type (JSON may come as ``str``).

    Args:
        custom_attributes: The ``X-Amzn-SageMaker-Custom-Attributes`` header (single photos).

    Raises:
        RequestError: (400) A bad photo (:func:`~bincount.serve.images.decode_image_bytes`; in a
            JSON body the message names the instance), malformed JSON or a structure or type
            :func:`parse_json_body` refuses; (403) an ``s3_uri`` outside ``limits.allowed_s3_prefixes``;
            (415) not JPEG, PNG, x-image or JSON; (502) S3 cannot be reached.
    """
    kind = check_content_type(content_type)
    if kind != JSON:
        data = body.encode() if isinstance(body, str) else bytes(body)
        image = decode_image_bytes(data, limits=limits, expected_format=IMAGE_CONTENT_TYPES[kind])
        return CountRequest([image], [parse_custom_attributes(custom_attributes)])
    doc = parse_json_body(body, max_instances=limits.max_instances)
    images = []
    for i, instance in enumerate(doc.instances):
        try:
            images.append(decode_image_bytes(instance.photo_bytes(limits), limits=limits))
        except RequestError as err:
            raise RequestError(f"instances[{i}]: {err.message}", err.status_code) from None
    return CountRequest(images, doc.expected())
