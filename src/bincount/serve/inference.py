"""SageMaker PyTorch inference handler: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``, ``transform_fn``.

``bincount serve`` (:mod:`bincount.serve.app`) runs ``model_fn``, ``input_fn``, ``predict_fn``
and ``output_fn`` behind FastAPI; the SageMaker PyTorch serving image runs ``model_fn`` and
``transform_fn``, which calls the other three and answers a client mistake as ``bincount
serve`` does, so a test of one is a test of both.

The SageMaker endpoint is configured by its environment, read when the handler runs (never at
import time): ``BINCOUNT_MAX_IMAGE_BYTES``, ``BINCOUNT_MAX_PIXELS``, ``BINCOUNT_MAX_INSTANCES``,
``BINCOUNT_ALLOWED_S3_PREFIXES`` (:class:`~bincount.serve.images.Limits`),
``BINCOUNT_REVIEW_THRESHOLD`` and ``BINCOUNT_BATCH_TRANSFORM`` (:class:`Settings`). ``bincount
serve`` starts from the same variables and lets its flags override them; it hands the result to
the handler functions in their ``context`` argument (:func:`settings_of`).

Usage:
    # the SageMaker PyTorch serving image: model.tar.gz = model.onnx, model.pt, model_config.json and code/
    mkdir -p pkg/code && cp outputs/RUN/model/* pkg/ && cp dist/bincount-*.whl pkg/code/
    echo 'from bincount.serve.inference import model_fn, transform_fn' > pkg/code/inference.py
    echo "/opt/ml/model/code/$(cd pkg/code && ls bincount-*.whl)[serve]" > pkg/code/requirements.txt
    tar -czf model.tar.gz -C pkg .

    # locally (and in Dockerfile), the same functions behind FastAPI
    bincount serve --model-dir outputs/RUN/model --port 8080

Requests: one JPEG or PNG photo, or a JSON body of photos (:mod:`bincount.serve.request`).
Answer (``application/json``)::

    {"predictions": [{"count": 3, "probabilities": [...], "confidence": 0.62,
                      "expected_quantity": 3, "verdict": "match"}, ...]}

``probabilities[i]`` is the calibrated probability of ``min_count + i`` objects; ``count`` is
decoded from them by the model's rule and ``confidence`` is its probability; ``verdict`` (only
with an expected quantity) is ``"match"``, ``"mismatch"`` or ``"review"``
(:func:`bincount.serve.model.verdict`).

A client mistake (a photo that cannot be read, a wrong header or body) is answered with its 4xx
and ``{"error": "<what was wrong>"}``; under Batch Transform (``BINCOUNT_BATCH_TRANSFORM=true``,
set by ``python -m sagemaker_launch.transform``) with 200 and the same body, so that one bad
photo neither fails the job nor loses the other photos' answers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from bincount.serve.errors import RequestError
from bincount.serve.images import Limits, env_value
from bincount.serve.model import CountingModel, make_predictions, probabilities
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
        batch_transform: The handler answers a Batch Transform job: a photo it cannot count (a
            client mistake, 4xx) is answered 200 with ``{"error": "..."}``, so that the job goes
            on and ``bincount transform collect`` makes it an error row. Off, it is answered
            with its 4xx, as an endpoint's caller expects.
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
    """The ``context`` ``bincount serve`` passes to the handler functions.

    The part of TorchServe's ``Context`` the handler reads (:func:`request_header`) and the
    server's settings (:func:`settings_of`).

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
    """Load the exported model.

    Args:
        model_dir: Folder with ``model.onnx``, ``model.pt`` and ``model_config.json`` (empty: ``$SM_MODEL_DIR``,
            else ``/opt/ml/model``).
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
        UnsupportedContentType: (415) Not JPEG, PNG, x-image or JSON.
        RequestError: (400) A bad photo, body or header; (403) an ``s3_uri`` outside
            ``BINCOUNT_ALLOWED_S3_PREFIXES``; the message says what was wrong.
        UpstreamError: (502) A photo's S3 object cannot be fetched because S3 is unreachable.
    """
    return decode_request(request_body, request_content_type, limits=settings_of(context).limits,
                          custom_attributes=request_header(context, CUSTOM_ATTRIBUTES))


def predict_fn(input_data: CountRequest, model: CountingModel, context: Any = None) -> list[dict]:
    """Count the objects in every photo of the request: one answer dict per photo."""
    return make_predictions(probabilities(model, input_data.images), input_data.expected, model)


def output_fn(prediction: list[dict], accept: str | None, context: Any = None) -> tuple[str, str]:
    """Serialise the answers.

    Returns:
        ``(body, content_type)``: ``{"predictions": [...]}`` as JSON.

    Raises:
        NotAcceptable: (406) If ``accept`` excludes JSON.
    """
    content_type = check_accept(accept)
    return json.dumps({"predictions": prediction}), content_type


def error_answer(err: RequestError, settings: Settings) -> tuple[int, dict]:
    """The status and JSON body that answer a client mistake: ``(err.status_code, {"error": message})``,
    with 200 for a 4xx when ``settings.batch_transform`` is on."""
    status = 200 if settings.batch_transform and err.status_code < 500 else err.status_code
    return status, {"error": err.message}


def transform_fn(model: CountingModel, request_body: bytes | str, request_content_type: str | None,
                 accept: str | None, context: Any = None) -> tuple[str, str]:
    """One request, as the SageMaker serving image's toolkit calls it: :func:`input_fn`,
    :func:`predict_fn`, :func:`output_fn`; a client mistake is answered here, not by the toolkit.

    The toolkit would answer the mistake's status with its message and a Python traceback as
    the body; here the body is ``{"error": "<what was wrong>"}``, as ``bincount serve`` answers,
    and the status the mistake's 4xx, or 200 under Batch Transform (:func:`error_answer`).

    Args:
        model: From :func:`model_fn`.
        request_body: The body.
        request_content_type: Its ``Content-Type``.
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
