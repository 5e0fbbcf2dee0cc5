"""The two domains of the paper and what they change: the map's blur and the image-score rule.

Torch-free: the numpy post-processing, the ONNX/OpenVINO runtimes and the metrics use the same
rule as the model.
"""
from __future__ import annotations

from enum import Enum
from typing import Tuple


class Domain(str, Enum):
    """Sets the test-time blur and the image-score rule."""

    INDUSTRIAL = "industrial"
    MEDICAL = "medical"

    @classmethod
    def parse(cls, value: "str | Domain") -> "Domain":
        if isinstance(value, Domain):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ValueError(f"domain must be 'industrial' or 'medical', got {value!r}") from None

    @property
    def blur(self) -> Tuple[int, float]:
        """(kernel size, sigma) of the Gaussian blur on the patch grid."""
        return (7, 1.0) if self is Domain.INDUSTRIAL else (9, 1.5)

    def combine(self, map_score, image_score):
        """The image-level score from a map maximum and an image score on the same [0, 1] scale.

        Industrial: ``0.5 * map + 0.5 * score`` (the official rule); medical: the map alone,
        since the detection token is not trained on lesions. Works on floats, numpy arrays and
        torch tensors, in their own dtype.
        """
        if self is Domain.MEDICAL:
            return map_score
        return map_score * 0.5 + image_score * 0.5
