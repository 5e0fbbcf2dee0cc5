"""The official per-class evaluation rule of MoECLIP, memory-light.

Rule (official ``metrics_eval``): if the class's anomaly maps leave [0, 1], min-max
normalise them all together (likewise the image scores); the final image score is
``0.5 * max(map) + 0.5 * image score`` for industrial data and ``max(map)`` alone
for medical data; then AUROC and AP over all pixels and over images. Reported
numbers are ``round(fraction, 4) * 100`` (:func:`official_round`).

Memory: min-max normalisation is monotone, also in float32 rounding, so it
commutes with sorting. The maps are therefore never modified or copied for it:
the sorted copies that the metrics need anyway are normalised in place, with the
same float32 operations as the official code, so ties merge exactly as there. The
per-image maximum of the normalised maps is the normalised per-image maximum.

Beyond the official four numbers this also reports pixel AUPRO (FPR <= 0.3) and
pixel / image F1-max. Undefined metrics are ``None``, where the official code
reports 0 for a class with one image label only.
"""
from __future__ import annotations

import statistics
from typing import Any, Iterable, Optional, Sequence, Tuple

import numpy as np

from ..model.domain import Domain
from .aupro import as_map_stack, aupro_from_sorted, sorted_pixel_split
from .ranking import binarize, binary_curve_metrics, metrics_from_sorted

__all__ = [
    "METRIC_KEYS",
    "OFFICIAL_NAMES",
    "ClassAccumulator",
    "average_results",
    "evaluate_class",
    "final_image_scores_",
    "minmax_scale",
    "apply_minmax_",
    "official_round",
    "to_official",
]

METRIC_KEYS = (
    "pixel_auroc",
    "pixel_ap",
    "pixel_aupro",
    "pixel_f1_max",
    "image_auroc",
    "image_ap",
    "image_f1_max",
)

#: Our keys -> the names the official code prints (it reports only these four).
OFFICIAL_NAMES = {
    "pixel_auroc": "pixel AUC",
    "pixel_ap": "pixel AP",
    "image_auroc": "image AUC",
    "image_ap": "image AP",
}


