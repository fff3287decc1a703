"""SageMaker hyperparameters <-> Hydra overrides: the one codec of the launcher and the container entry.

The launcher (:mod:`sagemaker_launch.plan`, :mod:`sagemaker_launch.tune`) encodes a job's Hydra
overrides with :func:`encode_overrides`; the container entry (:mod:`sagemaker_launch.entry`)
reads them back with :func:`parse_argv` or :func:`read_hyperparameters` and
:func:`decode_hyperparameters`.

The job's hyperparameters are the Hydra overrides the launcher was given, encoded so that both
ways a container reads them hand every override to the entry unchanged (:func:`encode_override`,
:func:`decode_hyperparameters`):

- names: SageMaker's drivers write ``export SM_HP_<NAME>=...``, so a dot in a name
  (``model.optimizer.lr``) fails every job before the script starts: ``.`` becomes ``__`` and the
  ``+``/``++``/``~`` prefixes ``_add__``/``_force__``/``_del__``;
- values: ``<n>=<value>``, the override's position ``n`` in the command line, then the text after
  its ``=`` as typed (``trainer.max_epochs=20`` -> ``trainer__max_epochs: "3=20"``; ``~key`` ->
  ``_del__key: "3"``). Such a text is never valid JSON, so it passes unchanged where SageMaker's
  code JSON-decodes values: ModelTrainer's drivers decode twice and re-encode (``null`` would
  arrive as ``null``, but ``"007"`` as ``007``), and the training toolkit of tuning trials decodes
  once and calls ``str()`` (``null`` would arrive as an empty string, ``true`` as ``True``);
- quotes: the drivers write every value into ``export NAME='<value>'`` lines that ``sm_train.sh``
  sources, so a ``'`` would end the quoting and kill the job before it starts. Single-quoted
  strings are sent double-quoted when Hydra reads both the same (``'my list.txt'`` ->
  ``"my list.txt"``); any other value with a ``'`` or a control character is sent as
  ``<n>%=<value>`` with those characters and ``%`` percent-escaped;
- order: the training toolkit sorts the arguments by name and a JSON map has no order, but Hydra
  applies overrides in order (``callbacks.ema={...}`` then ``callbacks.ema.decay=0.9`` works,
  the other way round fails): :func:`decode_hyperparameters` sorts by ``n``. Values without a
  position (tuned ones, which SageMaker sends as plain numbers, and categorical ones,
  ``=<value>``) come last, by name;
- ``sagemaker_*``, ``mp_parameters`` and ``_tuning_objective_metric`` (added by the SDK, the
  toolkit and the tuning service) are not overrides and are skipped.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from pathlib import Path

SEP = "__"
# longest first: "++" must not be read as "+" then "+"
PREFIXES = (("++", "_force__"), ("+", "_add__"), ("~", "_del__"))
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.]+")
# an encoded value: position (none for tuned/categorical values), "%" if percent-escaped, "=", the value
VALUE_PATTERN = re.compile(r"(\d*)(%?)=(.*)", re.DOTALL)
# what a percent-escaped value keeps as it is: printable ASCII but "'" (ends the env file's quoting) and "%"
ESCAPE_SAFE = "".join(c for c in map(chr, range(0x20, 0x7F)) if c not in "'%" and not c.isalnum())
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


def parse_value(value: str):
    """What Hydra reads from the override ``key=<value>`` (its ``Override.value()``).

    Raises:
        hydra.errors.HydraException: If ``value`` is not Hydra's override syntax.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"key={value}").value()


def encode_value(value: str, position: int | None = None) -> str:
    """The hyperparameter value that carries the text after an override's ``=``.

    ``"20"`` -> ``"3=20"`` (position 3); ``"'my list.txt'"`` -> ``'3="my list.txt"'``;
    ``"'it\\'s'"`` -> ``"3%=%27it\\%27s%27"``; without a position (a categorical tuning value),
    ``"=20"``. See the module docstring for why.

    Args:
        value: The text after the ``=``, as typed.
        position: The override's place in the command line, or ``None``.

    Returns:
        A text that no JSON decoding, ``str()`` or shell quoting on the way to the entry changes.
    """
    if "'" in value and '"' not in value:
        from hydra.errors import HydraException

        swapped = value.replace("'", '"')
        try:
            if parse_value(swapped) == parse_value(value):
                value = swapped
        except HydraException:
            pass  # sent escaped, as typed
    escape = "'" in value or not value.isprintable()
    text = urllib.parse.quote(value, safe=ESCAPE_SAFE) if escape else value
    return f"{'' if position is None else position}{'%' if escape else ''}={text}"


