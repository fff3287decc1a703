"""The client mistakes the handler reports, each with the HTTP status it is answered with.

A ``sagemaker_inference`` toolkit error when the toolkit is installed (the SageMaker PyTorch
serving image), so the endpoint answers with the same status and message instead of a 500.
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
        status_code: HTTP status: 4xx, or 502 when S3 cannot be reached.
    """

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(status_code, message, message)

    def __str__(self) -> str:
        return self.message
