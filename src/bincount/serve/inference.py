"""SageMaker PyTorch inference handler: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``.

The SageMaker PyTorch serving image loads these four functions; ``bincount serve``
(:mod:`bincount.serve.app`) calls the same ones, so what passes locally passes there. They need
torch, torchvision and Pillow only (no Hydra, no Lightning), and preprocess with the training
code's :class:`~bincount.data.transforms.CountingPresetEval`.

Usage:
    # the SageMaker PyTorch serving image: model.tar.gz = model.pt, model_config.json and code/
    mkdir -p pkg/code && cp outputs/RUN/model/* pkg/ && cp dist/bincount-*.whl pkg/code/
    echo 'from bincount.serve.inference import input_fn, model_fn, output_fn, predict_fn' > pkg/code/inference.py
    echo "/opt/ml/model/code/$(cd pkg/code && ls bincount-*.whl)[serve]" > pkg/code/requirements.txt
    tar -czf model.tar.gz -C pkg .

    # locally (and in serve/Dockerfile), the same functions behind FastAPI
    bincount serve --model-dir outputs/RUN/model --port 8080

Requests: ``image/jpeg``, ``image/png`` or ``application/x-image`` (one photo; an expected
quantity may come in the ``X-Amzn-SageMaker-Custom-Attributes`` header as
``expected_quantity=3``), or ``application/json``::

    {"instances": [{"image_b64": "..."}, {"s3_uri": "s3://bucket/key.jpg"}], "expected_quantity": [3, null]}

Answer (``application/json``)::

    {"predictions": [{"count": 3, "probabilities": [...], "confidence": 0.62,
                      "expected_quantity": 3, "verdict": "match"}, ...]}

``probabilities[i]`` is the calibrated probability of ``min_count + i`` objects; ``count`` is
decoded from them by the model's rule (``decode`` in ``model_config.json``, see
:func:`bincount.models.decoding.decode_counts`) and ``confidence`` is its probability; ``verdict``
(only with an expected quantity) is ``"match"``, ``"mismatch"`` or ``"review"`` (confidence
below the review threshold, or an expected quantity outside the model's count range).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype

from bincount.data.transforms import CountingPresetEval
from bincount.data.dataset import decoder_reason
from bincount.models.card import ModelCard
from bincount.models.decoding import NEVER, decode_counts, with_tta
from bincount.models.export import load_model_dir

try:  # inside the SageMaker serving image: make the toolkit answer with our status codes
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ToolkitError
except ImportError:

    class _ToolkitError(Exception):  # the toolkit's constructor, so both bases behave alike
        def __init__(self, status_code: int, message: str, phrase: str) -> None:
            self.status_code = status_code
            self.message = message
            self.phrase = phrase
            super().__init__(status_code, message, phrase)


log = logging.getLogger(__name__)

JSON = "application/json"
IMAGE_CONTENT_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "application/x-image": None}
CONTENT_TYPES = (*IMAGE_CONTENT_TYPES, JSON)
IMAGE_FORMATS = ("JPEG", "PNG")
ACCEPT_TYPES = (JSON, "application/*", "*/*")
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
DEFAULT_MODEL_DIR = "/opt/ml/model"


class RequestError(_ToolkitError):
    """A client mistake, answered with ``status_code`` and a message saying what was wrong.

    Also a ``sagemaker_inference`` toolkit error, so the SageMaker PyTorch image answers with
    the same status instead of a 500.
    """

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(status_code, message, message)

    def __str__(self) -> str:
        return self.message


class UnsupportedContentType(RequestError):
    """415: the body's content type is not one this handler reads."""

    def __init__(self, content_type: str | None) -> None:
        super().__init__(f"unsupported Content-Type {content_type!r}: send one of {', '.join(CONTENT_TYPES)}", 415)


class NotAcceptable(RequestError):
    """406: the client accepts no type this handler writes."""

    def __init__(self, accept: str | None) -> None:
        super().__init__(f"cannot answer with Accept {accept!r}: this endpoint answers {JSON}", 406)


