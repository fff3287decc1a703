"""SageMaker hyperparameters <-> Hydra overrides: the one codec of the launcher and the container entry.

A job's hyperparameters (:func:`encode_overrides`, :func:`decode_hyperparameters`) are:

- ``overrides``: all its Hydra overrides in one value, in their order (Hydra applies them in
  order), separated by spaces, each percent-escaped but for printable ASCII other than space,
  ``'`` and ``%``: ``"+experiment=quickstart trainer.max_epochs=20 data.label_list=%27my%20list.txt%27"``;
- in a tuning job's trials, one more per tuned key (:func:`tuned_name`), set per trial to a plain
  number or ``=`` and a categorical range's Hydra value, escaped the same way
  (:func:`categorical_value`); applied after ``overrides``, by name.

Why this form reaches the entry unchanged both ways a container reads it:

- SageMaker's ModelTrainer drivers write every hyperparameter into ``export SM_HP_<NAME>='<value>'``
  lines that ``sm_train.sh`` sources: a ``'`` in a value ends the quoting and a ``.`` in a name
  fails the export, either killing the job before it starts;
- the drivers JSON-decode values twice and re-encode them, and the ``sagemaker-training`` toolkit of
  tuning trials decodes them once and calls ``str()`` (a JSON list would arrive as Python's repr,
  ``null`` as an empty string, ``"007"`` as ``007``). ``overrides`` is never JSON (each override
  has a key before its ``=`` or starts with ``~``), nor is ``=<value>``; numbers survive both;
- the toolkit sorts the arguments by name and a JSON map has no order: one value keeps it.

``sagemaker_*``, ``mp_parameters`` and ``_tuning_objective_metric`` (added by the SDK, the toolkit
and the tuning service) are not overrides and are skipped.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

OVERRIDES = "overrides"
# a tuned key's "." in its hyperparameter name
SEP = "__"
# what an escaped override keeps as it is: printable ASCII but " " (separates overrides), "'" and "%"
ESCAPE_SAFE = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in "'%")
# hyperparameters the SDK, the training toolkit or the tuning service add for themselves
RESERVED_PREFIXES = ("sagemaker_", "mp_parameters")
TUNING_OBJECTIVE = "_tuning_objective_metric"
# SageMaker's limits (botocore's service model: HyperParameterKey, HyperParameterValue, ParameterValue)
MAX_NAME_CHARS, MAX_VALUE_CHARS, MAX_CATEGORICAL_CHARS = 256, 2500, 256


def override_key(override: str) -> str:
    """``"++trainer.profiler=simple"`` -> ``"trainer.profiler"``; ``"~callbacks.ema"`` -> ``"callbacks.ema"``."""
    return override.lstrip("+~").partition("=")[0]


def override_value(overrides: list[str], key: str) -> str | None:
    """The text after ``=`` of the last override of ``key`` in ``overrides``, or ``None``."""
    values = [o.partition("=")[2] for o in overrides if override_key(o) == key]
    return values[-1] if values else None


def encode_overrides(overrides: list[str]) -> dict[str, str]:
    """A job's Hydra overrides as its hyperparameters: ``{"overrides": "..."}`` (see the module docstring).

    ``["+experiment=quickstart", "data.label_list='my list.txt'"]`` ->
    ``{"overrides": "+experiment=quickstart data.label_list=%27my%20list.txt%27"}``.

    Raises:
        ValueError: If the value exceeds SageMaker's 2500 characters.
    """
    value = " ".join(urllib.parse.quote(o, safe=ESCAPE_SAFE) for o in overrides)
    if len(value) > MAX_VALUE_CHARS:
        raise ValueError(f"the job's overrides are {len(value)} characters once encoded; SageMaker takes at most "
                         f"{MAX_VALUE_CHARS} per hyperparameter (move some into an experiment file: +experiment=...)")
    return {OVERRIDES: value}


def is_tuned(name: str) -> bool:
    """Whether hyperparameter ``name`` is a tuned key's (not ``overrides``, not one the SDK, toolkit or tuner added)."""
    return name != OVERRIDES and not name.startswith(RESERVED_PREFIXES) and name != TUNING_OBJECTIVE


