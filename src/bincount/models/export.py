"""The exported model folder (SageMaker's ``model_dir``), read without Hydra or Lightning: the backbone's
``state_dict`` (``model.pt``), the network as served by ONNX Runtime (``model.onnx``) and its
:class:`~bincount.models.card.ModelCard` (``model_config.json``).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import pickle
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

from bincount.atomic import atomic_folder
from bincount.models.backbones import build_backbone
from bincount.models.card import ModelCard
from bincount.models.decoding import with_tta

MODEL_FILE = "model.pt"
ONNX_FILE = "model.onnx"
CONFIG_FILE = "model_config.json"
ONNX_TOLERANCE = 1e-4
"""Largest difference of a calibrated probability between ``model.onnx`` and the PyTorch forward."""

# torch.onnx.export's optimiser logs each of its rewrites at INFO: a run's log keeps only their warnings
for _name in ("onnxscript", "onnx_ir"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def served_network(net: nn.Module, card: ModelCard) -> nn.Module:
    """A float32 CPU copy of ``net`` in eval mode with the card's test-time augmentation: what serving runs."""
    return with_tta(copy.deepcopy(net).cpu().float(), card.tta).eval()


def export_onnx(net: nn.Module, card: ModelCard) -> bytes:
    """:func:`served_network` as ONNX (``torch.onnx.export``, dynamo exporter), with a dynamic batch.

    Args:
        net: The backbone, ``(N, 3, S, S)`` -> ``(N, card.num_classes)`` logits (any device; not modified).
        card: Gives the test-time augmentation and the input size ``S``.

    Returns:
        The ONNX model: input ``images`` ``(N, 3, S, S)`` float32, output ``logits`` ``(N, C)`` float32.
    """
    size = card.preset.image_size
    program = torch.onnx.export(served_network(net, card), (torch.zeros(2, 3, size, size),),
                                input_names=["images"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
    return program.model_proto.SerializeToString()


def check_onnx(onnx_model: bytes, net: nn.Module, card: ModelCard) -> float:
    """Check that ONNX Runtime's forward of ``onnx_model`` gives the calibrated probabilities of
    :func:`served_network` on a fixed random batch ``(3, 3, S, S)``.

    Returns:
        The largest absolute difference of a probability.

    Raises:
        RuntimeError: If it exceeds :data:`ONNX_TOLERANCE`.
    """
    size = card.preset.image_size
    probe = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    temperature = 1.0 if card.calibration is None else card.calibration.temperature
    with torch.inference_mode():
        expected = (served_network(net, card)(probe) / temperature).softmax(dim=1)
    session = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(["logits"], {"images": probe.numpy()})[0])
    difference = float(((logits / temperature).softmax(dim=1) - expected).abs().max())
    if not difference <= ONNX_TOLERANCE:
        raise RuntimeError(f"the ONNX export disagrees with the PyTorch forward (a probability differs by "
                           f"{difference:.3g} > {ONNX_TOLERANCE:g}): the model cannot be served")
    return difference


def save_model_dir(net: nn.Module, out_dir: str | Path, card: ModelCard) -> Path:
    """Write the backbone's ``state_dict``, the network as served (checked: :func:`check_onnx`) and the
    card into ``out_dir``, atomically (:func:`bincount.atomic.atomic_folder`): stopped or failing at
    any moment, ``out_dir`` is the previous model, whole, or the new one, or absent.

    Args:
        net: The backbone (``BinCountModule.net``), ``(N, 3, S, S)`` -> ``(N, card.num_classes)`` logits.
        out_dir: Folder to create or overwrite.
        card: What the weights are (written as ``model_config.json``).

    Returns:
        ``out_dir``.

    Raises:
        OSError: If the folder cannot be written (a full disk, a read-only folder), naming ``out_dir``.
        RuntimeError: If the ONNX export disagrees with ``net`` (:func:`check_onnx`).
    """
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    weights = io.BytesIO()  # serialised in memory: a full disk is then an OSError, not torch's zip-writer RuntimeError
    torch.save(state, weights)
    onnx_model = export_onnx(net, card)
    check_onnx(onnx_model, net, card)
    with atomic_folder(out_dir) as stage:
        (stage / MODEL_FILE).write_bytes(weights.getbuffer())
        (stage / ONNX_FILE).write_bytes(onnx_model)
        (stage / CONFIG_FILE).write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return out_dir


def read_model_card(model_dir: str | Path) -> ModelCard:
    """Read and check ``model_config.json`` of the exported ``model_dir``: how every reader loads a card.

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
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def load_model_dir(model_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Load an exported model in eval mode.

    Returns:
        The backbone (``(N, 3, S, S)`` -> ``(N, num_classes)`` logits) and its card.

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: If ``model_config.json`` is malformed (see :func:`read_model_card`) or names an
            architecture torchvision lacks, or ``model.pt`` is not a readable weights file.
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
