"""The user-facing inference API: images + an object name -> anomaly maps and scores.

>>> det = Detector.from_checkpoint("runs/visa/checkpoint")
>>> result = det.predict(["part.png"], object="metal nut")[0]
>>> result.score, result.anomaly_map.shape
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..data.imageio import load_image, to_pil_rgb
from ..data.transforms import preprocess_image
from ..precision import autocast, check_precision, resolve_device
from ..model.prompts import GENERIC_OBJECT
from ..model.scoring import Domain, final_image_score

ImageLike = Union[str, Path, np.ndarray, Any]  # a path, a numpy array or a PIL image


@dataclass
class Normalization:
    """Per-deployment score scaling, the single-image analogue of the official per-class min-max."""

    map_min: float
    map_max: float
    score_min: float
    score_max: float

    def map(self, x):
        return np.clip((x - self.map_min) / max(self.map_max - self.map_min, 1e-12), 0.0, 1.0)

    def score(self, x):
        return float(np.clip((x - self.score_min) / max(self.score_max - self.score_min, 1e-12), 0.0, 1.0))


@dataclass
class Prediction:
    anomaly_map: np.ndarray          # raw map (H, W) float32 at the image's original size
    raw_score: float                 # (c_abnormal + 1) / 2
    map_max: float
    score: float                     # in [0, 1]
    object: str
    domain: str
    path: Optional[str] = None
    decision: Optional[bool] = None  # score >= threshold, when a threshold is known
    extra: Dict[str, Any] = field(default_factory=dict)


def uncalibrated_map_probability(map_value, num_maps: int):
    """Mean per-map anomaly probability implied by a summed map value.

    Each map's patch score is ``a = (z1 + 1 - z0) / 2``, so ``z1 - z0 = 2a - 1`` and the
    softmax probability of "abnormal" is ``sigmoid(2a - 1)``; with the 12 maps summed,
    ``a`` is the map value divided by their number.
    """
    return 1.0 / (1.0 + np.exp(-(2.0 * np.asarray(map_value, dtype=np.float64) / num_maps - 1.0)))


class Detector:
    """A loaded model plus everything needed to score raw images."""

    def __init__(self, model, device: str = "auto", precision: str = "fp32", domain: str = "industrial",
                 image_size: Optional[int] = None, normalization: Optional[Normalization] = None,
                 threshold: Optional[float] = None, object: Optional[str] = None):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.precision = precision
        check_precision(self.device, precision)
        self.model.cast_frozen_weights(precision)  # bf16/fp16: same results, no per-batch re-cast
        self.domain = Domain.parse(domain)
        self.image_size = image_size or model.config.backbone.image_size
        self.normalization = normalization
        self.threshold = threshold
        self.object = object

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device: str = "auto", precision: str = "fp32",
                        backbone_overrides: Optional[Dict[str, Any]] = None, adapter=None, **kwargs) -> "Detector":
        from ..model.checkpoint import load_model

        model = load_model(path, backbone_overrides=backbone_overrides, adapter=adapter)
        return cls(model, device=device, precision=precision, **kwargs)

    @property
    def num_maps(self) -> int:
        return self.model.adapter_config.num_maps

    def _as_pil(self, image: ImageLike):
        if isinstance(image, (str, Path)):
            return load_image(image), str(image)
        return to_pil_rgb(image), None

    def text_features(self, object: Optional[str]) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.text_features(object or self.object or GENERIC_OBJECT)

    @torch.inference_mode()
    def predict_tensors(self, batch: torch.Tensor, object: Optional[str] = None,
                        domain: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """Preprocessed (B, 3, S, S) -> raw maps (B, S, S) float32 and raw scores (B,)."""
        domain = Domain.parse(domain or self.domain)
        text = self.text_features(object)
        with autocast(self.device, self.precision):
            out = self.model.predict(batch.to(self.device), text, domain)
        return {"anomaly_map": out["anomaly_map"].float(), "image_score": out["image_score"].float()}

    def score_from(self, map_max: float, raw_score: float, domain: Domain) -> float:
        if self.normalization is not None:
            m, s = float(self.normalization.map(map_max)), self.normalization.score(raw_score)
        else:
            m, s = float(uncalibrated_map_probability(map_max, self.num_maps)), float(raw_score)
        return float(final_image_score(torch.tensor(m), torch.tensor(s), domain))

    def predict(self, images: Union[ImageLike, Sequence[ImageLike]], object: Optional[str] = None,
                domain: Optional[str] = None, batch_size: int = 8) -> List[Prediction]:
        """Score images (paths, PIL images or arrays); maps come back at each image's own size."""
        if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "convert"):
            images = [images]
        domain_e = Domain.parse(domain or self.domain)
        obj = object or self.object or GENERIC_OBJECT
        results: List[Prediction] = []
        images = list(images)
        for start in range(0, len(images), batch_size):
            chunk = [self._as_pil(x) for x in images[start:start + batch_size]]
            batch = torch.stack([preprocess_image(img, self.image_size) for img, _ in chunk])
            out = self.predict_tensors(batch, obj, domain_e.value)
            for (img, path), amap, raw in zip(chunk, out["anomaly_map"], out["image_score"]):
                results.append(self._prediction(amap, float(raw), (img.height, img.width), obj, domain_e, path))
        return results

    def _prediction(self, amap: torch.Tensor, raw: float, size, obj: str, domain: Domain,
                    path: Optional[str]) -> Prediction:
        full = F.interpolate(amap[None, None], size=size, mode="bilinear", align_corners=True)[0, 0]
        full = full.cpu().numpy().astype(np.float32)
        mmax = float(amap.max())  # the evaluation resolution's max, as the official rule uses
        score = self.score_from(mmax, raw, domain)
        decision = None if self.threshold is None else bool(score >= self.threshold)
        return Prediction(full, raw, mmax, score, obj, domain.value, path, decision)
