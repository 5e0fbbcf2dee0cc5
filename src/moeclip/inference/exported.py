"""What the runtimes of exported models (ONNX, OpenVINO) share: numpy preprocessing, metadata,
deployment, post-processing, ``raw`` (the pipeline's :class:`~moeclip.inference.pipeline.Runtime`)
and ``predict``.

numpy + PIL only: importing this module imports neither torch nor any inference engine.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..errors import MoECLIPError
from .deploy import Deployment
from .pipeline import Prediction, Runtime, score_images
from .postprocess import PostProcessor

# CLIP normalisation (as moeclip.data.transforms, repeated here to stay torch-free)
CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """The official preprocessing in numpy: PIL bicubic resize to SxS, /255, CLIP normalise -> (3, S, S).

    Equal to :func:`moeclip.data.transforms.preprocess_image` (torchvision resizes PIL images
    with PIL itself).
    """
    img = image if image.mode == "RGB" else image.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    a = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    a = (a - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(a.transpose(2, 0, 1))


class ExportedRuntime(Runtime):
    """Base of the pipeline runtimes of exported models; a subclass loads the model and defines ``run``.

    Object, domain, image size and number of maps come from the model's metadata;
    ``deployment`` (default: the one stored at export) supplies the post-processing.
    """

    path: Path

    def _set_metadata(self, path: Path, meta: Dict[str, str], deployment: Optional[Deployment]) -> None:
        self.path = path
        self.metadata = meta
        self.object = meta["object"]
        self.domain = meta["domain"]
        self.image_size = int(meta["image_size"])
        self.num_maps = int(meta["num_maps"])
        stored = None
        if "deployment" in meta:
            stored = Deployment.from_dict(json.loads(meta["deployment"]), f"{path} metadata")
        if deployment is not None and deployment.object != self.object:
            raise MoECLIPError(f"the deployment is for {deployment.object!r} but {path} was exported for "
                               f"{self.object!r}; export again with that deployment")
        self.deployment = deployment or stored

    def post_processor(self, threshold: Optional[float] = None,
                       pixel_threshold: Optional[float] = None) -> PostProcessor:
        """The deployment's scoring (threshold and pixel threshold overridable), else uncalibrated."""
        if self.deployment is not None:
            return self.deployment.post_processor(self.num_maps, threshold, pixel_threshold, self.domain)
        return PostProcessor(self.num_maps, self.domain, None, threshold, pixel_threshold)

    def run(self, batch: np.ndarray) -> Dict[str, np.ndarray]:
        """Preprocessed (B, 3, S, S) float32 -> every output of the graph by name."""
        raise NotImplementedError

    def raw(self, images: Sequence[Image.Image], object: Optional[str] = None,
            domain: Optional[str] = None) -> Tuple[np.ndarray, ...]:
        """RGB PIL images -> (raw maps (B, S, S), raw image scores (B,)[, extras]) for the exported object.

        A few-shot export adds ``{"references": K}`` (its metadata), as PyTorch's few-shot lines carry it.
        """
        if object not in (None, self.object) or domain not in (None, self.domain):
            raise MoECLIPError(f"{self.path} was exported for {self.object!r} ({self.domain}); "
                               f"export again for {object!r} ({domain})")
        out = self.run(np.stack([preprocess(img, self.image_size) for img in images]))
        maps, scores = out["anomaly_map"].astype(np.float32), out["image_score"].astype(np.float32)
        if "references" in self.metadata:
            return maps, scores, {"references": np.full(len(images), int(self.metadata["references"]))}
        return maps, scores


class ExportedDetector:
    """Mixin over an :class:`ExportedRuntime`: its post-processing and ``predict`` as the PyTorch ``Detector``.

    ``threshold``/``pixel_threshold`` override the deployment's.
    """

    def _set_post(self, threshold: Optional[float], pixel_threshold: Optional[float]) -> None:
        self.post = self.post_processor(threshold, pixel_threshold)

    normalization = property(lambda self: self.post.normalization)
    threshold = property(lambda self: self.post.threshold)
    pixel_threshold = property(lambda self: self.post.pixel_threshold)

    def predict(self, images: Sequence[Image.Image], batch_size: int = 8) -> List[Prediction]:
        """Score RGB PIL images; maps come back at each image's own size."""
        results: List[Prediction] = []
        images = list(images)
        for start in range(0, len(images), batch_size):
            for scored in score_images(self, self.post, images[start:start + batch_size], self.object):
                results.append(Prediction.from_scored(scored, self.object, self.domain))
        return results

