"""The model card: what ``model_config.json`` says about an exported model, typed and checked.

Training writes one :class:`ModelCard` beside the weights; evaluation, ``bincount predict``,
``bincount serve`` and the SageMaker handler read it back through
:func:`bincount.models.export.read_model_card`, so every reader sees the same checked fields
(class range, input preprocessing, decoding rule, test-time augmentation, calibration) and a
malformed file fails once, naming the file and the field.

The card is a frozen dataclass whose ``__post_init__`` checks every field, so a card built in
code and a card read from disk pass the same checks, with messages that name the field.

Keys that are not fields are ignored when reading, so a card written by a newer version with an
extra field still loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import bincount
from bincount.data.transforms import IMAGENET_MEAN, IMAGENET_STD, CountingPresetEval
from bincount.models.decoding import DECODE_RULES, NEVER, TTA_MODES


class CardError(ValueError):
    """A model card field is missing or has the wrong type or value; the message names the field."""


def _whole(data: dict, key: str, *, minimum: int, where: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CardError(f"{where}{key} must be a whole number >= {minimum}, got {value!r}")
    return value


def _number(data: dict, key: str, *, where: str, low: float = -math.inf, high: float = math.inf,
            low_open: bool = False) -> float:
    value = data[key]
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bound = (f"{'>' if low_open else '>='} {low}" if high == math.inf
                 else f"in {'(' if low_open else '['}{low}, {high}]")
        raise CardError(f"{where}{key} must be a number {bound}, got {value!r}")
    return float(value)


def _optional(data: dict, key: str, read, **kwargs):
    """``read(data, key, ...)``, or ``None`` when the key is absent or null."""
    return None if data.get(key) is None else read(data, key, **kwargs)


def _object(data: dict, key: str) -> dict:
    value = data[key]
    if not isinstance(value, dict):
        raise CardError(f"{key} must be a JSON object, got {value!r}")
    return value


def _missing(data: dict, keys: tuple[str, ...], *, where: str = "") -> None:
    if missing := [k for k in keys if k not in data]:
        raise CardError(f"lacks {', '.join(where + k for k in missing)}: not a bincount model config")


@dataclass(frozen=True)
class EvalPreset:
    """The evaluation preprocessing the network was trained with (:class:`CountingPresetEval`).

    Args:
        image_size: Side of the square network input, pixels.
        mean: Per-channel (RGB) normalisation mean, on pixel values scaled to ``[0, 1]``.
        std: Per-channel (RGB) normalisation standard deviation, same scale.
    """

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def build(self) -> CountingPresetEval:
        """The preset itself: ``uint8`` ``(3, H, W)`` photo -> ``float32`` ``(3, S, S)``."""
        return CountingPresetEval(image_size=self.image_size, mean=self.mean, std=self.std)

    @classmethod
    def of(cls, preset: CountingPresetEval) -> EvalPreset:
        """The card entry of a preset."""
        return cls(image_size=preset.image_size, mean=tuple(preset.mean), std=tuple(preset.std))

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> EvalPreset:
        """Check and read the ``preset`` object.

        Raises:
            CardError: If ``image_size`` is missing or not a positive whole number, or ``mean``
                or ``std`` is not a list of three numbers.
        """
        _missing(data, ("image_size",), where="preset.")
        channels = {}
        for key in ("mean", "std"):
            if key not in data:
                continue
            value = data[key]
            if not (isinstance(value, list) and len(value) == 3
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise CardError(f"preset.{key} must be a list of 3 numbers (RGB), got {value!r}")
            channels[key] = tuple(float(v) for v in value)
        return cls(image_size=_whole(data, "image_size", minimum=1, where="preset."), **channels)


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling and the review threshold, fitted on the validation split
    (:func:`bincount.models.calibration.calibrate`).

    Serving needs ``temperature`` and ``review_threshold``; the other fields record how they
    were fitted (``None`` when not recorded).

    Args:
        temperature: Logits are divided by it before the softmax (``> 0``; 1.0 changes nothing).
        review_threshold: Calibrated confidence below which a verdict is ``"review"``, in
            ``[0, 1]``, or :data:`~bincount.models.decoding.NEVER` (every verdict ``"review"``).
        target_precision: Wanted share of right answers above the threshold, in ``(0, 1]``.
        min_support: Fewest validation photos the threshold had to answer.
        ece_before: Expected calibration error on the validation photos before scaling, ``[0, 1]``.
        ece_after: The same after scaling.
        coverage: Share of the validation photos at or above the threshold, ``[0, 1]``.
        precision: Share of those answered right (``None`` when none was answered).
        n: Validation photos used.
    """

    temperature: float
    review_threshold: float
    target_precision: float | None = None
    min_support: int | None = None
    ece_before: float | None = None
    ece_after: float | None = None
    coverage: float | None = None
    precision: float | None = None
    n: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "review_threshold": self.review_threshold,
                "target_precision": self.target_precision, "min_support": self.min_support,
                "ece_before": self.ece_before, "ece_after": self.ece_after, "coverage": self.coverage,
                "precision": self.precision, "n": self.n}

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """Check and read the ``calibration`` object (what :func:`calibrate` returns).

        Raises:
            CardError: If ``temperature`` or ``review_threshold`` is missing, or a field has the
                wrong type or is out of range.
        """
        w = "calibration."
        _missing(data, ("temperature", "review_threshold"), where=w)
        unit = {"where": w, "low": 0.0, "high": 1.0}
        return cls(
            temperature=_number(data, "temperature", where=w, low=0.0, low_open=True),
            review_threshold=_number(data, "review_threshold", where=w, low=0.0, high=NEVER),
            target_precision=_optional(data, "target_precision", _number, where=w, low=0.0, high=1.0, low_open=True),
            min_support=_optional(data, "min_support", _whole, minimum=0, where=w),
            ece_before=_optional(data, "ece_before", _number, **unit),
            ece_after=_optional(data, "ece_after", _number, **unit),
            coverage=_optional(data, "coverage", _number, **unit),
            precision=_optional(data, "precision", _number, **unit),
            n=_optional(data, "n", _whole, minimum=0, where=w),
        )