def encode_override(override: str, position: int | None = None) -> tuple[str, str]:
    """Turn one Hydra override into a SageMaker hyperparameter ``(name, value)``.

    ``"model.optimizer.lr=0.001"`` -> ``("model__optimizer__lr", "0=0.001")``,
    ``"+experiment=quickstart"`` -> ``("_add__experiment", "0=quickstart")``,
    ``"~callbacks.lr_monitor"`` -> ``("_del__callbacks__lr_monitor", "0")`` (position 0).

    Args:
        override: A Hydra override as typed on a command line.
        position: Its place among the job's overrides (see :func:`encode_value`); ``None`` for
            an override whose place doesn't matter.

    Returns:
        The hyperparameter's name and value.

    Raises:
        ValueError: If the key holds characters other than letters, digits, ``_`` and ``.``
            (group paths with ``/``, packages with ``@``), would not decode to itself (``a_.b``:
            ``a___b`` reads back as ``a._b``), or the name or value exceeds SageMaker's limits.
    """
    key, eq, value = override.partition("=")
    name_prefix = ""
    for hydra_prefix, encoded in PREFIXES:
        if key.startswith(hydra_prefix):
            key, name_prefix = key[len(hydra_prefix):], encoded
            break
    if not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"override {override!r}: key {key!r} can't be a SageMaker hyperparameter name "
                         f"(letters, digits, '_' and '.' only)")
    name = name_prefix + key.replace(".", SEP)
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"override {override!r}: name {name!r} is {len(name)} characters; SageMaker takes "
                         f"at most {MAX_NAME_CHARS}")
    if eq:
        encoded_value = encode_value(value, position)
    else:  # "~key": no value
        encoded_value = "" if position is None else str(position)
    if len(encoded_value) > MAX_VALUE_CHARS:
        raise ValueError(f"override {override.partition('=')[0]}=...: the value is {len(encoded_value)} characters "
                         f"once encoded; SageMaker takes at most {MAX_VALUE_CHARS} per hyperparameter")
    decoded = decode_hyperparameters({name: encoded_value})[0]
    if decoded.partition("=")[0] != override.partition("=")[0]:
        raise ValueError(f"override {override!r}: key would come back as {decoded.partition('=')[0]!r} "
                         f"(a '_' next to a '.')")
    return name, encoded_value


def encode_overrides(overrides: list[str]) -> dict[str, str]:
    """:func:`encode_override` for a job's overrides, each with its position in ``overrides``.

    Raises:
        ValueError: If an override can't be encoded, or two overrides set the same key.
    """
    out: dict[str, str] = {}
    for position, override in enumerate(overrides):
        name, value = encode_override(override, position)
        if name in out:
            raise ValueError(f"override {override!r} sets {name} a second time")
        out[name] = value
    return out


def is_override(name: str) -> bool:
    """Whether hyperparameter ``name`` carries an override (not one the SDK, toolkit or tuner added)."""
    return not name.startswith(RESERVED_PREFIXES) and name != TUNING_OBJECTIVE


def decode_hyperparameters(hyperparameters: dict[str, object]) -> list[str]:
    """The Hydra overrides encoded in SageMaker hyperparameters, in their command-line order.

    Args:
        hyperparameters: Names and values from :func:`encode_override`, as strings or as the
            JSON values ``$SM_HPS`` holds; tuned values arrive as plain numbers (``0.0013``)
            or, for categorical ranges, from :func:`encode_value` without a position. Keys the
            SDK, toolkit or tuner add (:func:`is_override`) are skipped.

    Returns:
        ``["+experiment=quickstart", "model.optimizer.lr=0.001", ...]``: by position, then the
        overrides without one by name.
    """
    decoded = []
    for name, raw in hyperparameters.items():
        if not is_override(name):
            continue
        prefix = ""
        for hydra_prefix, encoded in PREFIXES:
            if name.startswith(encoded):
                name, prefix = name[len(encoded):], hydra_prefix
                break
        key = prefix + ".".join(name.split(SEP))
        text = raw if isinstance(raw, str) else json.dumps(raw)
        position, value = None, text  # a plain value: tuned, or from an older launcher
        if prefix == "~" and re.fullmatch(r"\d*", text):
            position, value = (int(text) if text else None), None
        elif match := VALUE_PATTERN.fullmatch(text):
            position = int(match[1]) if match[1] else None
            value = urllib.parse.unquote(match[3]) if match[2] else match[3]
        decoded.append((position is None, position or 0, key, key if value is None else f"{key}={value}"))
    return [override for *_, override in sorted(decoded)]


def parse_argv(argv: list[str]) -> dict[str, str]:
    """``["--a__b", "1", "--c", "x"]`` -> ``{"a__b": "1", "c": "x"}`` (how both drivers pass them).

    The training toolkit writes a one-letter name with one dash (``-x 1``); that is read too.

    Raises:
        ValueError: If the arguments are not ``--name value`` pairs.
    """
    names = argv[::2]
    if len(argv) % 2 or not all(a.startswith("--") or re.fullmatch(r"-\w", a) for a in names):
        raise ValueError(f"expected --name value pairs, got {argv}")
    return {name.lstrip("-"): value for name, value in zip(names, argv[1::2])}


def read_hyperparameters(environ: dict[str, str] | None = None) -> dict[str, object]:
    """The job's hyperparameters from ``$SM_HPS``, else ``$SM_INPUT_CONFIG_DIR/hyperparameters.json``
    (default ``/opt/ml/input/config``); ``{}`` if neither exists."""
    environ = os.environ if environ is None else environ
    if environ.get("SM_HPS"):
        return json.loads(environ["SM_HPS"])
    path = Path(environ.get("SM_INPUT_CONFIG_DIR", "/opt/ml/input/config")) / "hyperparameters.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_tuning_trial(environ: dict[str, str] | None = None) -> bool:
    """Whether this job is a trial of a tuning job: SageMaker adds ``_tuning_objective_metric`` to its
    ``$SM_INPUT_CONFIG_DIR/hyperparameters.json`` (the training toolkit keeps it from the arguments)."""
    environ = os.environ if environ is None else environ
    path = Path(environ.get("SM_INPUT_CONFIG_DIR", "/opt/ml/input/config")) / "hyperparameters.json"
    return path.is_file() and TUNING_OBJECTIVE in json.loads(path.read_text())
