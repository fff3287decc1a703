"""The served model: an exported ``model/`` folder loaded for inference, its forward pass, and
the answers it gives (count, confidence and verdict).

The forward pass is ONNX Runtime's, on ``model.onnx`` (checked against the PyTorch forward at
export: :func:`bincount.models.export.save_model_dir`); preprocessing is the training code's
:class:`~bincount.data.transforms.CountingPresetEval`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, InvalidProtobuf

from bincount.data.transforms import CountingPresetEval
from bincount.models.card import ModelCard
from bincount.models.decoding import NEVER, decode_counts
from bincount.models.export import ONNX_FILE, read_model_card
from bincount.serve.images import Limits

log = logging.getLogger(__name__)
CUDA = "CUDAExecutionProvider"


def onnx_file(model_dir: str | Path) -> Path:
    """``model_dir``'s ``model.onnx``.

    Raises:
        FileNotFoundError: If it is missing; the message says how to re-export it.
    """
    path = Path(model_dir) / ONNX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the model was exported without it; re-export it with "
                                f"`bincount export --model-dir {path.parent}`")
    return path


def inference_session(model_dir: str | Path, device: str | None = None,
                      threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session of ``model_dir``'s ``model.onnx`` on ``device``.

    Args:
        device: ``"cpu"`` or ``"cuda"``/``"cuda:N"`` (needs the onnxruntime-gpu package); default:
            CUDA when this onnxruntime has it, else CPU.
        threads: Intra-op threads of the forward pass (default: ONNX Runtime's, one per physical core).

    Raises:
        FileNotFoundError: If ``model.onnx`` is missing (:func:`onnx_file`).
        ValueError: If it is not a readable ONNX model (cut short, or not one at all), or
            ``device`` is unknown or this onnxruntime cannot run on it.
    """
    path = onnx_file(model_dir)
    if device is None and CUDA not in ort.get_available_providers() and torch.cuda.is_available():
        log.warning("this machine has a GPU but onnxruntime has no CUDA provider: counting on the CPU "
                    "(pip install onnxruntime-gpu to count on the GPU)")
    device = device or ("cuda" if CUDA in ort.get_available_providers() else "cpu")
    if device == "cpu":
        providers: list = ["CPUExecutionProvider"]
    elif device.split(":")[0] == "cuda":
        if CUDA not in ort.get_available_providers():
            raise ValueError(f"device {device!r}: this onnxruntime has no CUDA provider "
                             "(pip install onnxruntime-gpu, or pass --device cpu)")
        providers = [(CUDA, {"device_id": int(device.partition(":")[2] or 0)}), "CPUExecutionProvider"]
    else:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default
    # threads that wait without spinning leave the cores to decoding and HTTP between forward passes:
    # more photos/s under concurrent requests (benchmarks/serve_compare.py)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except (InvalidProtobuf, InvalidArgument, InvalidGraph, Fail) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a readable ONNX model ({reason}): re-export it with "
                         f"`bincount export --model-dir {path.parent}`") from None


@dataclass
class CountingModel:
    """What :func:`~bincount.serve.inference.model_fn` returns: the network and everything needed to answer with it.

    Args:
        session: ONNX Runtime's session of ``model.onnx``: input ``images`` ``(N, 3, S, S)`` float32
            -> output ``logits`` ``(N, C)`` (with the card's test-time augmentation).
        card: The model's ``model_config.json``.
        preset: The eval preprocessing the network was trained with.
        temperature: Logits are divided by it before the softmax (1.0: uncalibrated).
        review_threshold: Verdicts below this calibrated confidence are ``"review"``.
        limits: Request limits.
    """

    session: ort.InferenceSession
    card: ModelCard
    preset: CountingPresetEval
    temperature: float
    review_threshold: float
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def load(cls, model_dir: str | Path, *, review_threshold: float | None = None, limits: Limits | None = None,
             device: str | None = None, threads: int | None = None) -> CountingModel:
        """Load an exported ``model/`` folder (its card and ``model.onnx``) and warm it up.

        Args:
            review_threshold: Overrides the calibrated threshold in ``model_config.json``.
            device: See :func:`inference_session`.
            threads: See :func:`inference_session`.

        Raises:
            FileNotFoundError: If a file of the folder is missing.
            ValueError: If ``model_config.json`` is malformed (one line naming the file and the
                field), ``model.onnx`` is not a readable ONNX model, or ``device`` cannot be used.
        """
        card = read_model_card(model_dir)
        model = cls(
            session=inference_session(model_dir, device, threads),
            card=card,
            preset=card.preset.build(),
            temperature=1.0 if card.calibration is None else card.calibration.temperature,
            review_threshold=review_threshold_of(card, review_threshold, where=model_dir),
            limits=limits or Limits(),
        )
        size = model.preset.image_size
        forward(model, torch.zeros(1, 3, size, size))  # first call allocates; keep that out of the first request
        return model


