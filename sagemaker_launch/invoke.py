"""``python -m sagemaker_launch.deploy invoke``: ask an endpoint for counts, in JSON bodies split to fit InvokeEndpoint
(:func:`max_request_bytes`) and the handler's photo limit.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sagemaker_launch import serving_models

log = logging.getLogger("sagemaker_launch")

# the JSON request, {"instances": [...], "expected_quantity": [...]}, assembled from encoded
# pieces so that its size is known exactly before it is built (json.dumps' separators)
_HEAD, _MID, _TAIL, _SEP = '{"instances": [', '], "expected_quantity": [', "]}", ", "


@functools.cache
def max_request_bytes() -> int:
    """InvokeEndpoint's largest request body in bytes (6 MiB), from botocore's service model (which
    botocore's parameter validation does not check; SageMaker refuses a larger body)."""
    import botocore.session

    runtime = botocore.session.get_session().get_service_model("sagemaker-runtime")
    return int(runtime.operation_model("InvokeEndpoint").input_shape.members["Body"].metadata["max"])


def instance_json(photo: str) -> str:
    """One photo's entry of the JSON request: ``{"image_b64": ...}`` (local file) or ``{"s3_uri": ...}``."""
    if photo.startswith("s3://"):
        return json.dumps({"s3_uri": photo})
    return json.dumps({"image_b64": base64.b64encode(Path(photo).read_bytes()).decode()})


def request_body(photos: list[str], expected_quantity: int | None = None) -> str:
    """The handler's JSON request for ``photos`` (:mod:`bincount.serve.inference`),
    ``{"instances": [{"image_b64": ...} or {"s3_uri": ...}], "expected_quantity": [...]}``: local files
    inline as base64, ``s3://`` URIs by reference. ASCII only, so its length in characters is its size in bytes.
    """
    expected = _SEP.join([json.dumps(expected_quantity)] * len(photos))
    return _HEAD + _SEP.join(instance_json(p) for p in photos) + _MID + expected + _TAIL


def split_requests(photos: list[str], expected_quantity: int | None = None, *, max_bytes: int,
                   max_photos: int) -> list[list[str]]:
    """Split ``photos`` into consecutive groups whose :func:`request_body` fits the limits.

    Args:
        photos: Local files or ``s3://`` URIs.
        expected_quantity: Sent for every photo (``None``: ``null``).
        max_bytes: Largest request body, bytes (InvokeEndpoint: :func:`max_request_bytes`).
        max_photos: Most photos in one request (the handler's ``BINCOUNT_MAX_INSTANCES``).

    Returns:
        The groups, in order, each taking as many photos as fit; together exactly ``photos``, so the
        groups' answers concatenated are in the photos' order.

    Raises:
        ValueError: ``max_photos`` below 1, or a photo whose request alone is over ``max_bytes``.
    """
    if max_photos < 1:
        raise ValueError(f"max_photos={max_photos}: a request must be allowed at least one photo")
    empty, expected, sep = len(_HEAD + _MID + _TAIL), len(json.dumps(expected_quantity)), 2 * len(_SEP)
    groups: list[list[str]] = []
    group: list[str] = []
    size = empty
    for photo in photos:
        entry = len(instance_json(photo)) + expected
        if empty + entry > max_bytes:
            raise ValueError(f"{photo}: its request alone is {empty + entry} bytes (a photo grows by 4/3 as base64), "
                             f"over the limit of {max_bytes} bytes; upload it to S3 and pass its s3:// URI instead")
        if group and (size + sep + entry > max_bytes or len(group) == max_photos):
            groups.append(group)
            group, size = [], empty
        size += entry + (sep if group else 0)
        group.append(photo)
    if group:
        groups.append(group)
    return groups


def invoke_endpoint(cfg: DictConfig, photos: list[str]) -> dict[str, Any]:
    """Ask endpoint ``cfg.endpoint`` for the count of every photo, in as few JSON requests
    (:func:`request_body`) as fit (:func:`split_requests`); every photo is checked to fit before the
    first request is sent.

    Args:
        cfg: ``conf/deploy.yaml``.
        photos: Local JPEG/PNG files, or ``s3://`` URIs the endpoint's role can read.

    Returns:
        ``{"predictions": [{"count": ..., ...}, ...]}``, one per photo in the photos' order.

    Raises:
        ValueError: No ``endpoint=``, no photo, or a photo too large for a request.
        RuntimeError: If the endpoint answers a request with a different number of predictions.
    """
    from sagemaker.core.resources import Endpoint

    if not cfg.endpoint or not photos:
        raise ValueError("invoke needs endpoint=NAME and at least one photo")
    groups = split_requests(photos, cfg.expected_quantity, max_bytes=max_request_bytes(),
                            max_photos=int(cfg.max_photos_per_request))
    if len(groups) > 1:
        log.info("%d photos in %d requests (InvokeEndpoint takes at most %d bytes, the handler %d photos)",
                 len(photos), len(groups), max_request_bytes(), cfg.max_photos_per_request)
    session = serving_models.boto_session(cfg)
    endpoint = Endpoint.get(endpoint_name=cfg.endpoint, session=session, region=cfg.region)
    predictions = []
    for group in groups:
        out = endpoint.invoke(body=request_body(group, cfg.expected_quantity), content_type="application/json",
                              accept="application/json", session=session, region=cfg.region)
        answer = json.loads(out.body.read() if hasattr(out.body, "read") else out.body)
        got = answer.get("predictions", [])
        if len(got) != len(group):
            raise RuntimeError(f"endpoint {cfg.endpoint} answered {len(got)} predictions for {len(group)} photos")
        for photo, prediction in zip(group, got):
            verdict = f" ({prediction['verdict']})" if prediction.get("verdict") else ""
            print(f"{photo}: count {prediction.get('count')}{verdict}  {json.dumps(prediction)}")
        predictions.extend(got)
    return {"predictions": predictions}
