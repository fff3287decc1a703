"""The exported model folder (SageMaker's ``model_dir``): ``model.pt`` + ``model_config.json``.

Everything serving needs, loadable with torch and torchvision alone (no Hydra, no Lightning).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bincount
from bincount.models.backbones import build_backbone

MODEL_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
REQUIRED_KEYS = ("arch", "min_count", "max_count", "num_classes", "preset")


def save_model_dir(net: nn.Module, out_dir: str | Path, *, arch: str, min_count: int, max_count: int,
                   preset: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write the bare backbone's ``state_dict`` and its config to ``out_dir``.

    Args:
        net: The torchvision backbone (``BinCountModule.net``).
        out_dir: Folder to create or overwrite.
        arch: torchvision model name.
        min_count: Count of class 0.
        max_count: Count of the last class.
        preset: ``CountingPresetEval.to_config()`` (``image_size``, ``mean``, ``std``).
        extra: More fields to store (e.g. the training run's metrics).

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    torch.save(state, out_dir / MODEL_FILE)
    config = {
        "arch": arch,
        "min_count": min_count,
        "max_count": max_count,
        "num_classes": max_count - min_count + 1,
        "preset": preset,
        "bincount_version": bincount.__version__,
        **(extra or {}),
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """Read and check ``model_config.json``.

    Args:
        model_dir: The exported model folder.

    Returns:
        The config.

    Raises:
        FileNotFoundError: If ``model_dir`` has no ``model_config.json`` or ``model.pt``.
        ValueError: If ``model_config.json`` is not a JSON object with the keys
            :func:`save_model_dir` writes (``REQUIRED_KEYS``); the message names the file.
    """
    model_dir = Path(model_dir)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} not found: model_dir must hold {MODEL_FILE} and {CONFIG_FILE}")
    path = model_dir / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): re-export the model or restore the file") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object")
    if missing := [k for k in REQUIRED_KEYS if k not in config]:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a bincount model config")
    return config


def load_model_dir(model_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load an exported model in eval mode.

    Returns:
        The backbone (``(N, 3, S, S)`` -> ``(N, num_classes)`` logits) and its config.

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: If ``model_config.json`` is malformed (see :func:`read_model_config`).
        RuntimeError: If ``model.pt`` does not match the config's architecture.
    """
    config = read_model_config(model_dir)
    net = build_backbone(config["arch"], config["num_classes"])
    state = torch.load(Path(model_dir) / MODEL_FILE, map_location=map_location, weights_only=True)
    net.load_state_dict(state)
    return net.eval(), config
