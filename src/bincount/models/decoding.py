"""How a network's output becomes a count: the decoding rule and test-time augmentation, both part
of the model (``model_config.json``), so training, evaluation and serving answer the same count.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import nn

DecodeRule = Literal["argmax", "median"]  # how probabilities become a count (decode_counts)
TtaMode = Literal["none", "flips"]  # test-time augmentation (with_tta)
NEVER = math.nextafter(1.0, 2.0)
"""A review threshold no probability reaches: every verdict is "review"."""


def decode_counts(probs: torch.Tensor, rule: str = "argmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one class per photo: ``argmax``, the most probable count (best for accuracy), or ``median``
    of the predicted distribution, which minimises the expected absolute error (best for MAE).

    Args:
        probs: ``(N, C)`` probabilities over classes ``0..C-1`` (rows sum to 1).
        rule: One of :data:`DecodeRule`.

    Returns:
        ``confidence`` ``(N,)`` (the chosen class's probability) and ``index`` ``(N,)`` (``long``).

    Raises:
        ValueError: If ``rule`` is unknown.
    """
    if rule == "argmax":
        return probs.max(dim=1)
    if rule == "median":
        # the smallest class whose cumulative probability reaches one half
        index = (probs.cumsum(dim=1) < 0.5).sum(dim=1).clamp_max(probs.shape[1] - 1)
        return probs.gather(1, index[:, None])[:, 0], index
    raise ValueError(f"unknown decode rule {rule!r}: use one of {get_args(DecodeRule)}")


class FlipTTA(nn.Module):
    """Test-time augmentation: mean logits over the photo and its horizontal, vertical and double flips
    (a bin seen from above has no canonical orientation). ``(N, 3, H, W)`` -> ``(N, C)``; four forwards.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = torch.cat([images, images.flip(-1), images.flip(-2), images.flip(-1, -2)])
        return self.net(views).unflatten(0, (4, -1)).mean(dim=0)  # -1, not len(): a dynamic batch in ONNX


def with_tta(net: nn.Module, tta: str) -> nn.Module:
    """``net`` wrapped for test-time augmentation ``tta`` (one of :data:`TtaMode`).

    Raises:
        ValueError: If ``tta`` is unknown.
    """
    if tta == "none":
        return net
    if tta == "flips":
        return FlipTTA(net)
    raise ValueError(f"unknown tta {tta!r}: use one of {get_args(TtaMode)}")
