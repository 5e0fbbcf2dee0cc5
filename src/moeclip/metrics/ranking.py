"""Exact binary AUROC, average precision and F1-max for tens of millions of scores.

Why not scikit-learn: each of its curves argsorts the scores (int64 indices plus
float64 copies, about 20 bytes a pixel) and the three pixel metrics sort three
times. Every metric here depends only on one thing: for each positive's score
``v``, how many negatives (and positives) score above ``v`` and at or above it.
So the scores are split by label into two float32 copies (the only large
allocation, 4 bytes a pixel), both are sorted in place once, and the positive
scores are binary-searched, block by block, in the sorted arrays. The results
equal scikit-learn's definitions, ties included:

- AUROC: the trapezoidal ROC area, i.e. the Mann-Whitney statistic with ties
  counting one half.
- AP: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds; recall only
  moves at thresholds holding positives, so only those terms are summed.
- F1-max: ``max 2PR / (P + R)`` over the thresholds of ``precision_recall_curve``;
  lowering a threshold past negatives alone only lowers precision, so the maximum
  sits at a threshold equal to a positive score.

Undefined cases (no positives or no negatives) give ``None``.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "auroc",
    "average_precision",
    "binary_curve_metrics",
    "binarize",
    "f1_max",
    "metrics_from_sorted",
    "negatives_above",
    "split_by_label",
]

#: Elements copied per step in :func:`split_by_label`; bounds its temporaries (a few MB).
CHUNK = 1 << 20
#: Positives handled per step by the metric sums; each needs ~50 bytes of temporaries.
BLOCK = 1 << 18

_NONE_METRICS = {"auroc": None, "ap": None, "f1_max": None}


def binarize(labels: np.ndarray) -> np.ndarray:
    """Boolean labels: bool stays as is, anything else is ``> 0.5``.

    ``> 0.5`` (not ``!= 0``) so that 0/1, 0/255 and -1/+1 labels all mean what
    scikit-learn would take them to mean.
    """
    labels = np.asarray(labels)
    return labels if labels.dtype == bool else labels > 0.5


def _work_dtype(dtype: np.dtype) -> np.dtype:
    """float32/float64 scores keep their dtype; others get one that holds them exactly."""
    if dtype in (np.float32, np.float64):
        return np.dtype(dtype)
    if dtype == np.float16:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def split_by_label(
    scores: np.ndarray, labels: np.ndarray, *, chunk: int = CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Copy ``scores`` into (positive scores, negative scores), in flat order.

    Works chunk by chunk so that no full-size boolean or index temporary exists;
    the two outputs together take exactly one copy of the scores.
    """
    s = np.asarray(scores).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    dtype = _work_dtype(s.dtype)
    n = s.size
    if y.dtype == bool:
        n_pos = int(np.count_nonzero(y))
    else:
        n_pos = sum(int(np.count_nonzero(binarize(y[i : i + chunk]))) for i in range(0, n, chunk))
    pos = np.empty(n_pos, dtype=dtype)
    neg = np.empty(n - n_pos, dtype=dtype)
    ip = ineg = 0
    for i in range(0, n, chunk):  # temporaries are chunk-sized (a few MB)
        yc = binarize(y[i : i + chunk])
        sc = s[i : i + chunk]
        k = int(np.count_nonzero(yc))
        m = yc.size - k
        pos[ip : ip + k] = sc[yc]
        neg[ineg : ineg + m] = sc[~yc]
        ip += k
        ineg += m
    return pos, neg


def _check_sorted_finite(*sorted_arrays: np.ndarray) -> None:
    """NaN sorts last, so a sorted array holds NaN iff its last element is NaN."""
    for a in sorted_arrays:
        if a.size and np.isnan(a[-1]):
            raise ValueError("scores contain NaN")


def negatives_above(neg_sorted: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each value: (#negatives > value, #negatives >= value), from sorted negatives."""
    values = values.astype(neg_sorted.dtype, copy=False)
    n = neg_sorted.size
    n_gt = n - np.searchsorted(neg_sorted, values, side="right")
    n_ge = n - np.searchsorted(neg_sorted, values, side="left")
    return n_gt, n_ge


def metrics_from_sorted(pos_sorted: np.ndarray, neg_sorted: np.ndarray, *, block: int = BLOCK) -> dict:
    """AUROC, AP and F1-max from positive and negative scores, each sorted ascending.

    Written per positive (not per distinct value) so that it runs in blocks with
    block-sized temporaries: a positive of score ``v`` sees the threshold ``v``,
    where TP = #positives >= v and FP = #negatives >= v.
    """
    p, n = pos_sorted.size, neg_sorted.size
    if p == 0 or n == 0:
        return dict(_NONE_METRICS)
    _check_sorted_finite(pos_sorted, neg_sorted)
    wins2 = ap_sum = 0.0
    f1_best = 0.0
    for i in range(0, p, block):
        v = pos_sorted[i : i + block]
        n_gt, n_ge = negatives_above(neg_sorted, v)
        # Each positive beats the negatives below it and ties half of those equal to it.
        wins2 += float(np.sum(2 * n - n_gt - n_ge, dtype=np.float64))
        tp = (p - np.searchsorted(pos_sorted, v, side="left")).astype(np.float64)
        fp = n_ge.astype(np.float64)
        # Recall steps by 1/P at each positive; AP sums the precision there.
        ap_sum += float(np.sum(tp / (tp + fp)))
        f1_best = max(f1_best, float(np.max(2.0 * tp / (tp + fp + p))))
    return {"auroc": wins2 / (2.0 * p * n), "ap": ap_sum / p, "f1_max": f1_best}


def binary_curve_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    """``{"auroc", "ap", "f1_max"}`` of ``scores`` (any shape) against binary ``labels``.

    One split and one in-place sort serve all three metrics. Values are fractions
    in [0, 1], or ``None`` when the labels hold one class only.
    """
    pos, neg = split_by_label(scores, labels)
    if pos.size == 0 or neg.size == 0:
        return dict(_NONE_METRICS)
    pos.sort()
    neg.sort()
    return metrics_from_sorted(pos, neg)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (as ``sklearn.metrics.roc_auc_score``), or None."""
    return binary_curve_metrics(scores, labels)["auroc"]


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Average precision (as ``sklearn.metrics.average_precision_score``), or None."""
    return binary_curve_metrics(scores, labels)["ap"]


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Best F1 over the thresholds of ``sklearn.metrics.precision_recall_curve``, or None."""
    return binary_curve_metrics(scores, labels)["f1_max"]
