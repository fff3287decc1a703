"""The JSON request body, as a pydantic model::

    {"instances": [{"image_b64": "..."}, {"s3_uri": "s3://bucket/key.jpg"}], "expected_quantity": [3, null]}

:func:`parse_json_body` turns pydantic's first validation error into a one-line 400 that names
the field, e.g. ``instances[1]: must be an object with a string "image_b64" or "s3_uri" (not
both)`` or ``expected_quantity[0] must be a non-negative integer or null, got "3"``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, Field, StrictInt, StrictStr, ValidationError, ValidationInfo, field_validator, \
    model_validator

from bincount.serve.errors import RequestError

BODY_SHAPE = 'JSON body must be an object with an "instances" list'
INSTANCE_SHAPE = 'must be an object with a string "image_b64" or "s3_uri" (not both)'


class Instance(BaseModel):
    """One photo: its encoded bytes in base64, or the S3 URI of its object (exactly one of them).

    Other keys are ignored.
    """

    image_b64: StrictStr | None = None
    s3_uri: StrictStr | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Instance:
        if (self.image_b64 is None) == (self.s3_uri is None):
            raise ValueError(INSTANCE_SHAPE)
        return self


class CountRequestBody(BaseModel):
    """Photos to count and, optionally, the quantity each is expected to hold.

    Validate with ``context={"max_instances": n}`` to limit the number of photos.

    Attributes:
        instances: 1 to ``max_instances`` photos.
        expected_quantity: One entry per instance, a non-negative integer or ``None`` (no
            verification); ``None`` for all of them when absent.
    """

    instances: list[Instance]
    expected_quantity: list[Annotated[StrictInt, Field(ge=0)] | None] | None = None

    @field_validator("instances", mode="before")
    @classmethod
    def _within_limit(cls, value: Any, info: ValidationInfo) -> Any:
        # before the photos are validated: a request over the limit is refused as a whole
        limit = (info.context or {}).get("max_instances")
        if isinstance(value, list) and limit is not None and not 1 <= len(value) <= limit:
            raise ValueError(f'"instances" must hold 1 to {limit} photos, got {len(value)}')
        return value

    @model_validator(mode="after")
    def _one_expected_per_instance(self) -> CountRequestBody:
        if self.expected_quantity is not None and len(self.expected_quantity) != len(self.instances):
            raise ValueError(_expected_length_message(len(self.instances), self.expected_quantity))
        return self

    def expected(self) -> list[int | None]:
        """One expected quantity (or ``None``) per instance."""
        return list(self.expected_quantity) if self.expected_quantity is not None else [None] * len(self.instances)


def _expected_length_message(instances: int, expected: Any) -> str:
    return (f'"expected_quantity" must be a list with one entry (integer or null) per instance ({instances}), '
            f"got {json.dumps(expected)[:100]}")


def _describe(error: dict, doc: Any) -> str:
    """One line for the first of pydantic's ``ValidationError.errors()`` on ``doc``."""
    loc, message = error["loc"], error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and len(loc) < 2:  # raised by our own validators: complete already
        return message
    if not loc or loc == ("instances",):
        return BODY_SHAPE
    if loc[0] == "instances":
        return f"instances[{loc[1]}]: {INSTANCE_SHAPE}"
    if loc == ("expected_quantity",):
        return _expected_length_message(len(doc["instances"]), error["input"])
    return f"expected_quantity[{loc[1]}] must be a non-negative integer or null, got {json.dumps(error['input'])}"


def parse_json_body(body: bytes | str, *, max_instances: int) -> CountRequestBody:
    """Parse and validate a JSON request body.

    Args:
        body: The raw body (the SageMaker toolkit may hand it over as ``str``).
        max_instances: Most photos one request may hold.

    Returns:
        The validated body.

    Raises:
        RequestError: (400) Malformed JSON, or a structure or value the schema refuses; the
            message names the field.
    """
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: absurd nesting
        raise RequestError(f"malformed JSON: {err}") from None
    try:
        return CountRequestBody.model_validate(doc, context={"max_instances": max_instances})
    except ValidationError as err:
        raise RequestError(_describe(err.errors(include_url=False)[0], doc)) from None
