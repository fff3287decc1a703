"""SageMaker PyTorch inference handler: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``.

The SageMaker PyTorch serving image loads these four functions; ``bincount serve``
(:mod:`bincount.serve.app`) runs the same ones behind FastAPI, so a test of one is a test of
both. Settings come from the environment (:mod:`bincount.serve.settings`) unless the caller's
``context`` carries some.

Usage:
    # the SageMaker PyTorch serving image: model.tar.gz = model.pt, model_config.json and code/
    mkdir -p pkg/code && cp outputs/RUN/model/* pkg/ && cp dist/bincount-*.whl pkg/code/
    echo 'from bincount.serve.inference import input_fn, model_fn, output_fn, predict_fn' > pkg/code/inference.py
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
"""

from __future__ import annotations

import json
import os
from typing import Any

from bincount.serve.model import CountingModel, probabilities
from bincount.serve.protocol import CUSTOM_ATTRIBUTES, check_accept, request_header
from bincount.serve.request import CountRequest, decode_request
from bincount.serve.settings import settings_of
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
        RequestError: (400) A bad photo, body or header; the message says what was wrong.
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
