"""Calibration: decision thresholds and score normalisation for one object (``moeclip calibrate``).

Two ways:

* normal images only (``rule="fpr"``): the image threshold is the lowest one that keeps the
  false-positive rate on them at most ``max_fpr``; the pixel threshold likewise keeps at most
  ``pixel_max_fpr`` of their pixels in the masks. ``headroom`` (1 for normals: they fill the lower
  half of [0, 1]) keeps stronger anomalies from all saturating at 1.
* labelled data (``rule="f1"``): thresholds maximise F1 (images; pixels when masks exist).
  The normalisation is the min-max of all images, as the official per-class evaluation.

Pixel statistics use the maps resized to at most 128x128 (the maps are smooth upsamplings of
the patch grid, so this changes thresholds negligibly and bounds memory). Any pipeline runtime
works (PyTorch, ONNX); scores come from :mod:`moeclip.inference.postprocess`, as at prediction.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data.imageio import load_image, load_mask
from ..errors import MoECLIPError
from .pipeline import Runtime
from .postprocess import Normalization, f1_threshold, fpr_threshold, image_score, rates, resize_map

log = logging.getLogger(__name__)

PIXEL_STATS_SIZE = 128
#: (image path, label 0/1, mask path or None)
Item = Tuple[Path, int, Optional[str]]


def labelled_items(data: str, class_name: Optional[str] = None) -> Tuple[List[Item], Optional[str], Optional[str]]:
    """(path, label, mask path) of one class of ``--data NAME=PATH``, plus its description and domain."""
    from ..data.registry import DatasetSpec, describe, parse_data_arg
    from ..data.scanners import load_data

    source, path = parse_data_arg(data)
    spec = source if isinstance(source, DatasetSpec) else source.dataset
    result = load_data((source, path))
    for problem in result.problems[:5]:
        print(f"warning: {problem}", file=sys.stderr)
    samples = result.samples
    classes = sorted({s.class_name for s in samples})
    if class_name:
        samples = [s for s in samples if s.class_name == class_name]
        if not samples:
            raise MoECLIPError(f"--class {class_name!r} not in the data (classes: {', '.join(classes)})")
    elif len(classes) > 1:
        raise MoECLIPError(f"the data holds {len(classes)} classes; choose one with --class "
                           f"({', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''})")
    if not samples:
        raise MoECLIPError(f"--data {data}: no images found")
    cls = class_name or samples[0].class_name
    items = [(Path(s.image_path), int(s.label), s.mask_path if s.has_pixel_gt else None) for s in samples]
    return items, describe(spec, cls), (spec.domain if spec else None)


@dataclass
class Stats:
    """What calibration needs of each image."""

    raw: List[float] = field(default_factory=list)       # raw image scores
    map_min: List[float] = field(default_factory=list)
    map_max: List[float] = field(default_factory=list)
    labels: List[int] = field(default_factory=list)
    small: List[np.ndarray] = field(default_factory=list)  # maps at PIXEL_STATS_SIZE
    masks: List[np.ndarray] = field(default_factory=list)
    has_mask: List[bool] = field(default_factory=list)
    skipped: int = 0

    def add(self, maps: np.ndarray, raw: np.ndarray, kept: Sequence[Item], r: int) -> None:
        for amap, score, (_, label, mask) in zip(maps, raw, kept):
            self.raw.append(float(score))
            self.map_min.append(float(amap.min()))
            self.map_max.append(float(amap.max()))
            self.small.append(resize_map(amap, (r, r)))
            self.labels.append(label)
            if label and mask:
                self.masks.append(load_mask(mask, size=(r, r)))
                self.has_mask.append(True)
            else:
                self.masks.append(np.zeros((r, r), dtype=bool))
                self.has_mask.append(not label)  # a normal image's empty mask is known


def collect(runtime: Runtime, items: Sequence[Item], obj: str, domain: str, batch_size: int = 8,
            orient: bool = False, progress: bool = True) -> Stats:
    """Run the model on every readable image; unreadable ones are skipped with a warning.

    ``orient``: user photos (``--normal``) are read as ``predict`` reads them (EXIF applied);
    dataset images keep their raw pixels, aligned with their masks.
    """
    from tqdm import tqdm

    r = min(runtime.image_size, PIXEL_STATS_SIZE)
    stats = Stats()
    bar = tqdm(total=len(items), unit="img", desc="calibrate", file=sys.stderr, dynamic_ncols=True,
               disable=not progress or not sys.stderr.isatty())
    for start in range(0, len(items), batch_size):
        images, kept = [], []
        for item in items[start:start + batch_size]:
            try:
                images.append(load_image(item[0], orient=orient))
                kept.append(item)
            except MoECLIPError as exc:
                print(f"warning: skipped {exc}", file=sys.stderr)
                stats.skipped += 1
        bar.update(len(items[start:start + batch_size]))
        if images:
            maps, raw = runtime.raw(images, obj, domain)[:2]
            stats.add(maps, raw, kept, r)
    bar.close()
    if not stats.raw:
        raise MoECLIPError("no readable calibration image")
    return stats


@dataclass
class Calibration:
    threshold: float
    pixel_threshold: float
    normalization: Normalization
    statistics: Dict[str, Any]   # what a deployment file stores under "calibration"


def calibrate(runtime: Runtime, items: Sequence[Item], obj: str, domain: str, *, rule: str = "fpr",
              max_fpr: float = 0.01, pixel_max_fpr: Optional[float] = None, headroom: float = 0.0,
              batch_size: int = 8, orient: bool = False, progress: bool = True) -> Calibration:
    """Thresholds and normalisation from ``items`` (see the module docstring)."""
    if not 0.0 <= max_fpr < 1.0:
        raise MoECLIPError(f"--max-fpr must be in [0, 1), got {max_fpr}")
    if not items:
        raise MoECLIPError("no calibration images found")
    pixel_fpr = max_fpr if pixel_max_fpr is None else pixel_max_fpr
    stats = collect(runtime, items, obj, domain, batch_size, orient, progress)
    labels = np.array(stats.labels, dtype=int)
    if rule == "f1" and labels.min() == labels.max():
        raise MoECLIPError("F1 calibration needs normal and anomalous images; use --criterion fpr "
                           "(normals only) or --normal")
    if rule == "fpr" and not (labels == 0).any():
        raise MoECLIPError("no normal image to calibrate the false-positive rate on")
    raw, mmin, mmax = np.array(stats.raw), np.array(stats.map_min), np.array(stats.map_max)
    norm = Normalization.fit(mmin.min(), mmax.max(), raw.min(), raw.max(), headroom)
    scores = np.array([image_score(m, s, domain, norm, runtime.num_maps) for m, s in zip(mmax, raw)])
    threshold = f1_threshold(scores, labels)[0] if rule == "f1" else fpr_threshold(scores[labels == 0], max_fpr)

    pixels, pixel_labels, known = np.stack(stats.small), np.stack(stats.masks), np.array(stats.has_mask)
    if rule == "f1" and bool((known & (labels == 1)).any()):
        pixel_threshold, pixel_rule = f1_threshold(pixels[known].ravel(), pixel_labels[known].ravel())[0], "f1"
    else:
        pixel_threshold, pixel_rule = fpr_threshold(pixels[labels == 0].ravel(), pixel_fpr), "fpr"
    image_rates = rates(scores, labels, threshold)
    statistics = {
        "criterion": rule, "pixel_criterion": pixel_rule, "max_fpr": max_fpr, "pixel_max_fpr": pixel_fpr,
        "headroom": headroom, "num_images": int(labels.size), "num_normal": int((labels == 0).sum()),
        "num_anomalous": int((labels == 1).sum()), "skipped": int(stats.skipped),
        "observed": {"map_min": float(mmin.min()), "map_max": float(mmax.max()),
                     "score_min": float(raw.min()), "score_max": float(raw.max())},
        "image": {k: (None if np.isnan(v) else round(float(v), 6)) for k, v in image_rates.items()},
        "pixel_stats_size": int(pixels.shape[-1]), "image_size": int(runtime.image_size),
    }
    return Calibration(float(threshold), float(pixel_threshold), norm, statistics)
