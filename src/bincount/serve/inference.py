"""SageMaker PyTorch inference handler: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``, ``transform_fn``.

The SageMaker PyTorch serving image runs ``model_fn`` and ``transform_fn``; ``bincount serve``
(:mod:`bincount.serve.app`) runs the other three behind FastAPI, so a test of one is a test of both.
The ``BINCOUNT_*`` variables configure them, read when the handler runs, never at import time
(:class:`Settings`). Answer (``application/json``; client mistakes: :func:`error_answer`)::

    {"predictions": [{"count": 3, "probabilities": [...], "confidence": 0.62,
                      "expected_quantity": 3, "verdict": "match"}, ...]}

Usage:
    # the SageMaker PyTorch serving image: model.tar.gz = model.onnx, model.pt, model_config.json and code/
    mkdir -p pkg/code && cp outputs/RUN/model/* pkg/ && cp dist/bincount-*.whl pkg/code/
    echo 'from bincount.serve.inference import model_fn, transform_fn' > pkg/code/inference.py
    echo "/opt/ml/model/code/$(cd pkg/code && ls bincount-*.whl)[serve]" > pkg/code/requirements.txt
    tar -czf model.tar.gz -C pkg .

    # locally (and in Dockerfile), the same functions behind FastAPI
    bincount serve --model-dir outputs/RUN/model --port 8080
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from bincount.serve.errors import RequestError
from bincount.serve.images import Limits, env_value
from bincount.serve.model import CountingModel, forward, make_predictions, preprocess
from bincount.serve.request import CUSTOM_ATTRIBUTES, CountRequest, check_accept, decode_request


@dataclass(frozen=True)
class Settings:
    """How the handler functions serve.

    Args:
        limits: Request limits.
        review_threshold: Overrides the calibrated review threshold of ``model_config.json``
            (``None``: the calibrated one).
        device: Where the network runs (``None``: CUDA when onnxruntime has it, else CPU).
        threads: Intra-op threads of the forward pass (``None``: ONNX Runtime's, one per physical core).
        batch_transform: The handler answers a Batch Transform job (:func:`error_answer`).
    """

    limits: Limits = field(default_factory=Limits)
    review_threshold: float | None = None
    device: str | None = None
    threads: int | None = None
    batch_transform: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        """:meth:`Limits.from_env`, ``BINCOUNT_REVIEW_THRESHOLD`` and ``BINCOUNT_BATCH_TRANSFORM``.

        Raises:
            ValueError: If a variable is set but malformed.
        """
        return cls(limits=Limits.from_env(), review_threshold=env_value("BINCOUNT_REVIEW_THRESHOLD", float),
                   batch_transform=env_value("BINCOUNT_BATCH_TRANSFORM", bool, False))

    def override(self, **values: Any) -> Settings:
        """A copy with the values that are not ``None`` replaced (command-line flags over the environment)."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


def settings_of(context: Any) -> Settings:
    """The settings a handler function runs with: ``context.settings`` when the caller gave some
    (``bincount serve``), else :meth:`Settings.from_env` (the SageMaker image's context has none).
    """
    settings = getattr(context, "settings", None)
    return settings if isinstance(settings, Settings) else Settings.from_env()


def request_header(context: Any, name: str) -> str | None:
    """A request header from the handler's ``context`` (TorchServe's ``Context``, whose
    ``request_processor[0].get_request_properties()`` holds the headers); ``None`` without one."""
    try:
        headers = context.request_processor[0].get_request_properties()
    except (AttributeError, IndexError, TypeError):
        return None
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


class HandlerContext:
    """The ``context`` ``bincount serve`` passes to the handler functions: the part of TorchServe's
    ``Context`` they read (:func:`request_header`) and the server's settings (:func:`settings_of`).

    Args:
        settings: The server's settings.
        headers: The request's headers (none for ``model_fn``).
    """

    def __init__(self, settings: Settings, headers: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.headers = dict(headers or {})
        self.request_processor = [self]

    def get_request_properties(self) -> dict[str, str]:
        return self.headers


def model_fn(model_dir: str, context: Any = None) -> CountingModel:
    """Load the exported model from ``model_dir`` (empty: ``$SM_MODEL_DIR``, else ``/opt/ml/model``).

    Args:
        context: TorchServe's context, or one with ``settings`` (:func:`settings_of`).

    Raises:
        FileNotFoundError: If a file of the folder is missing.
        ValueError: If ``model_config.json`` or a ``BINCOUNT_*`` variable is malformed.
    """
    settings = settings_of(context)
    return CountingModel.load(model_dir or os.environ.get("SM_MODEL_DIR", "/opt/ml/model"),
                              review_threshold=settings.review_threshold, limits=settings.limits,
                              device=settings.device, threads=settings.threads)


def input_fn(request_body: bytes | str, request_content_type: str | None, context: Any = None) -> CountRequest:
    """Decode a request; an image's expected quantity comes from the custom attributes header in ``context``.

    Raises:
        RequestError: (400) A bad photo, body or header; (403) an ``s3_uri`` outside
            ``BINCOUNT_ALLOWED_S3_PREFIXES``; (415) not JPEG, PNG, x-image or JSON; (502) a photo's
            S3 object cannot be fetched because S3 is unreachable. The message says what was wrong.
    """
    return decode_request(request_body, request_content_type, limits=settings_of(context).limits,
                          custom_attributes=request_header(context, CUSTOM_ATTRIBUTES))


def predict_fn(input_data: CountRequest, model: CountingModel, context: Any = None) -> list[dict]:
    """Count the objects in every photo of the request: one answer dict per photo."""
    return make_predictions(forward(model, preprocess(model, input_data.images)), input_data.expected, model)


def output_fn(prediction: list[dict], accept: str | None, context: Any = None) -> tuple[str, str]:
    """Serialise the answers: ``(body, content_type)``, ``{"predictions": [...]}`` as JSON.

    Raises:
        RequestError: (406) If ``accept`` excludes JSON.
    """
    content_type = check_accept(accept)
    return json.dumps({"predictions": prediction}), content_type


def error_answer(err: RequestError, settings: Settings) -> tuple[int, dict]:
    """The status and JSON body that answer a client mistake: ``(err.status_code, {"error": message})``,
    with 200 for a 4xx when ``settings.batch_transform`` is on, so that one bad photo neither fails a
    Batch Transform job nor loses the other photos' answers (``bincount transform collect`` makes it
    an error row)."""
    status = 200 if settings.batch_transform and err.status_code < 500 else err.status_code
    return status, {"error": err.message}


def transform_fn(model: CountingModel, request_body: bytes | str, request_content_type: str | None,
                 accept: str | None, context: Any = None) -> tuple[str, str]:
    """One request, as the SageMaker serving image's toolkit calls it: :func:`input_fn`,
    :func:`predict_fn`, :func:`output_fn`; a client mistake is answered here as ``bincount serve``
    answers it (:func:`error_answer`), not with the toolkit's traceback body.

    Args:
        accept: The ``Accept`` header (the toolkit's default when the request had none).
        context: TorchServe's context: its request headers, and ``set_response_status``.

    Returns:
        ``(body, content_type)``: the answer or the error, as JSON.

    Raises:
        Exception: Anything but a :class:`~bincount.serve.errors.RequestError` (a server fault:
            the toolkit answers 500).
    """
    try:
        return output_fn(predict_fn(input_fn(request_body, request_content_type, context), model, context),
                         accept, context)
    except RequestError as err:
        status, body = error_answer(err, settings_of(context))
        if context is not None and status != 200:
            context.set_response_status(code=status, phrase=err.message)  # TorchServe's Context
        return json.dumps(body), "application/json"
