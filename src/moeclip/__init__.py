"""MoECLIP: zero-shot anomaly detection with a mixture of LoRA experts on a frozen CLIP."""

__version__ = "0.1.0"
