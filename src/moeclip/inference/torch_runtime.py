"""The PyTorch runtime of the pipeline: a :class:`~moeclip.inference.detector.Detector`'s model.

Below the Detector facade (which picks this runtime or the few-shot one) and above the pipeline,
whose :class:`~moeclip.inference.pipeline.Runtime` protocol it implements.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from ..data.transforms import preprocess_image
from .pipeline import Runtime

__all__ = ["TorchRuntime"]


class TorchRuntime(Runtime):
    """The PyTorch model behind a Detector (device, precision): RGB images -> raw maps and scores.

    ``detector``: anything with ``num_maps``, ``image_size``, ``predict_tensors`` and ``model``
    (a :class:`~moeclip.inference.detector.Detector`).
    """

    def __init__(self, detector):
        self.detector = detector
        self.num_maps = detector.num_maps
        self.image_size = int(detector.image_size)

    def raw(self, images, object: str, domain: str) -> Tuple[np.ndarray, np.ndarray]:
        batch = torch.stack([preprocess_image(img, self.image_size) for img in images])
        out = self.detector.predict_tensors(batch, object, domain)
        return out["anomaly_map"].cpu().numpy(), out["image_score"].cpu().numpy()

    def clear_cache(self) -> None:
        """Forget cached text features (a service bounds its memory with this)."""
        self.detector.model.text.clear_cache()
