"""Raw model outputs -> what users see: the one post-processing module (numpy only).

Every path that turns a raw anomaly map and a raw image score into a score, a colour scale, a
decision or a mask calls this module: the PyTorch :class:`~moeclip.inference.detector.Detector`,
deployment files, the ONNX and OpenVINO runtimes, the web service, reports and ``moeclip test``.
It imports neither torch nor the model, so the exported runtimes stay torch-free.

Scales:

- raw map: the sum over the 12 maps of ``(z_abnormal + 1 - z_normal) / 2``, blurred and
  upsampled (``maps/*.npy`` hold it);
- uncalibrated probability: ``sigmoid(2 * raw / n_maps - 1)``, the mean per-map probability of
  "abnormal" (:func:`map_probability`);
- calibrated: min-max with the bounds a deployment file measured (:class:`Normalization`), the
  single-image analogue of the official per-class normalisation.

Heat maps and overlays colour the calibrated scale when there is one, else each map's own range
(``map_scale`` "calibrated" / "per-image", :func:`unit_map`).

The image score is the domain's rule (:meth:`~moeclip.model.domain.Domain.combine`) applied to
the map maximum and the raw image score once both are on one of those [0, 1] scales.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import MoECLIPError
from ..model.domain import Domain

NORMALIZATION_FIELDS = ("map_min", "map_max", "score_min", "score_max")


# ---------------------------------------------------------------------------- scales
def map_probability(raw, num_maps: int, dtype=np.float64) -> np.ndarray:
    """Mean per-map anomaly probability implied by a summed raw map value.

    Each map's patch score is ``a = (z1 + 1 - z0) / 2``, so ``z1 - z0 = 2a - 1`` and the softmax
    probability of "abnormal" is ``sigmoid(2a - 1)``; with the maps summed, ``a`` is the raw
    value divided by their number. Scores use float64; whole maps for colours float32 (4x faster).
    """
    with np.errstate(over="ignore"):  # exp overflow of very negative values: probability 0, as it should
        return 1.0 / (1.0 + np.exp(-(2.0 * np.asarray(raw, dtype=dtype) / num_maps - 1.0)))


def normalize(value, lo: float, hi: float, dtype=np.float64) -> np.ndarray:
    """Min-max to [0, 1] with fixed bounds, clipped (a constant range maps to 0)."""
    return np.clip((np.asarray(value, dtype=dtype) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


@dataclass
class Normalization:
    """Calibrated min-max bounds of raw map values and raw image scores."""

    map_min: float
    map_max: float
    score_min: float
    score_max: float

    def map(self, raw, dtype=np.float64) -> np.ndarray:
        return normalize(raw, self.map_min, self.map_max, dtype)

    def score(self, raw) -> float:
        return float(normalize(raw, self.score_min, self.score_max))

    def to_dict(self) -> Dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, float]]) -> Optional["Normalization"]:
        if d is None or isinstance(d, Normalization):
            return d
        return cls(**{k: float(d[k]) for k in NORMALIZATION_FIELDS})

    @classmethod
    def fit(cls, map_min: float, map_max: float, score_min: float, score_max: float,
            headroom: float = 0.0) -> "Normalization":
        """Bounds from observed ranges, the upper ends raised by ``headroom`` times the range.

        Calibrating on normal images only, the largest normal would otherwise sit at 1.0, where
        every stronger anomaly saturates too; a headroom of 1 keeps the normals in [0, 0.5].
        """
        def widen(lo, hi):
            return float(lo), float(hi + headroom * max(hi - lo, 1e-12))

        m0, m1 = widen(map_min, map_max)
        s0, s1 = widen(score_min, score_max)
        return cls(m0, m1, s0, s1)


#: How a heat map's colours are scaled: a deployment's calibrated bounds, or the map's own range.
MAP_SCALES = ("calibrated", "per-image")


def map_scale(normalization: Optional[Normalization]) -> str:
    """The scale :func:`unit_map` uses (``map_scale`` in result lines and the service's answers)."""
    return "calibrated" if Normalization.from_dict(normalization) is not None else "per-image"


def unit_map(raw_map, normalization: Optional[Normalization]) -> np.ndarray:
    """Raw map -> [0, 1] for heat maps and overlays.

    With a calibration (a deployment file's bounds): that fixed scale, so colours compare across
    images. Without one, the map's own min-max ("per-image"): the uncalibrated probability
    ``sigmoid(2 raw / n - 1)`` sits near 0 over the whole image whenever the raw map stays far
    below ``n / 2`` (the demo's model: about 0.001), and a fixed scale would draw every map
    uniformly blue. Per image, red marks where this image is most anomalous, on a normal image
    too: read the colours with the score, or calibrate for colours that compare.
    """
    a = np.asarray(raw_map, dtype=np.float32)
    normalization = Normalization.from_dict(normalization)
    if normalization is not None:
        return normalization.map(a, np.float32).astype(np.float32, copy=False)
    lo, hi = float(a.min()), float(a.max())
    if not hi > lo:  # a flat map has no structure to show
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32, copy=False)


