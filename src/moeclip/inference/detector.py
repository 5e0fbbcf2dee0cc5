"""The user-facing inference API: images + an object name -> anomaly maps and scores.

>>> det = Detector.from_checkpoint("runs/visa/checkpoint")
>>> result = det.predict(["part.png"], object="metal nut")[0]
>>> result.score, result.anomaly_map.shape

A thin caller of the pipeline (:mod:`moeclip.inference.pipeline`): the model runs in a
:class:`~moeclip.inference.torch_runtime.TorchRuntime` (or, with reference images, a
:class:`~moeclip.inference.references.FewShotRuntime`), scores and maps come from its
:class:`~moeclip.inference.postprocess.PostProcessor`, as in ``predict`` and ``serve``.
Paths and PIL images are read in the orientation a viewer shows them (EXIF applied).
Above those runtimes and the deployment file (:mod:`moeclip.inference.deploy`), which it turns
into a configured detector (:meth:`Detector.from_deployment`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import MoECLIPError
from ..model.checkpoint import load_model
from ..model.domain import Domain
from ..model.options import build_model
from ..model.prompts import GENERIC_OBJECT
from ..precision import autocast, check_precision, resolve_device
from .deploy import Deployment
from .pipeline import ImageLike, Prediction, decode, score_images
from .postprocess import Normalization, PostProcessor, image_score
from .references import FewShotRuntime, ReferenceBanks, attach_references
from .torch_runtime import TorchRuntime

__all__ = ["Detector", "Prediction", "Normalization", "load_deployment_detector"]


class Detector:
    """A loaded model plus everything needed to score raw images."""

    def __init__(self, model, device: str = "auto", precision: str = "fp32", domain: str = "industrial",
                 image_size: Optional[int] = None, normalization: Optional[Normalization] = None,
                 threshold: Optional[float] = None, object: Optional[str] = None,
                 pixel_threshold: Optional[float] = None):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.precision = precision
        check_precision(self.device, precision)
        self.model.cast_frozen_weights(precision)  # bf16/fp16: same results, no per-batch re-cast
        self.domain = Domain.parse(domain)
        self.image_size = image_size or model.config.backbone.image_size
        self.normalization = Normalization.from_dict(normalization)
        self.threshold = threshold
        self.pixel_threshold = pixel_threshold
        self.object = object
        self.references = None  # few-shot memory banks by object (with_references)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device: str = "auto", precision: str = "fp32",
                        backbone_overrides: Optional[Dict[str, Any]] = None, adapter=None, **kwargs) -> "Detector":
        model = load_model(path, backbone_overrides=backbone_overrides, adapter=adapter)
        return cls(model, device=device, precision=precision, **kwargs)

    @classmethod
    def from_deployment(cls, deployment: Union[Deployment, str, Path], checkpoint: Optional[str] = None,
                        options: Optional[Dict[str, Any]] = None, device: str = "auto", precision: str = "fp32",
                        **overrides) -> "Detector":
        """A detector configured with a deployment (a :class:`Deployment` or its file).

        ``checkpoint``/``options`` replace the stored ones (e.g. the same model moved elsewhere);
        ``overrides`` replace Detector settings (``object``, ``domain``, ``threshold``,
        ``pixel_threshold``); ``None`` keeps the deployment's.
        """
        dep = deployment if isinstance(deployment, Deployment) else Deployment.load(deployment)
        model = build_model(checkpoint or dep.checkpoint, {**dep.model_options, **(options or {})})
        kwargs = dict(domain=dep.domain, normalization=dep.normalizer(), threshold=dep.threshold,
                      pixel_threshold=dep.pixel_threshold, object=dep.object)
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        det = cls(model, device=device, precision=precision, **kwargs)
        if dep.references:  # calibrated few-shot: the normalisation was measured on the fused scale
            det.references = ReferenceBanks.load(dep.references, model=model, weight=dep.reference_weight)
        return det

    @property
    def num_maps(self) -> int:
        return self.model.adapter_config.num_maps

    def post_processor(self, domain: Optional[str] = None) -> PostProcessor:
        """This detector's scoring (normalisation, thresholds, domain) as a PostProcessor."""
        return PostProcessor(self.num_maps, Domain.parse(domain or self.domain).value, self.normalization,
                             self.threshold, self.pixel_threshold)

    def runtime(self):
        """The pipeline runtime: few-shot when reference banks are attached (:meth:`with_references`)."""
        if self.references:
            return FewShotRuntime(self, self.references)
        return TorchRuntime(self)

    def transductive_runtime(self, tokens: Optional[str] = None, mutual_images: Optional[int] = None,
                             mutual_seed: int = 0, mutual_weight: Optional[float] = None, batch_size: int = 8):
        """The fused transductive runtime (:mod:`moeclip.inference.fused`): ``raw`` scores one whole batch."""
        from ..model.fused import DEFAULT_MUTUAL_TOKENS, DEFAULT_MUTUAL_WEIGHT, MutualOptions
        from .fused import TransductiveRuntime

        if self.normalization is not None:
            raise MoECLIPError("this detector's normalisation was calibrated zero-shot; transductive scores are "
                               "on another scale: use a checkpoint without a deployment file with --transductive")
        opts = MutualOptions(tokens or DEFAULT_MUTUAL_TOKENS, mutual_images, mutual_seed,
                             DEFAULT_MUTUAL_WEIGHT if mutual_weight is None else mutual_weight)
        return TransductiveRuntime(self, opts, batch_size)

    def with_references(self, images, object: Optional[str] = None, *, bank_size: Optional[int] = None,
                        fp16: bool = False, weight: Optional[float] = None, batch_size: int = 8) -> "Detector":
        """Few-shot: score ``object`` against these normal reference images from now on; returns ``self``.

        ``images``: paths, folders, globs, PIL images or arrays. Predictions for that object then
        carry the fused map and score (``extra`` holds ``references`` and the zero-shot and
        few-shot parts); see :mod:`moeclip.model.fewshot` and :mod:`moeclip.model.fusion`.
        """
        attach_references(self, images, object, bank_size=bank_size, fp16=fp16, weight=weight,
                          batch_size=batch_size)
        return self

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

    def score_from(self, map_max: float, raw_score: float, domain: Optional[Domain] = None) -> float:
        """The final image score of one (map maximum, raw score) pair under this detector's scoring."""
        return image_score(map_max, raw_score, domain or self.domain, self.normalization, self.num_maps)

    def predict(self, images: Union[ImageLike, Sequence[ImageLike]], object: Optional[str] = None,
                domain: Optional[str] = None, batch_size: int = 8, transductive: bool = False,
                **mutual) -> List[Prediction]:
        """Score images (paths, PIL images or arrays); maps come back at each image's own size.

        ``transductive=True``: the images (2 or more, one object) are scored as one batch, zero-shot
        + mutual (+ few-shot with references) fused (:mod:`moeclip.model.fused`); ``mutual``: the
        keywords of :meth:`transductive_runtime` (``tokens``, ``mutual_images``, ``mutual_seed``,
        ``mutual_weight``).
        """
        if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "convert"):
            images = [images]
        post = self.post_processor(domain)
        obj = object or self.object or GENERIC_OBJECT
        images = list(images)
        results: List[Prediction] = []
        if transductive:
            runtime = self.transductive_runtime(batch_size=batch_size, **mutual)
            batch_size = max(1, len(images))  # one batch: every image meets every other
        elif mutual:
            raise MoECLIPError(f"{sorted(mutual)} need transductive=True")
        else:
            runtime = self.runtime()
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            decoded = [decode(x) for x in chunk]
            for x, scored in zip(chunk, score_images(runtime, post, decoded, obj)):
                path = str(x) if isinstance(x, (str, Path)) else None
                results.append(Prediction.from_scored(scored, obj, post.domain, path))
        return results



def load_deployment_detector(path: Union[str, Path], **kwargs) -> Detector:
    """``Detector.from_deployment(path, **kwargs)``: a ready-to-use Detector with decisions."""
    return Detector.from_deployment(path, **kwargs)
