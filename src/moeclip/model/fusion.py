"""Fusing the zero-shot and the few-shot anomaly maps (WinCLIP+-style); numpy only.

Torch-free like :mod:`moeclip.model.domain`, so exported runtimes can apply the same rule.

With ``n`` maps, a raw zero-shot map value ``Z`` (the sum of the per-map scores) reads as the
mean per-map probability of "abnormal" ``P = sigmoid(2 Z / n - 1)`` (the uncalibrated scale of
:func:`moeclip.inference.postprocess.map_probability`). The few-shot map ``F`` already lies in
[0, 1] (see :mod:`moeclip.model.fewshot`). With ``w`` the reference weight::

    fused map   M = (1 - w) P + w F
    image score = Domain.combine(max M, (s + max F) / 2)    # s: raw zero-shot image score

so industrial scores ``0.5 max M + 0.25 s + 0.25 max F`` and medical scores ``max M``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MoECLIPError
from .domain import Domain

#: Default weight of the few-shot map in the fused map.
DEFAULT_REFERENCE_WEIGHT = 0.5


def zero_shot_probability(raw_map, num_maps: int) -> np.ndarray:
    """``sigmoid(2 raw / n - 1)``: the mean per-map abnormal probability of a summed raw map."""
    return 1.0 / (1.0 + np.exp(-(2.0 * np.asarray(raw_map, dtype=np.float64) / num_maps - 1.0)))


def check_weight(weight: float) -> float:
    weight = float(weight)
    if not 0.0 <= weight <= 1.0:
        raise MoECLIPError(f"--reference-weight must be in [0, 1], got {weight}")
    return weight


def fuse_maps(zero_shot_raw, few_shot, num_maps: int, weight: float = DEFAULT_REFERENCE_WEIGHT) -> np.ndarray:
    """``(1 - w) sigmoid(2 Z / n - 1) + w F`` elementwise, float32."""
    w = check_weight(weight)
    p = zero_shot_probability(zero_shot_raw, num_maps)
    return ((1.0 - w) * p + w * np.asarray(few_shot, dtype=np.float64)).astype(np.float32)


@dataclass
class FusedScore:
    """One image's few-shot result and the raw parts it was built from."""

    anomaly_map: np.ndarray   # fused map in [0, 1] at the resolution it was given
    score: float              # final image score in [0, 1]
    map_max: float            # max of the fused map
    zero_shot_map_max: float  # max of the raw zero-shot map (sum over the maps)
    zero_shot_score: float    # raw zero-shot image score (c_abnormal + 1) / 2
    few_shot_map_max: float   # max of the few-shot map, in [0, 1]


def fuse(zero_shot_raw, few_shot, raw_score: float, num_maps: int, domain: "Domain | str" = "industrial",
         weight: float = DEFAULT_REFERENCE_WEIGHT) -> FusedScore:
    """Fused map and image score of one image; both maps (H, W) at the same resolution."""
    fused = fuse_maps(zero_shot_raw, few_shot, num_maps, weight)
    f_max = float(np.max(few_shot))
    m_max = float(fused.max())
    image_part = np.float32(0.5) * (np.float32(raw_score) + np.float32(f_max))
    score = float(Domain.parse(domain).combine(np.float32(m_max), image_part))
    return FusedScore(fused, score, m_max, float(np.max(zero_shot_raw)), float(raw_score), f_max)


def to_raw_scale(fused, num_maps: int, eps: float = 1e-7) -> np.ndarray:
    """The raw zero-shot value whose probability ``sigmoid(2 raw / n - 1)`` is the fused map value.

    Lets a fused map travel through the zero-shot post-processing unchanged: heat maps, masks and
    the uncalibrated image score read it back exactly (to float32 rounding).
    """
    m = np.clip(np.asarray(fused, dtype=np.float64), eps, 1.0 - eps)
    return (num_maps * (np.log(m / (1.0 - m)) + 1.0) / 2.0).astype(np.float32)


def fused_raw(zero_shot_raw, few_shot, raw_scores, num_maps: int, weight: float = DEFAULT_REFERENCE_WEIGHT):
    """A batch's fusion on the zero-shot raw scales: (maps (B, H, W), image scores (B,)).

    The map is :func:`to_raw_scale` of the fused map and the score ``(s + max M_fs) / 2``, so that
    the zero-shot rule ``Domain.combine(sigmoid(2 max / n - 1), score)`` gives the fused image score.
    """
    few = np.asarray(few_shot, dtype=np.float32)
    maps = to_raw_scale(fuse_maps(zero_shot_raw, few, num_maps, weight), num_maps)
    f_max = few.reshape(few.shape[0], -1).max(1)
    scores = (np.float32(0.5) * (np.asarray(raw_scores, dtype=np.float32) + f_max)).astype(np.float32)
    return maps, scores
