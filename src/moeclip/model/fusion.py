"""One calibrated fusion of anomaly signals (text, references, batch); numpy only.

Torch-free like :mod:`moeclip.model.domain`, so exported runtimes can apply the same rule.

The signals live on unrelated scales: the zero-shot raw map ``Z`` (a sum over 12 maps, ~0-12),
the few-shot map ``F`` (nearest-neighbour cosine distances, 0.02-0.1 with pretrained CLIP), the
mutual batch map ``U`` (same kind of distances, smaller still). Each is first put on a common
scale by its *own distribution on normal evidence* (median and MAD, so a few anomalous pixels do
not move it)::

    standardise(x, stats) = (x - median) / (1.4826 MAD)   # ~ a z-score: 1 = one normal std

Normal evidence is, with references, leave-one-out over them (each reference scored against the
bank of the others, plus its own zero-shot map: :func:`moeclip.model.fewshot.reference_stats`,
computed once when the bank is built and stored with it); without it, the pixels of the scored
batch itself (most are normal). The fused map is the weighted mean of the standardised signals::

    fused = sum_i w_i standardise(x_i) / sum_i w_i           # with references: w_Z = 1 - w, w_F = w

so a positive affine change of one signal (and of its evidence) changes nothing, ``w = 0`` is
the standardised zero-shot map alone and ``w = 1`` the standardised few-shot map alone.

What users see: the fused map is written back in zero-shot raw units,
``raw = median_Z + scale_Z * fused`` (:func:`to_scale`), so the zero-shot post-processing (heat
map colours, calibration, thresholds, masks) applies unchanged and ``w = 0`` gives exactly the
zero-shot map. Image score: the image-level signals are fused the same way and written back on
the zero-shot image-score scale; text + references have one (the text's raw score ``s``, the
references act through the map), so the image score is the zero-shot rule
``Domain.combine(sigmoid(2 max(raw) / n - 1), s)`` on the fused map.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import MoECLIPError

#: Default weight of the few-shot map (after standardisation) in the fused map.
DEFAULT_REFERENCE_WEIGHT = 0.5
#: MAD -> standard deviation of a normal distribution.
MAD_TO_STD = 1.4826


@dataclass(frozen=True)
class SignalStats:
    """Where one signal's normal evidence sits (``center``) and how wide it is (``scale`` > 0)."""

    center: float
    scale: float

    def to_dict(self) -> Dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d) -> "SignalStats":
        if isinstance(d, SignalStats):
            return d
        return cls(float(d["center"]), float(d["scale"]))


def robust_stats(values) -> SignalStats:
    """Median and ``1.4826 MAD`` of ``values`` (any shape): the normal scale of one signal.

    A signal constant on most of its evidence (MAD 0) falls back to the mean absolute deviation
    (times sqrt(pi/2)), then to 1 (any deviation then counts in the signal's own units).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise MoECLIPError("no finite values to measure a signal's normal statistics on")
    center = float(np.median(v))
    dev = np.abs(v - center)
    scale = MAD_TO_STD * float(np.median(dev))
    if not scale > 0:
        scale = float(np.sqrt(np.pi / 2) * dev.mean())
    if not scale > 0:
        scale = 1.0
    return SignalStats(center, scale)


def standardise(signal, stats: Optional[SignalStats]) -> np.ndarray:
    """``(signal - center) / scale``; without ``stats``, those of the signal itself (:func:`robust_stats`)."""
    x = np.asarray(signal, dtype=np.float64)
    st = robust_stats(x) if stats is None else SignalStats.from_dict(stats)
    return (x - st.center) / st.scale


def check_weight(weight: float) -> float:
    weight = float(weight)
    if not 0.0 <= weight <= 1.0:
        raise MoECLIPError(f"--reference-weight must be in [0, 1], got {weight}")
    return weight


Part = Tuple[object, Optional[SignalStats], float]


def fuse(parts: Sequence[Part]) -> np.ndarray:
    """Weighted mean of standardised signals: ``parts`` is ``[(signal, stats or None, weight), ...]``.

    Signals of one shape (maps or image scores); ``None`` stats: the signal's own robust
    statistics (the batch's, when no references exist). Weights >= 0, not all 0. float64.
    """
    if not parts:
        raise MoECLIPError("nothing to fuse")
    weights = [float(w) for _, _, w in parts]
    if min(weights) < 0 or sum(weights) <= 0:
        raise MoECLIPError(f"fusion weights must be >= 0 and not all 0, got {weights}")
    total = sum(w * standardise(x, st) for (x, st, _), w in zip(parts, weights) if w > 0)
    return total / sum(weights)


def to_scale(fused, stats: SignalStats) -> np.ndarray:
    """Standardised values back in one signal's units: ``center + scale * fused``."""
    st = SignalStats.from_dict(stats)
    return st.center + st.scale * np.asarray(fused, dtype=np.float64)


# ---------------------------------------------------------------------------- text + references
@dataclass(frozen=True)
class ReferenceStats:
    """Normal statistics of a memory bank's references, leave-one-out (one domain's smoothing)."""

    zero_shot: SignalStats   # zero-shot raw map of the references
    few_shot: SignalStats    # each reference's few-shot map against the bank of the others
    domain: str = "industrial"

    def to_json(self) -> str:
        return json.dumps({"zero_shot": self.zero_shot.to_dict(), "few_shot": self.few_shot.to_dict(),
                           "domain": self.domain}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ReferenceStats":
        d = json.loads(text)
        return cls(SignalStats.from_dict(d["zero_shot"]), SignalStats.from_dict(d["few_shot"]), str(d["domain"]))


def reference_parts(zero_shot_raw, few_shot, stats: Optional[ReferenceStats], weight: float):
    """The ``fuse`` parts of text + references (``stats`` None: the batch's own statistics)."""
    w = check_weight(weight)
    return [(zero_shot_raw, None if stats is None else stats.zero_shot, 1.0 - w),
            (few_shot, None if stats is None else stats.few_shot, w)]


def fuse_maps(zero_shot_raw, few_shot, stats: Optional[ReferenceStats],
              weight: float = DEFAULT_REFERENCE_WEIGHT) -> np.ndarray:
    """The fused map in zero-shot raw units (float32), any shape: see the module docstring."""
    zs_stats = robust_stats(zero_shot_raw) if stats is None else stats.zero_shot
    parts = reference_parts(zero_shot_raw, few_shot, stats, weight)
    if stats is None:
        parts[0] = (zero_shot_raw, zs_stats, parts[0][2])
    return to_scale(fuse(parts), zs_stats).astype(np.float32)


def fused_raw(zero_shot_raw, few_shot, raw_scores, stats: Optional[ReferenceStats],
              weight: float = DEFAULT_REFERENCE_WEIGHT):
    """A batch's fusion on the zero-shot raw scales: (maps (B, H, W), image scores (B,)).

    The map is :func:`fuse_maps`; the raw image score stays the text's (the only image-level
    signal here), so the zero-shot rule ``Domain.combine(sigmoid(2 max / n - 1), s)`` gives the
    fused image score. ``stats`` None: the batch's own statistics (fewer than 2 references).
    """
    maps = fuse_maps(zero_shot_raw, few_shot, stats, weight)
    return maps, np.asarray(raw_scores, dtype=np.float32).copy()