class UpstreamError(RequestError):
    """502: a photo named by ``s3_uri`` could not be fetched because S3 is unreachable."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 502)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


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
        """Defaults overridden by ``BINCOUNT_MAX_IMAGE_BYTES``, ``BINCOUNT_MAX_PIXELS``, ``BINCOUNT_MAX_INSTANCES``."""
        return cls(
            max_image_bytes=_env_int("BINCOUNT_MAX_IMAGE_BYTES", cls.max_image_bytes),
            max_pixels=_env_int("BINCOUNT_MAX_PIXELS", cls.max_pixels),
            max_instances=_env_int("BINCOUNT_MAX_INSTANCES", cls.max_instances),
        )


@dataclass
class CountingModel:
    """What :func:`model_fn` returns: the network and everything needed to answer with it.

    Args:
        net: Backbone in eval mode (with the card's test-time augmentation), ``(N, 3, S, S)`` ->
            ``(N, C)`` logits.
        card: The model's ``model_config.json``.
        preset: The eval preprocessing the network was trained with.
        temperature: Logits are divided by it before the softmax (1.0: uncalibrated).
        review_threshold: Verdicts below this calibrated confidence are ``"review"``.
        limits: Request limits.
        device: Where ``net`` runs.
    """

    net: nn.Module
    card: ModelCard
    preset: CountingPresetEval
    temperature: float
    review_threshold: float
    limits: Limits = field(default_factory=Limits)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def min_count(self) -> int:
        return self.card.min_count

    @property
    def max_count(self) -> int:
        return self.card.max_count

    @classmethod
    def load(cls, model_dir: str | Path, *, review_threshold: float | None = None, limits: Limits | None = None,
             device: str | torch.device | None = None) -> CountingModel:
        """Load an exported ``model/`` folder (``torch.load(weights_only=True)``) and warm it up.

        Args:
            model_dir: Folder with ``model.pt`` and ``model_config.json``.
            review_threshold: Overrides the calibrated threshold in ``model_config.json``.
            limits: Request limits (default :class:`Limits`).
            device: Default: CUDA when available, else CPU.

        Raises:
            FileNotFoundError: If a file of the folder is missing.
            ValueError: If ``model_config.json`` is malformed (one line naming the file and the field).
            RuntimeError: If ``model.pt`` does not match the card.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net, card = load_model_dir(model_dir, map_location=device)
        net = with_tta(net, card.tta)
        calibration = card.calibration
        if review_threshold is None and calibration is not None:
            review_threshold = calibration.review_threshold
        if review_threshold is None:
            log.warning("%s has no calibrated review threshold and none was given: every verdict will be "
                        "'review' (retrain, or pass --review-threshold)", model_dir)
            review_threshold = NEVER
        model = cls(
            net=net.to(device, memory_format=torch.channels_last).eval(),  # as in training; ~25% faster on CPU
            card=card,
            preset=card.preset.build(),
            temperature=1.0 if calibration is None else calibration.temperature,
            review_threshold=float(review_threshold),
            limits=limits or Limits(),
            device=device,
        )
        size = model.preset.image_size
        forward(model, torch.zeros(1, 3, size, size))  # first call allocates; keep that out of the first request
        return model


@dataclass
class CountRequest:
    """Decoded photos and the quantities they are expected to hold.

    Args:
        images: ``uint8`` RGB tensors ``(3, H, W)``.
        expected: One per image: the expected count, or ``None`` (no verification).
    """

    images: list[torch.Tensor]
    expected: list[int | None]


def media_type(content_type: str | None) -> str:
    """``"Image/JPEG; charset=x"`` -> ``"image/jpeg"`` (``""`` for ``None``)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_accept(accept: str | None) -> str:
    """The content type to answer with.

    Args:
        accept: The ``Accept`` header (``None``, empty or ``*/*``: JSON).

    Returns:
        ``"application/json"``.

    Raises:
        NotAcceptable: If no media range of ``accept`` (with ``q > 0``) covers JSON.
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
    raise NotAcceptable(accept)


def read_image_header(data: bytes, *, limits: Limits, expected_format: str | None = None) -> tuple[str, int, int]:
    """Check an encoded photo's size and header without decoding its pixels (Pillow, lazy).

    Args:
        data: The encoded photo.
        limits: Size limits.
        expected_format: ``"JPEG"`` or ``"PNG"`` when the content type named one; ``None``: either.

    Returns:
        ``(format, width, height)``, width and height in pixels.

    Raises:
        RequestError: (400) Empty, over ``limits``, not a JPEG/PNG, or not the declared format.
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
    return fmt, width, height


def decode_image_pixels(data: bytes, fmt: str) -> torch.Tensor:
    """Decode the pixels of a photo whose header :func:`read_image_header` has checked.

    Decoded by torchvision, the decoder training uses.

    Args:
        data: The encoded photo.
        fmt: Its format, ``"JPEG"`` or ``"PNG"`` (for the error message).

    Returns:
        ``uint8`` RGB tensor ``(3, H, W)``.

    Raises:
        RequestError: (400) Truncated or corrupt pixels.
    """
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise RequestError(f"corrupt or truncated {fmt} image ({decoder_reason(err)})") from None
    return to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs: the 8 bits training photos have


def decode_image_bytes(data: bytes, *, limits: Limits, expected_format: str | None = None) -> torch.Tensor:
    """Check and decode one encoded photo: :func:`read_image_header`, then :func:`decode_image_pixels`.

    The header is read first, so a photo that declares too many pixels is refused before any
    memory is spent on it.

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


def parse_expected(value: Any, where: str) -> int | None:
    """An expected quantity from a request: a non-negative integer or ``None``.

    Raises:
        RequestError: (400) Any other value (booleans, floats and strings included).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RequestError(f"{where} must be a non-negative integer or null, got {json.dumps(value)}")
    return value


def parse_custom_attributes(header: str | None) -> int | None:
    """The expected quantity in ``X-Amzn-SageMaker-Custom-Attributes`` (``expected_quantity=3``).

    Pairs may be separated by ``;`` or ``,``; other keys are ignored.

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


_s3_clients: dict[int, Any] = {}
_s3_lock = threading.Lock()


def s3_client():
    """This process's S3 client (:func:`bincount.data.s3.make_client`; a forked worker makes its own).

    Endpoint and credentials come from the usual AWS sources (``AWS_ENDPOINT_URL`` included);
    without credentials the requests go unsigned, which reads public buckets such as ABID's.

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


def read_s3_object(uri: str, *, max_bytes: int) -> bytes:
    """The bytes of one S3 object.

    Raises:
        RequestError: (400) Bad URI, missing object or bucket, access denied, or over ``max_bytes``.
        UpstreamError: (502) S3 cannot be reached.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from bincount.data.s3 import explain, split_s3_uri

    try:
        bucket, key = split_s3_uri(uri)
    except ValueError as err:
        raise RequestError(str(err)) from None
    try:
        response = s3_client().get_object(Bucket=bucket, Key=key)
        with response["Body"] as body:
            if response["ContentLength"] > max_bytes:
                raise RequestError(f"{uri} is {response['ContentLength']} bytes; the limit is {max_bytes} bytes")
            return body.read()
    except ClientError as err:
        raise RequestError(str(explain(err, uri=uri))) from None
    except BotoCoreError as err:
        raise UpstreamError(str(explain(err, uri=uri))) from None


def _instance_bytes(instance: Any, limits: Limits) -> bytes:
    """The encoded photo of one JSON instance: ``{"image_b64": ...}`` or ``{"s3_uri": ...}``."""
    keys = set(instance) & {"image_b64", "s3_uri"} if isinstance(instance, dict) else set()
    if len(keys) != 1 or not isinstance(instance[next(iter(keys))], str):
        raise RequestError('must be an object with a string "image_b64" or "s3_uri" (not both)')
    if "s3_uri" in keys:
        return read_s3_object(instance["s3_uri"], max_bytes=limits.max_image_bytes)
    encoded = instance["image_b64"]
    if len(encoded) * 3 // 4 > limits.max_image_bytes + 3:  # 4 base64 characters per 3 bytes
        raise RequestError(f"image is over the limit of {limits.max_image_bytes} bytes")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"image_b64 is not valid base64 ({err})") from None


def decode_json(body: bytes | str, limits: Limits) -> CountRequest:
    """Decode ``{"instances": [{"image_b64"|"s3_uri": ...}, ...], "expected_quantity": [...]}``.

    Raises:
        RequestError: Malformed JSON, a wrong structure or type, or a bad photo (each message
            names the instance).
    """
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: absurd nesting
        raise RequestError(f"malformed JSON: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
        raise RequestError('JSON body must be an object with an "instances" list')
    instances = doc["instances"]
    if not 1 <= len(instances) <= limits.max_instances:
        raise RequestError(f'"instances" must hold 1 to {limits.max_instances} photos, got {len(instances)}')
    expected = doc.get("expected_quantity")
    if expected is None:
        expected = [None] * len(instances)
    elif not isinstance(expected, list) or len(expected) != len(instances):
        raise RequestError(f'"expected_quantity" must be a list with one entry (integer or null) per instance '
                           f"({len(instances)}), got {json.dumps(expected)[:100]}")
    counts = [parse_expected(e, f"expected_quantity[{i}]") for i, e in enumerate(expected)]
    images = []
    for i, inst in enumerate(instances):
        try:
            images.append(decode_image_bytes(_instance_bytes(inst, limits), limits=limits))
        except RequestError as err:
            raise RequestError(f"instances[{i}]: {err.message}", err.status_code) from None
    return CountRequest(images, counts)


def decode_request(body: bytes | str, content_type: str | None, *, limits: Limits,
                   custom_attributes: str | None = None) -> CountRequest:
    """Decode a request body of any supported content type.

    Args:
        body: Raw body (the SageMaker toolkit hands JSON over as ``str``).
        content_type: The ``Content-Type`` header.
        limits: Size limits.
        custom_attributes: The ``X-Amzn-SageMaker-Custom-Attributes`` header (single photos).

    Raises:
        UnsupportedContentType: (415) Not JPEG, PNG, x-image or JSON.
        RequestError: (400) See :func:`decode_image_bytes` and :func:`decode_json`.
    """
    kind = media_type(content_type)
    if kind in IMAGE_CONTENT_TYPES:
        data = body.encode() if isinstance(body, str) else bytes(body)
        image = decode_image_bytes(data, limits=limits, expected_format=IMAGE_CONTENT_TYPES[kind])
        return CountRequest([image], [parse_custom_attributes(custom_attributes)])
    if kind == JSON:
        return decode_json(body, limits)
    raise UnsupportedContentType(content_type)


def preprocess(model: CountingModel, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """``uint8`` ``(3, H, W)`` photos -> the network's input batch ``(N, 3, S, S)`` float32."""
    return torch.stack([model.preset(img) for img in images])


@torch.inference_mode()
def forward(model: CountingModel, batch: torch.Tensor) -> torch.Tensor:
    """Calibrated probabilities ``(N, C)`` (CPU, float32) of a preprocessed batch ``(N, 3, S, S)``."""
    logits = model.net(batch.to(model.device, memory_format=torch.channels_last, non_blocking=True))
    return (logits.float() / model.temperature).softmax(dim=1).cpu()


def probabilities(model: CountingModel, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Calibrated probabilities ``(N, C)`` of ``uint8`` ``(3, H, W)`` photos (:func:`preprocess`, :func:`forward`)."""
    return forward(model, preprocess(model, images))


def verdict(count: int, confidence: float, expected: int, *, model: CountingModel) -> str:
    """``"match"``/``"mismatch"`` when the model is confident enough, else ``"review"``.

    An expected quantity outside ``min_count..max_count`` is always ``"review"``: the model
    cannot count it, so it cannot confirm or deny it.
    """
    if not model.min_count <= expected <= model.max_count or confidence < model.review_threshold:
        return "review"
    return "match" if count == expected else "mismatch"


def make_predictions(probs: torch.Tensor, expected: Sequence[int | None], model: CountingModel) -> list[dict]:
    """One answer per photo from calibrated probabilities ``(N, C)``.

    Returns:
        ``[{"count", "probabilities", "confidence"[, "expected_quantity", "verdict"]}, ...]``;
        probabilities rounded to 6 decimals.
    """
    confidence, index = decode_counts(probs, model.card.decode)
    out = []
    for p, c, k, e in zip(probs.tolist(), confidence.tolist(), index.tolist(), expected):
        pred = {"count": model.min_count + k, "probabilities": [round(x, 6) for x in p], "confidence": round(c, 6)}
        if e is not None:
            pred["expected_quantity"] = e
            pred["verdict"] = verdict(model.min_count + k, c, e, model=model)
        out.append(pred)
    return out


def _request_header(context: Any, name: str) -> str | None:
    """A request header from the SageMaker toolkit's context (``None`` outside it)."""
    try:
        headers = context.request_processor[0].get_request_properties()
    except (AttributeError, IndexError, TypeError):
        return None
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


def model_fn(model_dir: str, context: Any = None) -> CountingModel:
    """Load the exported model (SageMaker contract).

    ``BINCOUNT_REVIEW_THRESHOLD`` overrides the calibrated review threshold; see
    :meth:`Limits.from_env` for the request limits.
    """
    threshold = os.environ.get("BINCOUNT_REVIEW_THRESHOLD")
    return CountingModel.load(model_dir or os.environ.get("SM_MODEL_DIR", DEFAULT_MODEL_DIR),
                              review_threshold=float(threshold) if threshold else None, limits=Limits.from_env())


def input_fn(request_body: bytes | str, request_content_type: str | None, context: Any = None) -> CountRequest:
    """Decode a request (SageMaker contract); limits from :meth:`Limits.from_env`.

    Raises:
        UnsupportedContentType: (415) See :func:`decode_request`.
        RequestError: (400) See :func:`decode_request`.
    """
    return decode_request(request_body, request_content_type, limits=Limits.from_env(),
                          custom_attributes=_request_header(context, CUSTOM_ATTRIBUTES))


def predict_fn(input_data: CountRequest, model: CountingModel, context: Any = None) -> list[dict]:
    """Count the objects in every photo of the request (SageMaker contract)."""
    return make_predictions(probabilities(model, input_data.images), input_data.expected, model)


def output_fn(prediction: list[dict], accept: str | None, context: Any = None) -> tuple[str, str]:
    """Serialise the answers (SageMaker contract).

    Returns:
        ``(body, content_type)``: ``{"predictions": [...]}`` as JSON.

    Raises:
        NotAcceptable: (406) If ``accept`` excludes JSON.
    """
    content_type = check_accept(accept)
    return json.dumps({"predictions": prediction}), content_type
