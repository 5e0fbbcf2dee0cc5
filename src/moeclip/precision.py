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


def autocast(device: torch.device, precision: str):
    """Autocast context for bf16/fp16 (weights stay fp32; the losses are computed in fp32)."""
    if precision not in PRECISIONS:
        raise MoECLIPError(f"unknown precision {precision!r} (use fp32, bf16 or fp16)")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type == "cpu":
        raise MoECLIPError("fp16 is not supported on CPU; use bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])