@dataclass(frozen=True)
class ModelCard:
    """Everything besides the weights that serving, evaluation and batch prediction need.

    Written as ``model_config.json`` by :func:`bincount.models.export.save_model_dir`, with
    ``num_classes`` added (derived, for readers of the file).

    Args:
        arch: torchvision model name of the backbone (``resnet18``, ``resnet50``, ...).
        min_count: Count of class 0 (``>= 0``).
        max_count: Count of the last class (``> min_count``).
        preset: The evaluation preprocessing (input size and normalisation).
        decode: How probabilities become a count: one of
            :data:`~bincount.models.decoding.DECODE_RULES`.
        tta: Test-time augmentation: one of :data:`~bincount.models.decoding.TTA_MODES`.
        checkpoint: File name of the checkpoint the weights came from (in the run's
            ``checkpoints/``), or ``None`` (the final weights, or not from a training run).
        calibration: Temperature and review threshold, or ``None`` (uncalibrated: temperature
            1, every verdict ``"review"`` unless a threshold is given at serving time).
        bincount_version: The version of bincount that wrote the card (``None`` if unknown).

    Raises:
        CardError: If the class range is not ``0 <= min_count < max_count``, or ``decode`` or
            ``tta`` is not one of its rules.
    """

    arch: str
    min_count: int
    max_count: int
    preset: EvalPreset
    decode: str = "argmax"
    tta: str = "none"
    checkpoint: str | None = None
    calibration: Calibration | None = None
    bincount_version: str | None = bincount.__version__

    def __post_init__(self) -> None:
        if not 0 <= self.min_count < self.max_count:
            raise CardError(f"min_count={self.min_count}, max_count={self.max_count}: need 0 <= min_count < max_count")
        for key, value, allowed in (("decode", self.decode, DECODE_RULES), ("tta", self.tta, TTA_MODES)):
            if value not in allowed:
                raise CardError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")

    @property
    def num_classes(self) -> int:
        """Classes ``0..num_classes-1`` are the counts ``min_count..max_count``."""
        return self.max_count - self.min_count + 1

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``model_config.json``."""
        return {
            "arch": self.arch,
            "min_count": self.min_count,
            "max_count": self.max_count,
            "num_classes": self.num_classes,
            "preset": self.preset.to_dict(),
            "bincount_version": self.bincount_version,
            "decode": self.decode,
            "tta": self.tta,
            "checkpoint": self.checkpoint,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """Check and read a parsed ``model_config.json``.

        ``arch``, ``min_count``, ``max_count`` and ``preset`` are required; ``decode``, ``tta``,
        ``checkpoint``, ``calibration`` and ``bincount_version`` default as in :class:`ModelCard`;
        ``num_classes``, when present, must match the class range; other keys are ignored.

        Raises:
            CardError: On the first missing or malformed field, naming it.
        """
        if not isinstance(data, dict):
            raise CardError(f"holds a JSON {type(data).__name__}, not an object")
        _missing(data, ("arch", "min_count", "max_count", "preset"))
        if not isinstance(data["arch"], str) or not data["arch"]:
            raise CardError(f"arch must be a torchvision model name, got {data['arch']!r}")
        for key in ("decode", "tta", "checkpoint", "bincount_version"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise CardError(f"{key} must be a string, got {data[key]!r}")
        card = cls(
            arch=data["arch"],
            min_count=_whole(data, "min_count", minimum=0, where=""),
            max_count=_whole(data, "max_count", minimum=0, where=""),
            preset=EvalPreset.from_dict(_object(data, "preset")),
            decode=data.get("decode", "argmax"),
            tta=data.get("tta", "none"),
            checkpoint=data.get("checkpoint"),
            calibration=None if data.get("calibration") is None else Calibration.from_dict(_object(data, "calibration")),
            bincount_version=data.get("bincount_version"),
        )
        if data.get("num_classes", card.num_classes) != card.num_classes:
            raise CardError(f"num_classes={data['num_classes']!r} does not match min_count={card.min_count}, "
                            f"max_count={card.max_count}")
        return card