def review_threshold_of(card: ModelCard, review_threshold: float | None = None, *,
                        where: str | Path = "the model") -> float:
    """The confidence below which verdicts are ``"review"``: ``review_threshold`` if given, else the
    card's calibrated one, else :data:`~bincount.models.decoding.NEVER` (every verdict ``"review"``,
    with a warning naming ``where``, the model folder).
    """
    if review_threshold is None and card.calibration is not None:
        review_threshold = card.calibration.review_threshold
    if review_threshold is None:
        log.warning("%s has no calibrated review threshold and none was given: every verdict will be "
                    "'review' (retrain, or pass --review-threshold)", where)
        review_threshold = NEVER
    return float(review_threshold)


def preprocess(model: CountingModel, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """``uint8`` ``(3, H, W)`` photos -> the network's input batch ``(N, 3, S, S)`` float32."""
    return torch.stack([model.preset(img) for img in images])


def forward(model: CountingModel, batch: torch.Tensor) -> torch.Tensor:
    """Calibrated probabilities ``(N, C)`` (CPU, float32) of a preprocessed batch ``(N, 3, S, S)`` (CPU, float32)."""
    [logits] = model.session.run(["logits"], {"images": batch.contiguous().numpy()})
    return (torch.from_numpy(logits) / model.temperature).softmax(dim=1)


def verdict(count: int, confidence: float, expected: int, *, card: ModelCard, review_threshold: float) -> str:
    """``"match"``/``"mismatch"`` of ``count`` and ``expected`` when the model is confident enough, else ``"review"``.

    An expected quantity outside the card's ``min_count..max_count`` is always ``"review"``: the
    model cannot count it, so it cannot confirm or deny it.

    Args:
        confidence: The count's calibrated probability, in ``[0, 1]``.
        review_threshold: Confidences below it are ``"review"`` (:func:`review_threshold_of`).
    """
    if not card.min_count <= expected <= card.max_count or confidence < review_threshold:
        return "review"
    return "match" if count == expected else "mismatch"


def make_predictions(probs: torch.Tensor, expected: Sequence[int | None], model: CountingModel) -> list[dict]:
    """One answer per photo from calibrated probabilities.

    Args:
        probs: ``(N, C)`` calibrated probabilities of ``min_count..max_count`` objects.
        expected: ``N`` expected quantities, ``None`` where there is nothing to verify.

    Returns:
        ``[{"count", "probabilities", "confidence"[, "expected_quantity", "verdict"]}, ...]``;
        probabilities and confidence rounded to 6 decimals; the last two keys only with an
        expected quantity.
    """
    confidence, index = decode_counts(probs, model.card.decode)
    out = []
    for p, c, k, e in zip(probs.tolist(), confidence.tolist(), index.tolist(), expected):
        pred = {"count": model.card.min_count + k, "probabilities": [round(x, 6) for x in p], "confidence": round(c, 6)}
        if e is not None:
            pred["expected_quantity"] = e
            pred["verdict"] = verdict(pred["count"], c, e, card=model.card, review_threshold=model.review_threshold)
        out.append(pred)
    return out
