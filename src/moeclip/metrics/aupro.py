"""Pixel AUPRO (per-region overlap integrated over FPR up to a limit, MVTec AD style).

Definition (Bergmann et al., MVTec AD): the ground-truth regions are the
8-connected components of all masks. At a threshold ``t`` the FPR is the share of
normal pixels scoring ``>= t`` and the PRO is the mean over regions of the share of
the region's pixels scoring ``>= t``. The (FPR, PRO) points of all distinct
thresholds, from (0, 0) to (1, 1), are joined linearly; the area up to
``fpr_limit`` (the curve interpolated at the limit) is divided by ``fpr_limit``.

Exact without a threshold grid or a curve: the piecewise-linear PRO curve is a
sum over anomalous pixels of ramps. A pixel of score ``s`` and weight
``w = 1 / (#regions * |its region|)`` adds 0 up to ``x0 = FPR(> s)``, rises
linearly to ``w`` at ``x1 = FPR(>= s)`` (the negatives tied with it) and stays
there. Its area up to the limit ``L`` is ``w (L - (x0 + x1) / 2)`` when
``x1 <= L``, ``w (L - x0)^2 / (2 (x1 - x0))`` when ``x0 < L < x1``, else 0. So the
same sorted negatives that serve AUROC serve AUPRO, and only the anomalous
pixels need weights.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .ranking import BLOCK, binarize, negatives_above, split_by_label

__all__ = ["aupro", "aupro_from_sorted", "region_weights", "sorted_pixel_split"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def as_map_stack(a: np.ndarray) -> np.ndarray:
    """(H, W) -> (1, H, W); (N, 1, H, W) -> (N, H, W); (N, H, W) unchanged."""
    a = np.asarray(a)
    if a.ndim == 2:
        return a[None]
    if a.ndim == 4 and a.shape[1] == 1:
        return a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"expected maps of shape (N, H, W), got {a.shape}")
    return a


def region_weights(masks: np.ndarray) -> np.ndarray:
    """Weight ``1 / (#regions * |region|)`` of every anomalous pixel, in flat order.

    The order is that of ``masks[masks]`` (image by image, row-major), matching
    :func:`~moeclip.metrics.ranking.split_by_label`. Regions are the
    8-connected components of each image's mask; their weights sum to 1.
    """
    stack = as_map_stack(masks)
    parts = []
    n_regions = 0
    for m in stack:
        m = binarize(m)
        lab, k = ndimage.label(m, structure=_EIGHT_CONNECTED)
        if k == 0:
            continue
        sizes = np.bincount(lab.ravel())
        parts.append(1.0 / sizes[lab[m]])
        n_regions += k
    if n_regions == 0:
        return np.zeros(0, dtype=np.float64)
    weights = np.concatenate(parts)
    weights /= n_regions
    return weights


def aupro_from_sorted(
    pos_sorted: np.ndarray,
    pos_weights: np.ndarray,
    neg_sorted: np.ndarray,
    fpr_limit: float = 0.3,
    *,
    block: int = BLOCK,
) -> float | None:
    """AUPRO from ascending anomalous scores with their region weights and ascending normal scores.

    Sums each anomalous pixel's ramp area (module docstring), block by block.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if pos_weights.shape != pos_sorted.shape:
        raise ValueError("pos_weights must match pos_sorted")
    if pos_sorted.size == 0 or neg_sorted.size == 0:
        return None
    lim = float(fpr_limit)
    area = 0.0
    for i in range(0, pos_sorted.size, block):
        n_gt, n_ge = negatives_above(neg_sorted, pos_sorted[i : i + block])
        w = pos_weights[i : i + block]
        x0 = n_gt / neg_sorted.size
        x1 = n_ge / neg_sorted.size
        full = x1 <= lim  # the whole ramp lies before the limit
        part = ~full & (x0 < lim)  # the limit cuts the ramp of tied normal pixels
        area += float(np.dot(w[full], lim - 0.5 * (x0[full] + x1[full])))
        d0 = lim - x0[part]
        area += float(np.dot(w[part], d0 * d0 / (2.0 * (x1[part] - x0[part]))))
    return area / lim


def sorted_pixel_split(
    scores: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anomalous scores ascending, their region weights, normal scores ascending).

    The one sorted pass that all pixel metrics share. Memory: one copy of the
    maps in their float dtype plus 16 bytes per anomalous pixel (weight, order).
    """
    scores = as_map_stack(scores)
    masks = as_map_stack(masks)
    if scores.shape != masks.shape:
        raise ValueError(f"scores {scores.shape} and masks {masks.shape} differ in shape")
    pos, neg = split_by_label(scores, masks)
    weights = region_weights(masks)
    order = np.argsort(pos)  # ties need no order: each pixel adds its own ramp
    pos = pos[order]
    weights = weights[order]
    del order
    neg.sort()
    for a in (pos, neg):
        if a.size and np.isnan(a[-1]):  # NaN sorts last
            raise ValueError("scores contain NaN")
    return pos, weights, neg


def aupro(scores: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float | None:
    """AUPRO of anomaly maps ``scores`` (N, H, W) against masks (N, H, W).

    A fraction in [0, 1]; ``None`` without anomalous or without normal pixels.
    """
    pos, weights, neg = sorted_pixel_split(scores, masks)
    return aupro_from_sorted(pos, weights, neg, fpr_limit)
