"""Deployment: the small JSON file that turns a model into a yes/no detector, and the pictures it returns.

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

This module imports neither torch nor the model at import time: the ONNX runtime path
(``predict --onnx``) uses its numpy scoring and rendering without PyTorch.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .. import __version__
from ..errors import MoECLIPError
from ..model.prompts import GENERIC_OBJECT

FORMAT = "moeclip-deploy"
VERSION = 1
DOMAINS = ("industrial", "medical")
NORMALIZATION_FIELDS = ("map_min", "map_max", "score_min", "score_max")

#: The colormap of heat maps and overlays.
COLORMAP = "jet"


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
        from ..fileio import atomic_write_text

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
        for key in ("clip_model", "clip_weights"):
            value = dep.model_options.get(key)
            if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
                dep.model_options[key] = str(base / value)
        return dep

    # -- use
    def normalizer(self):
        """The :class:`~moeclip.inference.detector.Normalization` (imports torch)."""
        from .detector import Normalization

        return None if self.normalization is None else Normalization(**{k: float(self.normalization[k])
                                                                        for k in NORMALIZATION_FIELDS})

    def detector(self, checkpoint: Optional[str] = None, options: Optional[Dict[str, Any]] = None,
                 device: str = "auto", precision: str = "fp32", **overrides):
        """A :class:`~moeclip.inference.detector.Detector` configured with this deployment.

        ``checkpoint``/``options`` replace the stored ones (e.g. the same model moved elsewhere);
        ``overrides`` replace Detector settings (``object``, ``domain``, ``threshold``).
        """
        from ..cli.common import build_model
        from .detector import Detector

        model = build_model(checkpoint or self.checkpoint, {**self.model_options, **(options or {})})
        kwargs = dict(domain=self.domain, normalization=self.normalizer(), threshold=self.threshold,
                      object=self.object)
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return Detector(model, device=device, precision=precision, **kwargs)


def load_detector(path: str | Path, **kwargs):
    """``Deployment.load(path).detector(**kwargs)``: a ready-to-use Detector with decisions."""
    return Deployment.load(path).detector(**kwargs)


def absolute_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """Model options with existing file paths made absolute, so a deployment works from any folder."""
    out = dict(options)
    for key in ("clip_model", "clip_weights"):
        value = out.get(key)
        if isinstance(value, str) and Path(value).exists():
            out[key] = str(Path(value).resolve())
    return out


# ---------------------------------------------------------------------------- thresholds
def fpr_threshold(normal_scores: Sequence[float], max_fpr: float) -> float:
    """The lowest threshold whose false-positive rate on ``normal_scores`` is at most ``max_fpr``.

    Decisions are ``score >= threshold``; with n normals, k = floor(max_fpr * n) of them may
    be flagged, so the threshold sits just above the (k+1)-th highest normal score (the most
    sensitive threshold that meets the bound on the calibration images).
    """
    s = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())[::-1]
    if s.size == 0:
        raise MoECLIPError("no normal scores to calibrate on")
    if not 0.0 <= max_fpr < 1.0:
        raise MoECLIPError(f"max FPR must be in [0, 1), got {max_fpr}")
    k = int(math.floor(max_fpr * s.size + 1e-9))
    return float(np.nextafter(s[k], np.inf))


def f1_threshold(scores: Sequence[float], labels: Sequence[int]) -> Tuple[float, float]:
    """(threshold, F1) maximising F1 of ``score >= threshold``; the threshold is a score value."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.size != y.size:
        raise MoECLIPError(f"{s.size} scores but {y.size} labels")
    positives = int(y.sum())
    if positives == 0 or positives == y.size:
        raise MoECLIPError("an F1-optimal threshold needs both normal and anomalous samples")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # one threshold per distinct value, after all its ties
    tp, fp, s = tp[last], fp[last], s[last]
    f1 = 2.0 * tp / (positives + tp + fp)
    best = int(np.argmax(f1))
    return float(s[best]), float(f1[best])


