"""Evaluation: exact, memory-light AUROC / AP / F1-max / AUPRO and the official per-class rule."""
from .aupro import aupro, aupro_from_sorted, region_weights, sorted_pixel_split
from .protocol import (
    METRIC_KEYS,
    OFFICIAL_NAMES,
    ClassAccumulator,
    average_results,
    evaluate_class,
    official_round,
    to_official,
)
from .ranking import (
    auroc,
    average_precision,
    binary_curve_metrics,
    f1_max,
    metrics_from_sorted,
    split_by_label,
)

__all__ = [
    "METRIC_KEYS",
    "OFFICIAL_NAMES",
    "ClassAccumulator",
    "aupro",
    "aupro_from_sorted",
    "auroc",
    "average_precision",
    "average_results",
    "binary_curve_metrics",
    "evaluate_class",
    "f1_max",
    "metrics_from_sorted",
    "official_round",
    "region_weights",
    "sorted_pixel_split",
    "split_by_label",
    "to_official",
]
