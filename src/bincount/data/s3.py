"""S3 access shared by ``bincount data fetch``, ``bincount data prepare`` and the streaming datamodule.

The endpoint is ``endpoint_url`` when given, else ``AWS_ENDPOINT_URL`` (which boto3 and litdata
read too), else AWS itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

log = logging.getLogger(__name__)

ENDPOINT_ENV = "AWS_ENDPOINT_URL"
UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError)


class S3Error(RuntimeError):
    """An S3 request failed for a reason that retrying does not fix; the message says what to do."""


def is_s3_uri(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` is an ``s3://bucket/...`` address (anything else is a local path)."""
    return str(uri).startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``"s3://bucket/a/b/"`` -> ``("bucket", "a/b")``.

    Raises:
        ValueError: If ``uri`` is not ``s3://<bucket>[/<prefix>]``.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{uri!r} is not an S3 URI: expected s3://BUCKET/PREFIX")
    return parsed.netloc, parsed.path.strip("/")


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI with ``/``."""
    if is_s3_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """``endpoint_url`` if given, else ``$AWS_ENDPOINT_URL``, else ``None`` (AWS)."""
    return endpoint_url or os.environ.get(ENDPOINT_ENV) or None


def make_client(
    *,
    endpoint_url: str | None = None,
    anonymous: bool = False,
    retry_mode: str = "standard",
    max_attempts: int = 5,
    max_pool_connections: int = 10,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
):
    """A boto3 S3 client whose retries are botocore's (no hand-written retry loops).

    Args:
        endpoint_url: S3-compatible endpoint; default ``$AWS_ENDPOINT_URL`` or AWS.
        anonymous: Send unsigned requests (public buckets such as ``aft-vbi-pds``; no credentials).
        retry_mode: botocore retry mode: ``standard``, ``adaptive`` or ``legacy``.
        max_attempts: Attempts per request including the first.
        max_pool_connections: HTTP connections kept open; at least the number of threads using it.
        connect_timeout: Seconds to wait for a connection.
        read_timeout: Seconds to wait for data on an open connection.

    Raises:
        ValueError: If ``max_attempts < 1``.
        botocore.exceptions.InvalidRetryModeError: If ``retry_mode`` is not a botocore mode.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts={max_attempts} must be >= 1")
    config = Config(
        retries={"mode": retry_mode, "max_attempts": max_attempts},
        max_pool_connections=max_pool_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        signature_version=UNSIGNED if anonymous else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=resolve_endpoint(endpoint_url), config=config)


def error_code(err: ClientError) -> str:
    """The S3 error code of ``err`` (``NoSuchKey``, ``AccessDenied``, ``404`` for HEAD requests, ...)."""
    return str(err.response.get("Error", {}).get("Code", ""))


def is_not_found(err: BaseException) -> bool:
    """Whether ``err`` says the object does not exist (``NoSuchKey`` or a HEAD 404)."""
    return isinstance(err, ClientError) and error_code(err) in ("NoSuchKey", "404", "NotFound")


def explain(err: BaseException, *, uri: str, endpoint_url: str | None = None) -> S3Error:
    """Turn a boto3/botocore failure on ``uri`` into an :class:`S3Error` that says what to do.

    Covers a missing bucket or key, refused access, rejected or missing credentials and an
    unreachable endpoint; anything else keeps botocore's own message.
    """
    where = resolve_endpoint(endpoint_url) or "AWS S3"
    if isinstance(err, ClientError):
        code = error_code(err)
        if code in ("NoSuchBucket",) or (code == "404" and "/" not in uri.removeprefix("s3://").strip("/")):
            return S3Error(f"{uri}: the bucket does not exist at {where} (NoSuchBucket); create it or fix the URI")
        if code in ("NoSuchKey", "404", "NotFound"):
            return S3Error(f"{uri} does not exist at {where} ({code})")
        if code in ("AccessDenied", "403", "AllAccessDisabled", "Forbidden"):
            return S3Error(
                f"{uri}: access denied at {where} ({code}). Check the credentials boto3 finds "
                "(AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the bucket policy; "
                "a missing bucket, or a missing key where listing is not allowed, also answers AccessDenied"
            )
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return S3Error(f"{uri}: credentials rejected by {where} ({code}); refresh or fix them")
        return S3Error(f"{uri}: S3 request failed at {where}: {err}")
    if isinstance(err, UNREACHABLE):
        return S3Error(
            f"{uri}: cannot reach the S3 endpoint {where} ({err}); check --endpoint-url / "
            f"{ENDPOINT_ENV} and the network"
        )
    if isinstance(err, NoCredentialsError):
        return S3Error(
            f"{uri}: no AWS credentials found for a signed request; configure them "
            "(aws configure, AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
        )
    if isinstance(err, BotoCoreError):
        return S3Error(f"{uri}: S3 request failed at {where}: {err}")
    return S3Error(f"{uri}: {err}")