def tuned_name(key: str) -> str:
    """The name a tuning job sets Hydra key ``key`` under: ``"model.optimizer.lr"`` -> ``"model__optimizer__lr"``.

    Raises:
        ValueError: If the key holds characters other than letters, digits, ``_`` and ``.`` (group
            paths with ``/``, packages with ``@``, ``+``/``~``), would not decode to itself (``a_.b``:
            ``a___b`` reads back as ``a._b``), is reserved, or the name exceeds SageMaker's 256 characters.
    """
    name = key.replace(".", SEP)
    if not re.fullmatch(r"[A-Za-z0-9_]+", name) or not is_tuned(name):
        raise ValueError(f"tuned key {key!r} can't be a SageMaker hyperparameter name (letters, digits, '_' and '.' "
                         f"only; not {OVERRIDES!r}, sagemaker_* or mp_parameters)")
    if name.replace(SEP, ".") != key:
        raise ValueError(f"tuned key {key!r} would come back as {name.replace(SEP, '.')!r} (a '_' next to a '.')")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"tuned key {key!r}: name {name!r} is {len(name)} characters; SageMaker takes at most "
                         f"{MAX_NAME_CHARS}")
    return name


def categorical_value(value: str) -> str:
    """A categorical range's value for a Hydra override value: ``"'my list.txt'"`` -> ``"=%27my%20list.txt%27"``."""
    return "=" + urllib.parse.quote(value, safe=ESCAPE_SAFE)


def decode_hyperparameters(hyperparameters: dict[str, object]) -> list[str]:
    """The Hydra overrides encoded in SageMaker hyperparameters, in the order Hydra applies them.

    Args:
        hyperparameters: ``overrides`` from :func:`encode_overrides` and the tuned values, as
            strings or as the JSON values ``$SM_HPS`` holds (a tuned number as ``0.0013``). Names
            the SDK, toolkit or tuner add are skipped.

    Returns:
        ``["+experiment=quickstart", "model.optimizer.weight_decay=0.01", "model.optimizer.lr=0.0013"]``:
        ``overrides``, then the tuned values by name.
    """
    decoded = [urllib.parse.unquote(o) for o in str(hyperparameters.get(OVERRIDES, "")).split()]
    for name, raw in sorted(hyperparameters.items()):
        if is_tuned(name):
            text = raw if isinstance(raw, str) else json.dumps(raw)
            value = urllib.parse.unquote(text[1:]) if text.startswith("=") else text
            decoded.append(f"{name.replace(SEP, '.')}={value}")
    return decoded


def parse_argv(argv: list[str]) -> dict[str, str]:
    """``["--overrides", "a=1 b=2", "--c__d", "0.5"]`` -> ``{"overrides": "a=1 b=2", "c__d": "0.5"}``
    (how both drivers pass them).

    The training toolkit writes a one-letter name with one dash (``-x 1``); that is read too.

    Raises:
        ValueError: If the arguments are not ``--name value`` pairs.
    """
    names = argv[::2]
    if len(argv) % 2 or not all(a.startswith("--") or re.fullmatch(r"-\w", a) for a in names):
        raise ValueError(f"expected --name value pairs, got {argv}")
    return {name.lstrip("-"): value for name, value in zip(names, argv[1::2])}


def read_hyperparameters(environ: Mapping[str, str] = os.environ) -> dict[str, object]:
    """The job's hyperparameters from ``$SM_HPS``, else :func:`hyperparameters_file`."""
    if environ.get("SM_HPS"):
        return json.loads(environ["SM_HPS"])
    return hyperparameters_file(environ)


def hyperparameters_file(environ: Mapping[str, str]) -> dict[str, object]:
    """``$SM_INPUT_CONFIG_DIR/hyperparameters.json`` (default ``/opt/ml/input/config``), as SageMaker
    wrote it; ``{}`` if it does not exist."""
    path = Path(environ.get("SM_INPUT_CONFIG_DIR", "/opt/ml/input/config")) / "hyperparameters.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_tuning_trial(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this job is a trial of a tuning job: SageMaker adds ``_tuning_objective_metric`` to its
    ``$SM_INPUT_CONFIG_DIR/hyperparameters.json`` (the training toolkit keeps it from the arguments)."""
    return TUNING_OBJECTIVE in hyperparameters_file(environ)