def _to_numpy(x: Any) -> np.ndarray:
    """NumPy view of an array or a (possibly CUDA) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def minmax_scale(a: np.ndarray, lo: Any = None, hi: Any = None) -> tuple[Any, Any] | None:
    """The official rule's min-max: (min, max - min) if the range leaves [0, 1], else None.

    ``lo``/``hi`` default to the array's own range, in its dtype (a class's stored maps);
    give them when only part of the class is at hand (e.g. per-image maxima in a report).
    """
    lo = a.min() if lo is None else lo
    hi = a.max() if hi is None else hi
    if hi > 1 or lo < 0:
        return lo, hi - lo
    return None


def apply_minmax_(a: np.ndarray, scale: tuple[Any, Any]) -> np.ndarray:
    """In place ``(a - lo) / span`` as the official code computes it; constant -> 0."""
    lo, span = scale
    if span == 0:
        a[...] = 0
    else:
        np.subtract(a, lo, out=a)
        np.divide(a, span, out=a)
    return a


def final_image_scores_(image_scores: np.ndarray, map_max: np.ndarray, domain: "Domain | str",
                       map_scale: tuple[Any, Any] | None) -> np.ndarray:
    """The per-image score the image metrics rank, modifying both inputs in place.

    ``map_max``: each image's raw map maximum, normalised with the class's pixel ``map_scale``
    (:func:`minmax_scale` of all its maps, None inside [0, 1]); the raw image scores are min-max
    normalised when they leave [0, 1]; then the domain's rule (:meth:`Domain.combine`).
    """
    if map_scale is not None:
        apply_minmax_(map_max, map_scale)
    image_scale = minmax_scale(image_scores)
    if image_scale is not None:
        apply_minmax_(image_scores, image_scale)
    return Domain.parse(domain).combine(map_max, image_scores)


def official_round(x: float | None) -> float | None:
    """The official reporting: round the fraction to 4 decimals, then times 100."""
    return None if x is None else round(float(x), 4) * 100


def to_official(result: dict) -> dict:
    """The official four numbers under the official names, officially rounded."""
    return {name: official_round(result.get(key)) for key, name in OFFICIAL_NAMES.items()}


def evaluate_class(
    pixel_scores: np.ndarray,
    masks: np.ndarray | None,
    image_scores: np.ndarray,
    labels: np.ndarray,
    domain: str,
    has_pixel_gt: bool = True,
    fpr_limit: float = 0.3,
) -> dict:
    """Metrics of one class under the official rule, as fractions in [0, 1] or None.

    ``pixel_scores``: raw anomaly maps (N, H, W), float32 preferred; left unchanged.
    ``masks``: (N, H, W) bool (or 0/1) ground truth, or None. ``image_scores``:
    raw image scores (N,), ``(c_abnormal + 1) / 2``. ``labels``: (N,) 0/1.
    Pixel metrics are None without pixel ground truth; image metrics are None
    when all images share one label.
    """
    rule = Domain.parse(domain)
    maps = as_map_stack(_to_numpy(pixel_scores))
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    img = _to_numpy(image_scores).reshape(-1)
    img = img.astype(img.dtype if np.issubdtype(img.dtype, np.floating) else np.float64)  # copy
    y = binarize(_to_numpy(labels).reshape(-1))
    n = maps.shape[0]
    if img.size != n or y.size != n:
        raise ValueError(f"{n} maps but {img.size} image scores and {y.size} labels")
    if n == 0:
        raise ValueError("no images to evaluate")

    pixel_scale = minmax_scale(maps)
    final = final_image_scores_(img, maps.max(axis=(1, 2)), rule, pixel_scale)
    image = binary_curve_metrics(final, y)

    pixel = {"auroc": None, "ap": None, "f1_max": None}
    pixel_aupro = None
    if has_pixel_gt and masks is not None:
        gt = as_map_stack(_to_numpy(masks))
        if gt.shape != maps.shape:
            raise ValueError(f"masks {gt.shape} and maps {maps.shape} differ in shape")
        pos, weights, neg = sorted_pixel_split(maps, gt)
        if pixel_scale is not None:
            apply_minmax_(pos, pixel_scale)
            apply_minmax_(neg, pixel_scale)
        pixel = metrics_from_sorted(pos, neg)
        pixel_aupro = aupro_from_sorted(pos, weights, neg, fpr_limit)
        del pos, weights, neg

    return {
        "pixel_auroc": pixel["auroc"],
        "pixel_ap": pixel["ap"],
        "pixel_aupro": pixel_aupro,
        "pixel_f1_max": pixel["f1_max"],
        "image_auroc": image["auroc"],
        "image_ap": image["ap"],
        "image_f1_max": image["f1_max"],
    }


def average_results(results: Iterable[dict]) -> dict:
    """Mean of each key over the classes where it is not None (None if it never is).

    Non-numeric entries (e.g. a class name) are left out of the average.
    """
    results = list(results)
    keys: list[str] = []
    for r in results:
        keys.extend(k for k in r if k not in keys)
    out: dict = {}
    for k in keys:
        values = [r.get(k) for r in results]
        if any(isinstance(v, (str, bytes)) for v in values):
            continue
        numbers_ = [float(v) for v in values if v is not None]
        out[k] = sum(numbers_) / len(numbers_) if numbers_ else None
    return out


class ClassAccumulator:
    """Collects one class's test outputs batch by batch, then evaluates them.

    Storage is preallocated (float32 maps, bool masks, float32 image scores) when
    ``num_images`` is given, so the evaluator never holds a Python list of
    per-batch arrays nor a concatenated second copy; without it the arrays grow by
    doubling. ``image_shape`` (H, W) is taken from the first batch if not given.
    """

    def __init__(
        self,
        domain: str,
        num_images: int | None = None,
        image_shape: tuple[int, int] | None = None,
        has_pixel_gt: bool = True,
        fpr_limit: float = 0.3,
    ) -> None:
        Domain.parse(domain)
        self.domain = domain
        self.has_pixel_gt = has_pixel_gt
        self.fpr_limit = fpr_limit
        self._expected = num_images
        self._n = 0
        self._maps: np.ndarray | None = None
        self._masks: np.ndarray | None = None
        self._image = np.empty(0, dtype=np.float32)
        self._labels = np.empty(0, dtype=bool)
        if image_shape is not None:
            self._allocate(num_images or 0, tuple(image_shape))

    def __len__(self) -> int:
        return self._n

    def _allocate(self, capacity: int, shape: tuple[int, int]) -> None:
        """(Re)allocate storage for ``capacity`` images, keeping what is stored."""
        def grow(old: np.ndarray | None, new_shape: tuple, dtype) -> np.ndarray:
            new = np.empty(new_shape, dtype=dtype)
            if old is not None and self._n:
                new[: self._n] = old[: self._n]
            return new

        self._maps = grow(self._maps, (capacity, *shape), np.float32)
        if self.has_pixel_gt:
            self._masks = grow(self._masks, (capacity, *shape), bool)
        self._image = grow(self._image, (capacity,), np.float32)
        self._labels = grow(self._labels, (capacity,), bool)

    def add(self, pixel_scores: Any, masks: Any, image_scores: Any, labels: Any) -> None:
        """Append a batch: maps (B, H, W), masks (B, H, W) or None, scores (B,), labels (B,)."""
        maps = as_map_stack(_to_numpy(pixel_scores))
        b, shape = maps.shape[0], tuple(maps.shape[1:])
        img = _to_numpy(image_scores).reshape(-1)
        lab = _to_numpy(labels).reshape(-1)
        if img.size != b or lab.size != b:
            raise ValueError(f"{b} maps but {img.size} image scores and {lab.size} labels")
        if self.has_pixel_gt:
            if masks is None:
                raise ValueError("masks are required when has_pixel_gt=True")
            gt = as_map_stack(_to_numpy(masks))
            if gt.shape != maps.shape:
                raise ValueError(f"masks {gt.shape} and maps {maps.shape} differ in shape")
        if self._maps is None:
            self._allocate(max(self._expected or 0, b), shape)
        elif shape != self._maps.shape[1:]:
            raise ValueError(f"map size {shape} differs from earlier batches {self._maps.shape[1:]}")
        need = self._n + b
        if need > self._maps.shape[0]:
            self._allocate(max(need, 2 * self._maps.shape[0]), shape)
        sl = slice(self._n, need)
        self._maps[sl] = maps
        if self.has_pixel_gt:
            self._masks[sl] = binarize(gt)
        self._image[sl] = img
        self._labels[sl] = binarize(lab)
        self._n = need

    def compute(self) -> dict:
        """:func:`evaluate_class` on everything added so far (storage is not modified)."""
        if self._n == 0 or self._maps is None:
            raise ValueError("no images were added")
        n = self._n
        return evaluate_class(
            self._maps[:n],
            self._masks[:n] if self.has_pixel_gt else None,
            self._image[:n],
            self._labels[:n],
            self.domain,
            has_pixel_gt=self.has_pixel_gt,
            fpr_limit=self.fpr_limit,
        )


def mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float], int]:
    """(mean, sample std with ddof=1 or None for fewer than two, n): the one spread over seeds the
    package reports (``test --shots``, ``reproduce``)."""
    values = [float(v) for v in values]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)
