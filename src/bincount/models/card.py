"""The model card: what ``model_config.json`` says about an exported model, as frozen pydantic models.

Every reader loads it through :func:`bincount.models.export.read_model_card`; a malformed file
fails once, in one ``ValueError`` line naming each field. Unknown keys are ignored, so a card
written by a newer version still loads. ``model_dump(mode="json")`` is the file's JSON object.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, computed_field,
                      model_validator)

import bincount
from bincount.data.transforms import IMAGENET_MEAN, IMAGENET_STD, CountingPresetEval
from bincount.models.backbones import check_arch
from bincount.models.decoding import NEVER, DecodeRule, TtaMode

# strict: a bool, a string or (for whole numbers) a float is refused, never converted
Whole = Annotated[int, Field(strict=True, ge=0)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Positive = Annotated[Number, Field(gt=0.0)]
Share = Annotated[float, Field(strict=True, ge=0.0, le=1.0)]
RGB = Field(min_length=3, max_length=3)
FROZEN = ConfigDict(frozen=True, extra="ignore")


def check_count_range(min_count: Any, max_count: Any, *, keys: str = "") -> None:
    """Check the class range every model and card share; ``keys`` (the config keys) ends the message.

    Raises:
        ValueError: If the range is not whole numbers ``0 <= min_count < max_count``.
    """
    if not (type(min_count) is int and type(max_count) is int and 0 <= min_count < max_count):
        raise ValueError(f"count range {min_count}..{max_count}: need whole numbers 0 <= min_count < max_count{keys}")


def check_option(key: str, value: Any, kind: Any) -> None:
    """Check the value of config ``key`` (``model.decode``) against its type (a ``Literal``).

    Raises:
        ValueError: ``key=value: <the problem>``.
    """
    try:
        TypeAdapter(kind).validate_python(value)
    except ValidationError as err:
        raise ValueError(f"{key}={value!r}: {err.errors()[0]['msg']}") from None


class EvalPreset(BaseModel):
    """The evaluation preprocessing the network was trained with (:class:`CountingPresetEval`).

    Args:
        image_size: Side of the square network input, pixels (``>= 1``).
        mean: Per-channel (RGB) normalisation mean, on pixel values scaled to ``[0, 1]``.
        std: Per-channel (RGB) normalisation standard deviation, same scale (each ``> 0``).
    """

    model_config = FROZEN

    image_size: Annotated[int, Field(strict=True, ge=1)]
    mean: Annotated[tuple[Number, ...], RGB] = IMAGENET_MEAN
    std: Annotated[tuple[Positive, ...], RGB] = IMAGENET_STD

    def build(self) -> CountingPresetEval:
        """The preset itself: ``uint8`` ``(3, H, W)`` photo -> ``float32`` ``(3, S, S)``."""
        return CountingPresetEval(image_size=self.image_size, mean=self.mean, std=self.std)

    @classmethod
    def of(cls, preset: CountingPresetEval) -> EvalPreset:
        """The card entry of a preset."""
        return cls(image_size=preset.image_size, mean=tuple(preset.mean), std=tuple(preset.std))


class Calibration(BaseModel):
    """Temperature scaling and the review threshold (:func:`bincount.models.calibration.calibrate`).

    Serving needs ``temperature`` and ``review_threshold``; the others record how they were fitted.

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

    model_config = FROZEN

    temperature: Positive
    review_threshold: Annotated[float, Field(strict=True, ge=0.0, le=NEVER)]
    target_precision: Annotated[float, Field(strict=True, gt=0.0, le=1.0)] | None = None
    min_support: Whole | None = None
    ece_before: Share | None = None
    ece_after: Share | None = None
    coverage: Share | None = None
    precision: Share | None = None
    n: Whole | None = None


class ModelCard(BaseModel):
    """Everything besides the weights that serving, evaluation and batch prediction need; written
    by :func:`bincount.models.export.save_model_dir` with ``num_classes`` (derived) as its last key.

    Args:
        arch: torchvision classification model name of the backbone (``resnet18``, ``resnet50``, ...).
        min_count: Count of class 0 (``>= 0``).
        max_count: Count of the last class (``> min_count``).
        preset: The evaluation preprocessing (input size and normalisation).
        bincount_version: The version of bincount that wrote the card (``None`` if unknown).
        decode: How probabilities become a count: one of :data:`~bincount.models.decoding.DecodeRule`.
        tta: Test-time augmentation: one of :data:`~bincount.models.decoding.TtaMode`.
        checkpoint: File name of the checkpoint the weights came from (in the run's ``checkpoints/``), or ``None``.
        calibration: Temperature and review threshold, or ``None`` (uncalibrated).
        num_classes: Optional; when given, it must match the class range.

    Raises:
        pydantic.ValidationError: If a field is missing or malformed, the class range is not
            ``0 <= min_count < max_count``, or ``num_classes`` does not match it.
    """

    model_config = FROZEN

    arch: Annotated[str, AfterValidator(check_arch)]
    min_count: Whole
    max_count: Whole
    preset: EvalPreset
    bincount_version: str | None = bincount.__version__
    decode: DecodeRule = "argmax"
    tta: TtaMode = "none"
    checkpoint: str | None = None
    calibration: Calibration | None = None

    @computed_field
    @property
    def num_classes(self) -> int:
        """Classes ``0..num_classes-1`` are the counts ``min_count..max_count``."""
        return self.max_count - self.min_count + 1

    @model_validator(mode="wrap")
    @classmethod
    def _check_classes(cls, data: Any, handler) -> ModelCard:
        card = handler(data)
        check_count_range(card.min_count, card.max_count)
        if isinstance(data, dict) and data.get("num_classes", card.num_classes) != card.num_classes:
            raise ValueError(f"num_classes={data['num_classes']!r} does not match min_count={card.min_count}, "
                             f"max_count={card.max_count}")
        return card

    @classmethod
    def read(cls, data: Any) -> ModelCard:
        """Check and read a parsed ``model_config.json``; a missing ``bincount_version`` is ``None`` (unknown).

        Raises:
            ValueError: If ``data`` is not an object, or on missing or malformed fields; one line
                naming each field.
        """
        if not isinstance(data, dict):
            raise ValueError(f"holds a JSON {type(data).__name__}, not an object")
        try:
            return cls.model_validate({"bincount_version": None, **data})
        except ValidationError as err:
            errors = err.errors(include_url=False)
        # a list's own error (too short) is left out when one of its items has one: the item says more
        inside = {e["loc"][:k] for e in errors for k in range(len(e["loc"]))}  # every location holding an error
        errors = [e for e in errors if e["loc"] not in inside]
        missing = [".".join(map(str, e["loc"])) for e in errors if e["type"] == "missing"]
        problems = [f"lacks {', '.join(missing)}: not a bincount model config"] if missing else []
        for e in errors:
            where = ".".join(map(str, e["loc"]))
            if e["type"] == "value_error":  # a validator's own message says it all
                problems.append(f"{where}: {e['ctx']['error']}" if where else str(e["ctx"]["error"]))
            elif e["type"] != "missing":
                problems.append(f"{where}: {e['msg']}, got {e['input']!r}")
        raise ValueError("; ".join(problems))
