"""The wire format of the endpoint: content types read and written, ``Accept``, custom attributes.

Requests: ``image/jpeg``, ``image/png`` or ``application/x-image`` (one photo; an expected
quantity may come in the ``X-Amzn-SageMaker-Custom-Attributes`` header as ``expected_quantity=3``),
or ``application/json`` (:mod:`bincount.serve.schema`). Answers: ``application/json``.
"""

from __future__ import annotations

from typing import Any

from bincount.serve.errors import NotAcceptable, RequestError, UnsupportedContentType

JSON = "application/json"
IMAGE_CONTENT_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "application/x-image": None}
"""Image media type -> the format its body must have (``None``: JPEG or PNG)."""
CONTENT_TYPES = (*IMAGE_CONTENT_TYPES, JSON)
ACCEPT_TYPES = (JSON, "application/*", "*/*")
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"


def media_type(content_type: str | None) -> str:
    """``"Image/JPEG; charset=x"`` -> ``"image/jpeg"`` (``""`` for ``None``)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_content_type(content_type: str | None) -> str:
    """The media type of a request body the handler reads.

    Args:
        content_type: The ``Content-Type`` header.

    Returns:
        One of :data:`CONTENT_TYPES`.

    Raises:
        UnsupportedContentType: (415) Not JPEG, PNG, x-image or JSON.
    """
    kind = media_type(content_type)
    if kind not in CONTENT_TYPES:
        raise UnsupportedContentType(content_type, CONTENT_TYPES)
    return kind


def check_accept(accept: str | None) -> str:
    """The content type to answer with.

    Args:
        accept: The ``Accept`` header (``None``, empty or ``*/*``: JSON).

    Returns:
        ``"application/json"``.

    Raises:
        NotAcceptable: (406) If no media range of ``accept`` (with ``q > 0``) covers JSON.
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
    raise NotAcceptable(accept, JSON)


def parse_custom_attributes(header: str | None) -> int | None:
    """The expected quantity in ``X-Amzn-SageMaker-Custom-Attributes`` (``expected_quantity=3``).

    Pairs may be separated by ``;`` or ``,``; other keys are ignored.

    Returns:
        The expected quantity, or ``None`` if the header does not name one.

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


def request_header(context: Any, name: str) -> str | None:
    """A request header from the handler's ``context`` (TorchServe's ``Context``, whose
    ``request_processor[0].get_request_properties()`` holds the headers); ``None`` without one."""
    try:
        headers = context.request_processor[0].get_request_properties()
    except (AttributeError, IndexError, TypeError):
        return None
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)
