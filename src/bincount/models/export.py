"""The exported model folder (SageMaker's ``model_dir``): ``model.pt`` + ``model_config.json``.

Everything serving needs, loadable with torch and torchvision alone (no Hydra, no Lightning):
the bare backbone's ``state_dict`` and its :class:`~bincount.models.card.ModelCard`.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch
from torch import nn

from bincount.atomic import atomic_folder
from bincount.models.backbones import build_backbone
from bincount.models.card import CardError, ModelCard

MODEL_FILE = "model.pt"
CONFIG_FILE = "model_config.json"


def save_model_dir(net: nn.Module, out_dir: str | Path, card: ModelCard) -> Path:
    """Write the bare backbone's ``state_dict`` and its card into the folder ``out_dir``, atomically.

    The folder is built beside ``out_dir`` and renamed into place when both files are written
    (:func:`bincount.atomic.atomic_folder`): stopped or failing at any moment, ``out_dir`` is the
    previous model, whole, or the new one, or absent; never a ``model.pt`` without its card.

    Args:
        net: The torchvision backbone (``BinCountModule.net``), ``(N, 3, S, S)`` ->
            ``(N, card.num_classes)`` logits.
        out_dir: Folder to create or overwrite.
        card: What the weights are (written as ``model_config.json``).

    Returns:
        ``out_dir``.

    Raises:
        OSError: If the folder cannot be written (a full disk, a read-only folder), naming ``out_dir``.
    """
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    weights = io.BytesIO()  # serialised in memory: a full disk is then an OSError, not torch's zip-writer RuntimeError
    torch.save(state, weights)
    with atomic_folder(out_dir) as stage:
        (stage / MODEL_FILE).write_bytes(weights.getbuffer())
        (stage / CONFIG_FILE).write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return out_dir


def read_model_card(model_dir: str | Path) -> ModelCard:
    """Read and check ``model_config.json``: the one way every reader loads a model's card.

    Args:
        model_dir: The exported model folder.

    Returns:
        The card.

    Raises:
        FileNotFoundError: If ``model_dir`` has no ``model_config.json`` or ``model.pt``.
        ValueError: If ``model_config.json`` is not valid JSON, not an object, or has a missing
            or malformed field (:meth:`ModelCard.read`); one line naming the file and the field.
    """
    model_dir = Path(model_dir)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} not found: model_dir must hold {MODEL_FILE} and {CONFIG_FILE}")
    path = model_dir / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): re-export the model or restore the file") from None
    try:
        return ModelCard.read(data)
    except CardError as err:
        raise ValueError(f"{path}: {err}") from None


def load_model_dir(model_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Load an exported model in eval mode.

    Returns:
        The backbone (``(N, 3, S, S)`` -> ``(N, num_classes)`` logits) and its card.

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: If ``model_config.json`` is malformed (see :func:`read_model_card`) or names an
            architecture torchvision lacks.
        ValueError: If ``model.pt`` is not a readable weights file (cut short, or not one at all).
        RuntimeError: If ``model.pt`` does not match the card's architecture and class count.
    """
    card = read_model_card(model_dir)
    try:
        net = build_backbone(card.arch, card.num_classes)
    except ValueError as err:
        raise ValueError(f"{Path(model_dir) / CONFIG_FILE}: arch: {err}") from None
    path = Path(model_dir) / MODEL_FILE
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a readable weights file ({reason}): re-export the model "
                         "(python train.py ... ckpt_path=last) or restore the file") from None
    net.load_state_dict(state)
    return net.eval(), card
