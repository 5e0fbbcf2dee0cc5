"""MoECLIP: zero-shot anomaly detection with a mixture of LoRA experts on a frozen CLIP."""

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterConfig": "config", "BackboneConfig": "config", "ModelConfig": "config",
    "MoECLIP": "model", "Detector": "detector", "Prediction": "detector",
    "load_model": "checkpoint", "save_checkpoint": "checkpoint", "MoECLIPError": "errors",
}
__all__ = list(_EXPORTS) + ["__version__"]


def __getattr__(name):
    # lazy, so `moeclip --help` does not import torch
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
