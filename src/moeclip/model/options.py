"""Model options: the flat dictionary that rebuilds a model (CLI flags, deployment files, Ray actors).

Keys are option names (``clip_model``, ``experts``, ...): backbone options replace the values a
checkpoint stores (e.g. a local weight file on an offline machine), adapter options override
its inference-time settings, and for an official ``.pth`` file (which holds adapter weights
only) they describe the model. A deployment file stores exactly this dictionary. Importing this
module does not import torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import MoECLIPError

#: option name -> BackboneConfig field
BACKBONE_OPTIONS = {"clip_model": "model", "clip_weights": "pretrained", "image_size": "image_size",
                    "quick_gelu": "quick_gelu"}
#: option name -> AdapterConfig field
ADAPTER_OPTIONS = {"experts": "num_experts", "top_k": "top_k", "rank": "rank", "alpha": "alpha",
                   "moe_layers": "moe_layers", "levels": "levels", "fofs": "fofs", "paa": "paa",
                   "relu": "relu", "seg_proj": "seg_proj", "image_adapt_weight": "image_adapt_weight"}
MODEL_OPTIONS = tuple(BACKBONE_OPTIONS) + tuple(ADAPTER_OPTIONS)


def backbone_overrides(options: Dict[str, Any]) -> Dict[str, Any]:
    out = {BACKBONE_OPTIONS[k]: v for k, v in options.items() if k in BACKBONE_OPTIONS}
    if isinstance(out.get("pretrained"), str) and out["pretrained"].lower() == "none":
        out["pretrained"] = None
    return out


def adapter_overrides(options: Dict[str, Any]) -> Dict[str, Any]:
    return {ADAPTER_OPTIONS[k]: v for k, v in options.items() if k in ADAPTER_OPTIONS}


def build_model(checkpoint: str | Path, options: Optional[Dict[str, Any]] = None):
    """An eval-mode :class:`~moeclip.model.moeclip.MoECLIP` on the CPU from a checkpoint and option dict."""
    from .checkpoint import load_model

    options = dict(options or {})
    unknown = sorted(set(options) - set(MODEL_OPTIONS))
    if unknown:
        raise MoECLIPError(f"unknown model option(s) {unknown}")
    if checkpoint is None:
        raise MoECLIPError("no checkpoint given (--checkpoint, or a deployment file that names one)")
    return load_model(checkpoint, backbone_overrides=backbone_overrides(options),
                      adapter_overrides=adapter_overrides(options))


def absolute_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """Options with existing file paths made absolute, so a deployment works from any folder."""
    out = dict(options)
    for key in ("clip_model", "clip_weights"):
        value = out.get(key)
        if isinstance(value, str) and Path(value).exists():
            out[key] = str(Path(value).resolve())
    return out
