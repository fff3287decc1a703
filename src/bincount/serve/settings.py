"""What a server is allowed to accept and how it judges: request limits, the S3 objects a request
may name, the review threshold, and how a photo it cannot count is answered.

The SageMaker endpoint is configured by its environment, read when the handler runs (never at
import time): ``BINCOUNT_MAX_IMAGE_BYTES``, ``BINCOUNT_MAX_PIXELS``, ``BINCOUNT_MAX_INSTANCES``,
``BINCOUNT_ALLOWED_S3_PREFIXES``, ``BINCOUNT_REVIEW_THRESHOLD`` and ``BINCOUNT_BATCH_TRANSFORM``.
``bincount serve`` starts from the same variables and lets its flags override them; it hands the
result to the handler functions in their ``context`` argument (:func:`settings_of`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlparse

from pydantic import TypeAdapter, ValidationError

ALLOWED_S3_PREFIXES = "BINCOUNT_ALLOWED_S3_PREFIXES"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    if not value:  # set but empty: as if unset
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be a number") from None


def _env_bool(name: str) -> bool:
    value = os.environ.get(name, "").strip()
    if not value:  # unset or empty: off
        return False
    try:
        return TypeAdapter(bool).validate_python(value)  # pydantic's reading: true/false, 1/0, yes/no, on/off
    except ValidationError:
        raise ValueError(f"environment variable {name}={value!r} must be true or false") from None


def parse_s3_prefixes(value: str, *, name: str = ALLOWED_S3_PREFIXES) -> tuple[tuple[str, str], ...]:
    """``"bins-a, s3://bins-b/bin-images/"`` -> ``(("bins-a", ""), ("bins-b", "bin-images/"))``.

    Entries are separated by commas or white space; each is a bucket (``bins-a`` or
    ``s3://bins-a``: all of it) or an S3 prefix (``s3://bins-b/bin-images/``), matched as S3
    matches prefixes (``s3://b/bin`` also covers ``s3://b/bin-old/``; end a folder with ``/``).

    Raises:
        ValueError: An entry that is not a bucket or an ``s3://`` prefix, naming ``name``.
    """
    prefixes = []
    for entry in re.split(r"[\s,]+", value.strip()):
        if not entry:
            continue
        parsed = urlparse(entry if "://" in entry else f"s3://{entry}")
        if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
            raise ValueError(f"{name}: {entry!r} is not a bucket or an s3://BUCKET/PREFIX")
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
            max_image_bytes=_env_int("BINCOUNT_MAX_IMAGE_BYTES", cls.max_image_bytes),
            max_pixels=_env_int("BINCOUNT_MAX_PIXELS", cls.max_pixels),
            max_instances=_env_int("BINCOUNT_MAX_INSTANCES", cls.max_instances),
            allowed_s3_prefixes=parse_s3_prefixes(allowed) if allowed.strip() else None,
        )


@dataclass(frozen=True)
class Settings:
    """How the handler functions serve.

    Args:
        limits: Request limits.
        review_threshold: Overrides the calibrated review threshold of ``model_config.json``
            (``None``: the calibrated one).
        device: Where the network runs (``None``: CUDA when available, else CPU).
        batch_transform: The handler answers a Batch Transform job: a photo it cannot count (a
            client mistake, 4xx) is answered 200 with ``{"error": "..."}``, so that the job goes
            on and ``bincount transform collect`` makes it an error row. Off, it is answered
            with its 4xx, as an endpoint's caller expects.
    """

    limits: Limits = field(default_factory=Limits)
    review_threshold: float | None = None
    device: str | None = None
    batch_transform: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        """:meth:`Limits.from_env`, ``BINCOUNT_REVIEW_THRESHOLD`` and ``BINCOUNT_BATCH_TRANSFORM``.

        Raises:
            ValueError: If a variable is set but malformed.
        """
        return cls(limits=Limits.from_env(), review_threshold=_env_float("BINCOUNT_REVIEW_THRESHOLD"),
                   batch_transform=_env_bool("BINCOUNT_BATCH_TRANSFORM"))

    def override(self, **values: Any) -> Settings:
        """A copy with the values that are not ``None`` replaced (command-line flags over the environment)."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


def settings_of(context: Any) -> Settings:
    """The settings a handler function runs with: ``context.settings`` when the caller gave some
    (``bincount serve``), else :meth:`Settings.from_env` (the SageMaker image's context has none).
    """
    settings = getattr(context, "settings", None)
    return settings if isinstance(settings, Settings) else Settings.from_env()