def image_score(map_max: float, raw_score: float, domain: "Domain | str",
                normalization: Optional[Normalization], num_maps: int) -> float:
    """The final image score in [0, 1] of one image (float32 arithmetic, as the model's)."""
    normalization = Normalization.from_dict(normalization)
    if normalization is not None:
        m, s = normalization.map(map_max), normalization.score(raw_score)
    else:
        m, s = map_probability(map_max, num_maps), raw_score
    return float(Domain.parse(domain).combine(np.float32(m), np.float32(s)))


def decide(score: float, threshold: Optional[float]) -> Optional[bool]:
    """``score >= threshold``, or None without a threshold."""
    return None if threshold is None else bool(score >= threshold)


def binary_mask(raw_map, pixel_threshold: float) -> np.ndarray:
    """uint8 mask (0/255) of ``raw_map >= pixel_threshold`` (raw map units)."""
    return ((np.asarray(raw_map) >= pixel_threshold) * 255).astype(np.uint8)


def _axis_taps(n_out: int, n_in: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two source indices and the weight of the second for each output position (align_corners)."""
    pos = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def resize_map(amap, size: Tuple[int, int]) -> np.ndarray:
    """Bilinear resize with ``align_corners=True`` (as the official upsampling): (h, w) -> size.

    Two taps per axis, width then height (torch's order), with in-place products: a 518 px map
    to 12 Mpx in about 0.3 s on one core and two output-sized buffers.
    """
    amap = np.asarray(amap, dtype=np.float32)
    H, W = int(size[0]), int(size[1])
    if amap.shape == (H, W):
        return amap.copy()
    lo, hi, frac = _axis_taps(W, amap.shape[1])
    cols = amap[:, lo] * (1 - frac)
    cols += amap[:, hi] * frac
    lo, hi, frac = _axis_taps(H, amap.shape[0])
    frac = frac[:, None]
    out = np.take(cols, lo, axis=0)
    out *= 1 - frac
    second = np.take(cols, hi, axis=0)
    second *= frac
    out += second
    return out


# ---------------------------------------------------------------------------- thresholds
def fpr_threshold(normal_scores: Sequence[float], max_fpr: float) -> float:
    """The lowest threshold whose false-positive rate on ``normal_scores`` is at most ``max_fpr``.

    Decisions are ``score >= threshold``; with n normals, k = floor(max_fpr * n) of them may be
    flagged, so the threshold sits just above the (k+1)-th highest normal score (the most
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


# ---------------------------------------------------------------------------- one image
@dataclass
class Scored:
    """One image's post-processed outputs."""

    anomaly_map: np.ndarray          # raw map (H, W) float32 at the image's original size
    map_max: float                   # max of the raw map at the model's resolution
    raw_score: float                 # (c_abnormal + 1) / 2
    score: float                     # final image score in [0, 1]
    decision: Optional[bool] = None  # score >= threshold, when a threshold is known
    extra: Dict[str, Any] = field(default_factory=dict)  # per-image extras a runtime returned


@dataclass
class PostProcessor:
    """Everything needed to turn one raw (map, score) pair into a :class:`Scored`."""

    num_maps: int
    domain: str = "industrial"
    normalization: Optional[Normalization] = None
    threshold: Optional[float] = None
    pixel_threshold: Optional[float] = None

    def __post_init__(self):
        self.domain = Domain.parse(self.domain).value
        self.normalization = Normalization.from_dict(self.normalization)

    def __call__(self, raw_map, raw_score: float, size: Optional[Tuple[int, int]] = None) -> Scored:
        """``raw_map`` at the model's resolution; ``size`` (height, width) of the original image."""
        raw_map = np.asarray(raw_map, dtype=np.float32)
        map_max = float(raw_map.max())  # the evaluation resolution's max, as the official rule uses
        score = image_score(map_max, float(raw_score), self.domain, self.normalization, self.num_maps)
        full = resize_map(raw_map, size) if size is not None else raw_map
        return Scored(full, map_max, float(raw_score), score, decide(score, self.threshold))

    def with_domain(self, domain: "Domain | str") -> "PostProcessor":
        """The same scoring under another domain's image-score rule (a per-request choice)."""
        return replace(self, domain=Domain.parse(domain).value)

    @property
    def map_scale(self) -> str:
        """"calibrated" (a deployment's bounds) or "per-image": how :meth:`unit_map` scales."""
        return map_scale(self.normalization)

    def unit_map(self, raw_map) -> np.ndarray:
        """Raw map -> [0, 1] on this post-processor's heat-map scale (:func:`unit_map`)."""
        return unit_map(raw_map, self.normalization)

    def mask(self, raw_map) -> Optional[np.ndarray]:
        return None if self.pixel_threshold is None else binary_mask(raw_map, self.pixel_threshold)
