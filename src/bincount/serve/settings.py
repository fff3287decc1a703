"""What a server is allowed to accept and how it judges: request limits and the review threshold.

The SageMaker endpoint is configured by its environment, read when the handler runs (never at
import time): ``BINCOUNT_MAX_IMAGE_BYTES``, ``BINCOUNT_MAX_PIXELS``, ``BINCOUNT_MAX_INSTANCES`` and
``BINCOUNT_REVIEW_THRESHOLD``. ``bincount serve`` starts from the same variables and lets its flags
override them; it hands the result to the handler functions in their ``context`` argument
(:func:`settings_of`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any


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


@dataclass(frozen=True)
class Limits:
    """What one request may hold.

    Args:
        max_image_bytes: Encoded size of one photo, bytes.
        max_pixels: Width x height of one photo (guards decompression bombs: checked on the
            header, before any pixel is decoded).
        max_instances: Photos in one JSON request.
    """

    max_image_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_instances: int = 64

    @classmethod
    def from_env(cls) -> Limits:
        """Defaults overridden by ``BINCOUNT_MAX_IMAGE_BYTES``, ``BINCOUNT_MAX_PIXELS``, ``BINCOUNT_MAX_INSTANCES``.

        Raises:
            ValueError: If one of them is set but not an integer.
        """
        return cls(
            max_image_bytes=_env_int("BINCOUNT_MAX_IMAGE_BYTES", cls.max_image_bytes),
            max_pixels=_env_int("BINCOUNT_MAX_PIXELS", cls.max_pixels),
            max_instances=_env_int("BINCOUNT_MAX_INSTANCES", cls.max_instances),
        )


@dataclass(frozen=True)
class Settings:
    """How the handler functions serve.

    Args:
        limits: Request limits.
        review_threshold: Overrides the calibrated review threshold of ``model_config.json``
            (``None``: the calibrated one).
        device: Where the network runs (``None``: CUDA when available, else CPU).
    """

    limits: Limits = field(default_factory=Limits)
    review_threshold: float | None = None
    device: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        """:meth:`Limits.from_env` and ``BINCOUNT_REVIEW_THRESHOLD``.

        Raises:
            ValueError: If a variable is set but not a number.
        """
        return cls(limits=Limits.from_env(), review_threshold=_env_float("BINCOUNT_REVIEW_THRESHOLD"))

    def override(self, **values: Any) -> Settings:
        """A copy with the values that are not ``None`` replaced (command-line flags over the environment)."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


def settings_of(context: Any) -> Settings:
    """The settings a handler function runs with: ``context.settings`` when the caller gave some
    (``bincount serve``), else :meth:`Settings.from_env` (the SageMaker image's context has none).
    """
    settings = getattr(context, "settings", None)
    return settings if isinstance(settings, Settings) else Settings.from_env()
