"""Device and precision selection shared by every command."""
from __future__ import annotations

import contextlib

import torch

from .errors import MoECLIPError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MoECLIPError(f"unknown device {device!r} (use cpu, cuda, cuda:1, mps or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoECLIPError(f"device {device!r} requested but CUDA is not available")
    return dev


def check_precision(device: torch.device, precision: str) -> None:
    """A clear error for a precision that is unknown or that ``device`` cannot run."""
    if precision not in PRECISIONS:
        raise MoECLIPError(f"unknown precision {precision!r} (use fp32, bf16 or fp16)")
    if precision == "fp16" and device.type == "cpu":
        raise MoECLIPError("fp16 is not supported on CPU; use bf16 or fp32")


def autocast(device: torch.device, precision: str):
    """Autocast context for bf16/fp16 (the losses are computed in fp32)."""
    check_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def cast_frozen_weights(module: torch.nn.Module, precision: str) -> int:
    """Store the frozen Linear/Conv/attention weights of ``module`` in the autocast dtype, once.

    Autocast caches its bf16/fp16 copy of a weight only when the weight requires grad, so a
    frozen tower is re-cast at every forward (all ~300 M ViT-L weights per batch on CPU, again
    for backward). Autocast would round the very same fp32 values the same way, so results
    under autocast are bit-identical; the frozen weights also take half the memory. Only the
    ops autocast runs in low precision (linear, conv, the attention in-projection) read these
    weights; LayerNorms, embeddings and anything trainable stay as they are. Returns the
    number of tensors cast.
    """
    if precision not in PRECISIONS:
        raise MoECLIPError(f"unknown precision {precision!r} (use fp32, bf16 or fp16)")
    if precision == "fp32":
        return 0
    dtype = PRECISIONS[precision]
    names = {torch.nn.Linear: ("weight", "bias"), torch.nn.Conv2d: ("weight", "bias"),
             torch.nn.MultiheadAttention: ("in_proj_weight", "in_proj_bias", "q_proj_weight",
                                           "k_proj_weight", "v_proj_weight")}
    count = 0
    for m in module.modules():
        attrs = next((v for k, v in names.items() if isinstance(m, k)), ())
        for a in attrs:
            p = getattr(m, a, None)
            if isinstance(p, torch.nn.Parameter) and not p.requires_grad and p.is_floating_point() \
                    and p.dtype != dtype:
                p.data = p.data.to(dtype)
                count += 1
    return count
