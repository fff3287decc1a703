"""Photos named by ``s3_uri``: one S3 client per process, and errors the client can act on."""

from __future__ import annotations

import os
import threading
from typing import Any

from bincount.serve.errors import RequestError, UpstreamError

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


def check_s3_allowed(uri: str, allowed: tuple[tuple[str, str], ...] | None) -> None:
    """Refuse an ``s3_uri`` outside the S3 prefixes the operator allows, before anything is sent to S3.

    Args:
        uri: ``s3://bucket/key`` as the request named it.
        allowed: ``(bucket, key prefix)`` pairs
            (:attr:`~bincount.serve.settings.Limits.allowed_s3_prefixes`); ``None``: allow any.

    Raises:
        RequestError: (400) ``uri`` is not an S3 URI; (403) it names an object under none of
            ``allowed``, or its key has a ``.`` or ``..`` segment (while ``allowed`` is set).
    """
    from bincount.data.s3 import split_s3_uri

    if allowed is None:
        return
    try:
        bucket, key = split_s3_uri(uri)  # the bucket and key read_s3_object would read
    except ValueError as err:
        raise RequestError(str(err)) from None
    if any(part in (".", "..") for part in key.split("/")) or not any(
            bucket == allowed_bucket and key.startswith(prefix) for allowed_bucket, prefix in allowed):
        raise RequestError(f"s3_uri {uri!r} is outside the S3 prefixes this server may read", 403)


def read_s3_object(uri: str, *, max_bytes: int) -> bytes:
    """The bytes of one S3 object.

    Args:
        uri: ``s3://bucket/key``.
        max_bytes: Largest object accepted, bytes.

    Raises:
        RequestError: (400) Bad URI (botocore's own checks of the bucket name and key included),
            missing object or bucket, access denied, or over ``max_bytes``.
        UpstreamError: (502) S3 cannot be reached.
    """
    from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

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
    except ParamValidationError as err:  # refused before sending: the request's fault, not S3's
        raise RequestError(f"s3_uri {uri!r}: " + " ".join(str(err).replace("Parameter validation failed:", "").split())) from None
    except BotoCoreError as err:
        raise UpstreamError(str(explain(err, uri=uri))) from None
