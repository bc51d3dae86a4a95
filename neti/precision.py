"""Numerical precision of training: gradients to the mapper must survive the frozen model (NeTI Sec. 5, training).

Only the mapper is trained (fp32, its optimiser too); its gradients pass backwards through the frozen UNet and
text encoder. In fp16 without loss scaling small gradients underflow to zero, so fp16 frozen weights train only
with accelerate's fp16 mixed precision (autocast and a dynamic loss scale, CUDA only). bf16 has fp32's exponent
range and needs no scaling; fp32 needs nothing. "auto", the default, follows the loaded weights: fp32 -> "no",
bf16 -> "bf16", fp16 -> "fp16". Asking for "no" loads fp32 weights (`training_weights_dtype`); "no" on fp16
weights is refused (docs/efficiency.md "Precision").
"""

from __future__ import annotations

import torch

from .config import DEFAULT_MIXED_PRECISION, MIXED_PRECISION

__all__ = ["DEFAULT_MIXED_PRECISION", "MIXED_PRECISION", "resolve_mixed_precision", "training_weights_dtype"]
_BY_WEIGHTS = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}
_WEIGHTS = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_weights_dtype(mixed_precision: str) -> torch.dtype | None:
    """The dtype to load the frozen model in for training: fp32 for "no" (an fp32 gradient path), bf16 / fp16 for
    "bf16" / "fp16"; None for "auto" (the loader's default: fp16 on CUDA, fp32 elsewhere)."""
    _check(mixed_precision)
    return _WEIGHTS.get(mixed_precision)


def resolve_mixed_precision(mixed_precision: str, weights_dtype: torch.dtype, device: torch.device | str) -> str:
    """accelerate's mixed-precision mode for training on frozen weights of `weights_dtype` on `device`."""
    _check(mixed_precision)
    device = torch.device(device)
    mode = _BY_WEIGHTS.get(weights_dtype, "no") if mixed_precision == "auto" else mixed_precision
    if mode == "no" and weights_dtype == torch.float16:
        raise ValueError("mixed_precision 'no' on fp16 weights sends gradients through fp16 without loss scaling "
                         "(they underflow); use 'auto' or 'fp16' (loss scaling), or load the model in fp32")
    if mode == "fp16" and device.type != "cuda":
        raise ValueError(f"mixed_precision 'fp16' needs a CUDA GPU (loss scaling), not {device.type}; use 'bf16' "
                         "or 'no' on this device" + (", and load the model in fp32 or bf16"
                                                      if weights_dtype == torch.float16 else ""))
    return mode


def _check(mixed_precision: str) -> None:
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision {mixed_precision!r} is unknown; use one of {', '.join(MIXED_PRECISION)}")