def rates(scores: Sequence[float], labels: Sequence[int], threshold: float) -> Dict[str, float]:
    """FPR, TPR (recall), precision and F1 of ``score >= threshold`` (NaN where undefined)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    pred = s >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    pos, neg = int(y.sum()), int((~y).sum())
    nan = float("nan")
    prec = tp / (tp + fp) if tp + fp else nan
    rec = tp / pos if pos else nan
    f1 = 2 * tp / (pos + tp + fp) if pos + tp + fp else nan
    return {"fpr": fp / neg if neg else nan, "tpr": rec, "precision": prec, "f1": f1}


def fit_normalization(map_min: float, map_max: float, score_min: float, score_max: float,
                      headroom: float = 0.0) -> Dict[str, float]:
    """Min-max normalisation fields, the upper ends raised by ``headroom`` times the observed range.

    Calibrating on normal images only, the largest normal would otherwise sit at 1.0, where
    every stronger anomaly saturates too; a headroom of 1 keeps the normals in [0, 0.5].
    """
    def widen(lo, hi):
        span = max(hi - lo, 1e-12)
        return float(lo), float(hi + headroom * span)

    m0, m1 = widen(map_min, map_max)
    s0, s1 = widen(score_min, score_max)
    return {"map_min": m0, "map_max": m1, "score_min": s0, "score_max": s1}


# ---------------------------------------------------------------------------- scoring without torch
def uncalibrated_map_probability(value, num_maps: int) -> np.ndarray:
    """numpy twin of :func:`moeclip.inference.detector.uncalibrated_map_probability`."""
    return 1.0 / (1.0 + np.exp(-(2.0 * np.asarray(value, dtype=np.float64) / num_maps - 1.0)))


def normalize(value, lo: float, hi: float) -> np.ndarray:
    return np.clip((np.asarray(value, dtype=np.float64) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def unit_map(raw_map: np.ndarray, normalization: Optional[Dict[str, float]], num_maps: int) -> np.ndarray:
    """Raw map -> [0, 1] on a fixed scale (the deployment's, else the uncalibrated probability),
    so that colours are comparable across images (a per-image min-max would paint every normal
    image red somewhere)."""
    if normalization is not None:
        return normalize(raw_map, normalization["map_min"], normalization["map_max"]).astype(np.float32)
    return uncalibrated_map_probability(raw_map, num_maps).astype(np.float32)


def final_score(map_max: float, raw_score: float, domain: str, normalization: Optional[Dict[str, float]],
                num_maps: int) -> float:
    """numpy twin of :meth:`moeclip.inference.detector.Detector.score_from` (same float32 rounding)."""
    if normalization is not None:
        m = float(normalize(map_max, normalization["map_min"], normalization["map_max"]))
        s = float(normalize(raw_score, normalization["score_min"], normalization["score_max"]))
    else:
        m, s = float(uncalibrated_map_probability(map_max, num_maps)), float(raw_score)
    m32, s32 = np.float32(m), np.float32(s)
    out = m32 if domain == "medical" else np.float32(0.5) * m32 + np.float32(0.5) * s32
    return float(np.float32(out))


def resize_map(amap: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Bilinear resize with ``align_corners=True`` (as the official upsampling) in numpy: (h, w) -> size."""
    amap = np.asarray(amap, dtype=np.float32)
    H, W = int(size[0]), int(size[1])
    if amap.shape == (H, W):
        return amap.copy()

    def weights(n_out: int, n_in: int) -> np.ndarray:
        pos = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (pos - lo).astype(np.float32)
        m = np.zeros((n_out, n_in), dtype=np.float32)
        rows = np.arange(n_out)
        np.add.at(m, (rows, lo), 1.0 - frac)
        np.add.at(m, (rows, hi), frac)
        return m

    return (weights(H, amap.shape[0]) @ amap @ weights(W, amap.shape[1]).T).astype(np.float32)


# ---------------------------------------------------------------------------- pictures
def heatmap_rgb(unit: np.ndarray) -> np.ndarray:
    """[0, 1] map -> uint8 (H, W, 3) colours of :data:`COLORMAP` (matplotlib, no pyplot)."""
    import matplotlib

    cmap = matplotlib.colormaps[COLORMAP]
    return (cmap(np.clip(unit, 0.0, 1.0))[..., :3] * 255.0 + 0.5).astype(np.uint8)


def overlay(image: Image.Image, unit: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The heat map blended over the image (both at the image's size)."""
    heat = Image.fromarray(heatmap_rgb(unit), mode="RGB")
    if heat.size != image.size:
        heat = heat.resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, alpha)


def mask_image(raw_map: np.ndarray, pixel_threshold: float) -> Image.Image:
    """Binary mask (0/255, mode L) of ``raw_map >= pixel_threshold``."""
    return Image.fromarray(((np.asarray(raw_map) >= pixel_threshold) * 255).astype(np.uint8), mode="L")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write a PNG through a temporary file so a crash never leaves a half-written picture."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
