"""Deployment: the small JSON file that turns a model into a yes/no detector.

``moeclip calibrate`` writes a deployment file; ``predict --deploy``, ``serve --deploy`` and
``export onnx --deploy`` read it::

    {
      "format": "moeclip-deploy", "version": 1,
      "checkpoint": "/abs/path/ckpt",  "model_options": {"image_size": 518, ...},
      "object": "metal nut", "domain": "industrial",
      "threshold": 0.61,                # image decision: score >= threshold
      "pixel_threshold": 3.2,           # binary masks: raw map value >= pixel_threshold
      "normalization": {"map_min": ..., "map_max": ..., "score_min": ..., "score_max": ...},
      "calibration": {...statistics of the calibration run...}
    }

``pixel_threshold`` is in raw anomaly-map units (the ``maps/*.npy`` values), so a mask can be
made from a saved map without the model. ``threshold`` is on the final score in [0, 1], which
the ``normalization`` defines.

Only the file lives here: what it means for a score is :mod:`moeclip.inference.postprocess`
(:meth:`Deployment.post_processor`); the model it names is loaded by
:meth:`Detector.from_deployment <moeclip.inference.detector.Detector.from_deployment>` (above this
module). This module imports neither torch nor the model, so the ONNX runtime path
(``predict --onnx``) reads deployments without PyTorch.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from .. import __version__
from ..errors import MoECLIPError
from ..fileio import atomic_write_text
from ..model.domain import Domain
from ..model.prompts import GENERIC_OBJECT
from .postprocess import NORMALIZATION_FIELDS, Normalization, PostProcessor

FORMAT = "moeclip-deploy"
VERSION = 1
DOMAINS = tuple(d.value for d in Domain)


# ---------------------------------------------------------------------------- the file
@dataclass
class Deployment:
    """Everything needed to turn raw maps/scores into decisions for one object."""

    object: str = GENERIC_OBJECT
    domain: str = "industrial"
    threshold: Optional[float] = None
    pixel_threshold: Optional[float] = None
    normalization: Optional[Dict[str, float]] = None
    checkpoint: Optional[str] = None
    model_options: Dict[str, Any] = field(default_factory=dict)
    calibration: Dict[str, Any] = field(default_factory=dict)
    references: Optional[str] = None   # few-shot: memory bank file (calibrate --reference), beside this file
    reference_weight: float = 0.5
    created: Optional[str] = None
    moeclip_version: str = __version__

    def validate(self, source: str = "deployment") -> None:
        if not isinstance(self.object, str) or not self.object.strip():
            raise MoECLIPError(f"{source}: 'object' must be a non-empty string")
        if self.domain not in DOMAINS:
            raise MoECLIPError(f"{source}: 'domain' must be one of {DOMAINS}, got {self.domain!r}")
        for name in ("threshold", "pixel_threshold"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise MoECLIPError(f"{source}: {name!r} must be a finite number, got {value!r}")
        if self.normalization is not None:
            missing = [k for k in NORMALIZATION_FIELDS if k not in self.normalization]
            if missing:
                raise MoECLIPError(f"{source}: normalization lacks {missing}")
            try:
                finite = all(math.isfinite(float(self.normalization[k])) for k in NORMALIZATION_FIELDS)
            except (TypeError, ValueError):
                finite = False
            if not finite:
                raise MoECLIPError(f"{source}: normalization values must be finite numbers")

    # -- serialisation
    def to_dict(self) -> Dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write atomically; refuses to replace an existing file unless ``overwrite``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise MoECLIPError(f"{path} already exists (use --overwrite to replace it)")
        self.validate(str(path))
        if self.created is None:
            self.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, doc: Dict[str, Any], source: str = "deployment") -> "Deployment":
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise MoECLIPError(f"{source}: not a moeclip deployment file (format must be {FORMAT!r})")
        version = doc.get("version", 0)
        if not isinstance(version, int) or version > VERSION:
            raise MoECLIPError(f"{source}: deployment version {version!r} is not one this moeclip "
                               f"understands (up to {VERSION}); upgrade moeclip")
        values = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        if not isinstance(values.get("model_options", {}), dict) or not isinstance(values.get("calibration", {}), dict):
            raise MoECLIPError(f"{source}: 'model_options' and 'calibration' must be JSON objects")
        dep = cls(**values)
        dep.validate(source)
        return dep

    @classmethod
    def load(cls, path: str | Path) -> "Deployment":
        """Read a deployment file; relative checkpoint/model paths are taken relative to the file."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise MoECLIPError(f"{path}: deployment file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise MoECLIPError(f"{path}: cannot read deployment file ({exc})") from None
        except json.JSONDecodeError as exc:
            raise MoECLIPError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        dep = cls.from_dict(doc, str(path))
        base = path.resolve().parent
        if dep.checkpoint and not Path(dep.checkpoint).is_absolute():
            dep.checkpoint = str(base / dep.checkpoint)
        if dep.references and not Path(dep.references).is_absolute():
            dep.references = str(base / dep.references)
        for key in ("clip_model", "clip_weights"):
            value = dep.model_options.get(key)
            if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
                dep.model_options[key] = str(base / value)
        return dep

    # -- use
    def normalizer(self) -> Optional[Normalization]:
        """The calibrated :class:`~moeclip.inference.postprocess.Normalization`, if any."""
        return Normalization.from_dict(self.normalization)

    def post_processor(self, num_maps: int, threshold: Optional[float] = None,
                       pixel_threshold: Optional[float] = None, domain: Optional[str] = None) -> PostProcessor:
        """This deployment's scoring; ``threshold``/``pixel_threshold``/``domain`` override its values."""
        return PostProcessor(num_maps, domain or self.domain, self.normalizer(),
                             self.threshold if threshold is None else threshold,
                             self.pixel_threshold if pixel_threshold is None else pixel_threshold)
