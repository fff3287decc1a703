"""The client mistakes the handler reports, each with the HTTP status it is answered with.

Every error is also a ``sagemaker_inference`` toolkit error when the toolkit is installed (the
SageMaker PyTorch serving image), so the endpoint answers with the same status and message as
``bincount serve`` instead of a 500.
"""

from __future__ import annotations

try:
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ToolkitError
except ImportError:

    class _ToolkitError(Exception):  # the toolkit's constructor, so both bases behave alike
        def __init__(self, status_code: int, message: str, phrase: str) -> None:
            self.status_code = status_code
            self.message = message
            self.phrase = phrase
            super().__init__(status_code, message, phrase)


class RequestError(_ToolkitError):
    """A client mistake, answered with ``status_code`` and a one-line message saying what was wrong.

    Args:
        message: What was wrong; the toolkit also sends it as the status phrase.
        status_code: HTTP status, 4xx (502 for :class:`UpstreamError`).
    """

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(status_code, message, message)

    def __str__(self) -> str:
        return self.message


class UnsupportedContentType(RequestError):
    """415: the body's content type is not one the handler reads.

    Args:
        content_type: The request's ``Content-Type`` header.
        supported: The media types the handler reads.
    """

    def __init__(self, content_type: str | None, supported: tuple[str, ...]) -> None:
        super().__init__(f"unsupported Content-Type {content_type!r}: send one of {', '.join(supported)}", 415)


class NotAcceptable(RequestError):
    """406: the client accepts no type the handler writes.

    Args:
        accept: The request's ``Accept`` header.
        answered: The media type the handler writes.
    """

    def __init__(self, accept: str | None, answered: str) -> None:
        super().__init__(f"cannot answer with Accept {accept!r}: this endpoint answers {answered}", 406)


class UpstreamError(RequestError):
    """502: a photo named by ``s3_uri`` could not be fetched because S3 is unreachable."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 502)
