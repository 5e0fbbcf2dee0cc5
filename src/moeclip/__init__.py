"""MoECLIP: zero-shot anomaly detection with a mixture of LoRA experts on a frozen CLIP.

Layers, each importing only the ones above it in this list:

- ``moeclip.model``: the paper (backbone, router, experts, FOFS, MoE, PAA, projections, prompts,
  text, losses, torch scoring, config, checkpoints, :class:`MoECLIP`);
- ``moeclip.data`` and ``moeclip.metrics``: datasets, scanners, manifests; the official rule;
- ``moeclip.engine``: training, evaluation, torchrun, the demo;
- ``moeclip.inference``: post-processing (numpy), the inference pipeline, its runtimes (PyTorch,
  few-shot, ONNX, OpenVINO), Detector, deployment files, the runtime builder, the web service;
- ``moeclip.analysis``: explain, reports, ablations;
- ``moeclip.cli``: argument parsing only.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterConfig": "model.config", "BackboneConfig": "model.config", "ModelConfig": "model.config",
    "MoECLIP": "model.moeclip", "Detector": "inference.detector", "Prediction": "inference.pipeline",
    "load_model": "model.checkpoint", "save_checkpoint": "model.checkpoint", "MoECLIPError": "errors",
}
__all__ = list(_EXPORTS) + ["__version__"]


def __getattr__(name):
    # lazy, so `moeclip --help` does not import torch
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
