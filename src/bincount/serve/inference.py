"""SageMaker PyTorch inference handler: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``, ``transform_fn``.

``bincount serve`` (:mod:`bincount.serve.app`) runs ``model_fn``, ``input_fn``, ``predict_fn``
and ``output_fn`` behind FastAPI; the SageMaker PyTorch serving image runs ``model_fn`` and
``transform_fn``, which calls the other three and answers a client mistake as ``bincount
serve`` does, so a test of one is a test of both. Settings come from the environment
(:mod:`bincount.serve.settings`) unless the caller's ``context`` carries some.

Usage:
    # the SageMaker PyTorch serving image: model.tar.gz = model.pt, model_config.json and code/
    mkdir -p pkg/code && cp outputs/RUN/model/* pkg/ && cp dist/bincount-*.whl pkg/code/
    echo 'from bincount.serve.inference import model_fn, transform_fn' > pkg/code/inference.py
    echo "/opt/ml/model/code/$(cd pkg/code && ls bincount-*.whl)[serve]" > pkg/code/requirements.txt
    tar -czf model.tar.gz -C pkg .

    # locally (and in serve/Dockerfile), the same functions behind FastAPI
    bincount serve --model-dir outputs/RUN/model --port 8080

Requests (:mod:`bincount.serve.protocol`, :mod:`bincount.serve.schema`): one JPEG or PNG photo,
or ``{"instances": [{"image_b64": "..."}, {"s3_uri": "s3://bucket/key.jpg"}], "expected_quantity": [3, null]}``.
Answer (``application/json``)::

    {"predictions": [{"count": 3, "probabilities": [...], "confidence": 0.62,
                      "expected_quantity": 3, "verdict": "match"}, ...]}

``probabilities[i]`` is the calibrated probability of ``min_count + i`` objects; ``count`` is
decoded from them by the model's rule and ``confidence`` is its probability; ``verdict`` (only
with an expected quantity) is ``"match"``, ``"mismatch"`` or ``"review"``
(:func:`bincount.serve.verdict.verdict`).

A client mistake (a photo that cannot be read, a wrong header or body) is answered with its 4xx
and ``{"error": "<what was wrong>"}``; under Batch Transform (``BINCOUNT_BATCH_TRANSFORM=true``,
set by ``python -m sagemaker_launch.transform``) with 200 and the same body, so that one bad
photo neither fails the job nor loses the other photos' answers.
"""

from __future__ import annotations

import json
import os
from typing import Any

from bincount.serve.errors import RequestError
from bincount.serve.model import CountingModel, probabilities
from bincount.serve.protocol import CUSTOM_ATTRIBUTES, check_accept, request_header
from bincount.serve.request import CountRequest, decode_request
from bincount.serve.settings import Settings, settings_of
from bincount.serve.verdict import make_predictions

DEFAULT_MODEL_DIR = "/opt/ml/model"


def model_fn(model_dir: str, context: Any = None) -> CountingModel:
    """Load the exported model.

    Args:
        model_dir: Folder with ``model.pt`` and ``model_config.json`` (empty: ``$SM_MODEL_DIR``,
            else ``/opt/ml/model``).
        context: TorchServe's context, or one with ``settings`` (:func:`~bincount.serve.settings.settings_of`).

    Raises:
        FileNotFoundError: If a file of the folder is missing.
        ValueError: If ``model_config.json`` or a ``BINCOUNT_*`` variable is malformed.
    """
    settings = settings_of(context)
    return CountingModel.load(model_dir or os.environ.get("SM_MODEL_DIR", DEFAULT_MODEL_DIR),
                              review_threshold=settings.review_threshold, limits=settings.limits,
                              device=settings.device)


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
