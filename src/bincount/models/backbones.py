"""Build torchvision classification backbones with a count head."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be downloaded or found locally."""


def _load_pretrained(arch: str, weights: str, weights_path: str | None) -> nn.Module:
    """torchvision ``arch`` with ImageNet ``weights`` (from ``weights_path``, the hub cache or a download)."""
    try:
        enum = torchvision.models.get_model_weights(arch)[weights]
    except KeyError:
        known = [w.name for w in torchvision.models.get_model_weights(arch)]
        raise ValueError(f"unknown weights {weights!r} for {arch}; torchvision has {known}") from None
    net = torchvision.models.get_model(arch, weights=None, num_classes=len(enum.meta["categories"]))
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"model.weights_path={weights_path}: no such file (the {arch} {weights} "
                                    f"state_dict, {Path(enum.url).name})")
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        return net
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
    try:
        net.load_state_dict(enum.get_state_dict(progress=False, check_hash=True))
    except OSError as err:  # URLError is an OSError: no network, DNS failure, refused
        raise WeightsUnavailableError(
            f"cannot download {arch} {weights} weights from {enum.url} ({err}). This machine looks "
            f"offline. Download that file elsewhere and either put it at {cached} or pass "
            f"model.weights_path=/path/to/{Path(enum.url).name}; or train from scratch with model.weights=null."
        ) from None
    return net


def check_arch(arch: str) -> str:
    """``arch`` if torchvision has a classification model of that name.

    Raises:
        ValueError: If it has none.
    """
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown arch {arch!r}; torchvision classification models are e.g. resnet18, resnet50")
    return arch


def build_backbone(
    arch: str,
    num_classes: int,
    *,
    weights: str | None = None,
    weights_path: str | None = None,
) -> nn.Module:
    """A torchvision classifier whose last layer has ``num_classes`` outputs.

    Args:
        arch: A torchvision model name with an ``fc`` head (``resnet18``, ``resnet50``, ``resnext50_32x4d``...).
        num_classes: Outputs of the new head.
        weights: torchvision weights name for the body (``IMAGENET1K_V1``...), or ``None`` for random init.
        weights_path: Local file with that state_dict, used instead of downloading.

    Returns:
        ``(N, 3, H, W)`` float images -> ``(N, num_classes)`` logits.

    Raises:
        ValueError: Unknown ``arch``/``weights``, or an architecture without an ``fc`` head.
        WeightsUnavailableError: ``weights`` cannot be downloaded and is not cached.
    """
    check_arch(arch)
    if weights is None:
        if weights_path is not None:
            raise ValueError("model.weights_path needs model.weights (the name of the weights in that file)")
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    else:
        net = _load_pretrained(arch, weights, weights_path)
    if not isinstance(getattr(net, "fc", None), nn.Linear):
        raise ValueError(f"{arch} has no fc head; bincount supports ResNet-style torchvision models")
    if net.fc.out_features != num_classes:
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net