def read_bytes(uri: str, *, endpoint_url: str | None = None) -> bytes:
    """Read a whole object (``s3://...``) or local file.

    Raises:
        FileNotFoundError: If the object or file does not exist.
        S3Error: For any other S3 failure (see :func:`explain`).
    """
    if not is_s3_uri(uri):
        return Path(uri).read_bytes()
    bucket, key = split_s3_uri(uri)
    client = make_client(endpoint_url=endpoint_url)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except (ClientError, BotoCoreError) as err:
        if is_not_found(err):
            raise FileNotFoundError(f"{uri} does not exist at {resolve_endpoint(endpoint_url) or 'AWS S3'}") from None
        raise explain(err, uri=uri, endpoint_url=endpoint_url) from None


def exists(uri: str, *, endpoint_url: str | None = None, client=None) -> bool:
    """Whether an object (``s3://...``) or local file exists.

    Raises:
        S3Error: If the bucket is missing, access is refused or the endpoint is unreachable.
    """
    if not is_s3_uri(uri):
        return Path(uri).exists()
    bucket, key = split_s3_uri(uri)
    client = client or make_client(endpoint_url=endpoint_url)
    try:
        client.head_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as err:
        if is_not_found(err):
            return False
        raise explain(err, uri=uri, endpoint_url=endpoint_url) from None
    return True


def check_bucket(uri: str, *, endpoint_url: str | None = None, client=None) -> None:
    """Fail early, with a clear message, if the bucket of ``uri`` cannot be used.

    Raises:
        S3Error: If the bucket does not exist, access is refused, the credentials are rejected
            or the endpoint is unreachable.
    """
    bucket, _ = split_s3_uri(uri)
    client = client or make_client(endpoint_url=endpoint_url)
    try:
        client.head_bucket(Bucket=bucket)
    except (ClientError, BotoCoreError) as err:
        raise explain(err, uri=f"s3://{bucket}", endpoint_url=endpoint_url) from None


def list_objects(uri: str, *, suffixes: tuple[str, ...] = ("",), endpoint_url: str | None = None,
                 client=None) -> list[str]:
    """The ``s3://`` URIs of the objects under the prefix ``uri`` whose keys end with one of
    ``suffixes`` (any case), sorted by key; ``s3://bucket/a/`` does not match ``a-old/``.

    Raises:
        ValueError: If ``uri`` is not an S3 URI.
        S3Error: If the prefix cannot be listed (see :func:`explain`).
    """
    bucket, _ = split_s3_uri(uri)
    prefix = uri[len(f"s3://{bucket}/"):]  # as given, trailing "/" included
    client = client or make_client(endpoint_url=endpoint_url)
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", ())]
    except (ClientError, BotoCoreError) as err:
        raise explain(err, uri=uri, endpoint_url=endpoint_url) from None
    return [f"s3://{bucket}/{key}" for key in sorted(keys) if key.lower().endswith(suffixes)]


def upload_tree(local_dir: Path, uri: str, *, endpoint_url: str | None = None, client=None,
                progress: bool = True, last: Sequence[str] = ()) -> int:
    """Upload every file under ``local_dir`` to ``uri`` (same relative keys); ``last`` goes last.

    Chunks go before each ``index.json``, so a reader never sees an index with missing chunks.

    Returns:
        Bytes uploaded.

    Raises:
        S3Error: If an upload fails after botocore's retries (see :func:`explain`).
    """
    from boto3.s3.transfer import TransferConfig
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    bucket, prefix = split_s3_uri(uri)
    client = client or make_client(endpoint_url=endpoint_url)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    order = {name: i + 2 for i, name in enumerate(last)}
    files.sort(key=lambda p: (order.get(p.relative_to(local_dir).as_posix(), 1 if p.name == "index.json" else 0)))
    total = sum(p.stat().st_size for p in files)
    config = TransferConfig(max_concurrency=8)
    with Progress(TextColumn("upload"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  disable=not progress) as bar:
        task = bar.add_task(uri, total=total)
        for path in files:
            key = "/".join(filter(None, [prefix, path.relative_to(local_dir).as_posix()]))
            try:
                client.upload_file(str(path), bucket, key, Config=config,
                                   Callback=lambda n: bar.advance(task, n))
            except (ClientError, BotoCoreError) as err:
                raise explain(err, uri=f"s3://{bucket}/{key}", endpoint_url=endpoint_url) from None
            except boto3.exceptions.S3UploadFailedError as err:  # wraps the ClientError
                cause = err.__cause__ or err.__context__
                if isinstance(cause, (ClientError, BotoCoreError)):
                    raise explain(cause, uri=f"s3://{bucket}/{key}", endpoint_url=endpoint_url) from None
                raise
    return total
