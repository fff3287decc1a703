"""The training precision for the processor at hand: bfloat16 mixed precision where it computes in
bfloat16 natively, 32-bit floats (CPU) or float16 mixed precision (GPU) otherwise. bfloat16 keeps
float32's exponent range, so it needs no loss scaling (Kalamkar et al. 2019, "A Study of BFLOAT16
for Deep Learning Training"); weights, optimizer state and checkpoints stay float32.
"""

from __future__ import annotations

import torch

AUTO = "auto"


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic instructions: x86 AVX512-BF16 or AMX.

    Read through PyTorch's own CPU feature checks; another architecture counts as no.
    """
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def choose_precision(accelerator: str) -> tuple[str, str]:
    """``(precision, reason)``: the Lightning ``precision`` to train in with the Trainer's ``accelerator``
    on this machine: ``"bf16-mixed"`` on a CPU or GPU with bfloat16 arithmetic, ``"16-mixed"`` on an
    older GPU (T4, V100), ``"32-true"`` on a CPU without it and on any other accelerator.
    """
    accelerator = str(accelerator).lower()
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == AUTO and torch.cuda.is_available())
    if on_cuda:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "the GPU"
        if torch.cuda.is_bf16_supported(including_emulation=False):  # emulated bfloat16 is slow
            return "bf16-mixed", f"{name} computes in bfloat16"
        return "16-mixed", f"{name} has no native bfloat16: float16 mixed precision with loss scaling"
    if accelerator == AUTO and torch.backends.mps.is_available():
        accelerator = "mps"  # what Lightning's auto picks there
    if accelerator not in ("cpu", AUTO):
        return "32-true", f"no automatic choice for accelerator={accelerator}"
    if cpu_has_bf16():
        return "bf16-mixed", "the CPU has bfloat16 instructions: AVX512-BF16 or AMX"
    return "32-true", "the CPU has no bfloat16 instructions: neither AVX512-BF16 nor AMX"
