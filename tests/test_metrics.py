"""Metrics against scikit-learn and a brute-force AUPRO written out below."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import require_extra
from scipy import ndimage

from moeclip.metrics import (
    METRIC_KEYS,
    ClassAccumulator,
    aupro,
    aupro_from_sorted,
    auroc,
    average_precision,
    average_results,
    binary_curve_metrics,
    evaluate_class,
    f1_max,
    metrics_from_sorted,
    official_round,
    sorted_pixel_split,
    split_by_label,
)


# ---------------------------------------------------------------- references
def sklearn_metrics():
    """scikit-learn (the dev extra) for the tests compared with it: only those skip when it is absent."""
    return require_extra("sklearn.metrics")


def sk_f1_max(labels, scores):
    precision, recall, _ = sklearn_metrics().precision_recall_curve(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))


def sk_metrics(labels, scores):
    return {
        "auroc": sklearn_metrics().roc_auc_score(labels, scores),
        "ap": sklearn_metrics().average_precision_score(labels, scores),
        "f1_max": sk_f1_max(labels, scores),
    }


def reference_aupro(scores, masks, limit=0.3):
    """MVTec AD AUPRO, brute force: one (FPR, PRO) point per distinct threshold."""
    regions = []
    for i, m in enumerate(masks):
        lab, k = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, k + 1)]
    normal = scores[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(scores)[::-1]:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(scores[i][reg] >= t) for i, reg in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_lim) / 2
            break
    return area / limit


def blob_masks(rng, n, h, w, p_anomalous=0.6):
    """Masks with a few random discs (several 8-connected regions) on some images."""
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if rng.random() < p_anomalous:
            for _ in range(rng.integers(1, 4)):
                cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.uniform(1, h / 5)
                masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return masks


# ---------------------------------------------------------------- ranking
@pytest.mark.parametrize(
    "n, pos_frac, dtype, decimals",
    [
        (2, 0.5, np.float64, None),
        (7, 0.3, np.float64, None),
        (1000, 0.1, np.float32, None),
        (1000, 0.5, np.float64, 1),
        (5000, 0.05, np.float32, 2),
        (20000, 0.3, np.float32, 2),
        (100_000, 0.02, np.float32, None),
        (100_000, 0.5, np.float32, 3),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_binary_metrics_match_sklearn(n, pos_frac, dtype, decimals, seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < pos_frac
    labels[0], labels[-1] = True, False  # both classes present
    scores = rng.normal(size=n) + 0.8 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)  # heavy ties, across classes too
    scores = scores.astype(dtype)
    ours = binary_curve_metrics(scores, labels)
    ref = sk_metrics(labels, scores)
    for key in ("auroc", "ap", "f1_max"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    assert auroc(scores, labels) == ours["auroc"]
    assert average_precision(scores, labels) == ours["ap"]
    assert f1_max(scores, labels) == ours["f1_max"]


def test_integer_scores_and_label_encodings():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=500)  # 5 distinct values only
    y = rng.random(500) < 0.4
    ref = sk_metrics(y, scores)
    for labels in (y, y.astype(np.int64), y.astype(np.float32), y.astype(np.uint8) * 255):
        ours = binary_curve_metrics(scores, labels)
        for key in ref:
            assert ours[key] == pytest.approx(ref[key], abs=1e-12)


def test_constant_scores_and_2d_input():
    labels = np.array([[True, False], [False, True]])
    scores = np.full((2, 2), 0.7, dtype=np.float32)
    ours = binary_curve_metrics(scores, labels)
    assert ours["auroc"] == pytest.approx(0.5)
    assert ours["ap"] == pytest.approx(sklearn_metrics().average_precision_score(labels.ravel(), scores.ravel()))
    assert ours["f1_max"] == pytest.approx(sk_f1_max(labels.ravel(), scores.ravel()))


@pytest.mark.parametrize("labels", [np.ones(10, bool), np.zeros(10, bool), np.zeros(0, bool)])
def test_one_class_is_none(labels):
    scores = np.linspace(0, 1, labels.size, dtype=np.float32)
    assert binary_curve_metrics(scores, labels) == {"auroc": None, "ap": None, "f1_max": None}
    assert auroc(scores, labels) is None


def test_nan_and_shape_errors():
    with pytest.raises(ValueError, match="NaN"):
        binary_curve_metrics(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="size"):
        binary_curve_metrics(np.zeros(3), np.zeros(4))


def test_block_sizes_do_not_change_results():
    rng = np.random.default_rng(7)
    masks = blob_masks(rng, 4, 16, 16)
    masks[1, :3, :3] = True
    scores = np.round(rng.normal(size=masks.shape) + masks, 1).astype(np.float32)
    pos, weights, neg = sorted_pixel_split(scores, masks)
    whole = metrics_from_sorted(pos, neg, block=10**9)
    assert metrics_from_sorted(pos, neg, block=7) == pytest.approx(whole, abs=1e-12)
    assert aupro_from_sorted(pos, weights, neg, block=5) == pytest.approx(
        aupro_from_sorted(pos, weights, neg, block=10**9), abs=1e-12
    )


def test_split_keeps_float32_and_order():
    scores = np.arange(10, dtype=np.float32)
    labels = np.arange(10) % 3 == 0
    pos, neg = split_by_label(scores, labels, chunk=4)
    assert pos.dtype == neg.dtype == np.float32
    np.testing.assert_array_equal(pos, scores[labels])
    np.testing.assert_array_equal(neg, scores[~labels])


# ---------------------------------------------------------------- AUPRO
@pytest.mark.parametrize("decimals", [None, 2, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_reference(decimals, seed):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 5, 24, 24)
    masks[0] = False  # a normal image
    masks[1, 2:6, 2:6] = True  # at least one region
    scores = rng.normal(size=masks.shape) + 1.0 * masks
    if decimals is not None:
        scores = np.round(scores, decimals)
    scores = scores.astype(np.float32)
    assert aupro(scores, masks) == pytest.approx(reference_aupro(scores, masks), abs=1e-9)
    for limit in (0.05, 1.0):
        assert aupro(scores, masks, fpr_limit=limit) == pytest.approx(
            reference_aupro(scores, masks, limit), abs=1e-9
        )


def test_aupro_regions_weigh_equally_and_edge_cases():
    masks = np.zeros((1, 10, 10), bool)
    masks[0, 0:2, 0:2] = True  # small region, detected
    masks[0, 5:10, 5:10] = True  # big region, missed
    scores = np.zeros((1, 10, 10), np.float32)
    scores[0, 0:2, 0:2] = 1.0
    scores[0, 5:10, 5:10] = -1.0
    # PRO is 0.5 from FPR 0 until every normal pixel is in (FPR 1): area 0.5.
    assert aupro(scores, masks) == pytest.approx(0.5)
    assert aupro(scores, masks) == pytest.approx(reference_aupro(scores, masks))
    diag = np.zeros((1, 4, 4), bool)
    diag[0, [0, 1, 2], [0, 1, 2]] = True  # one region under 8-connectivity
    assert aupro(np.where(diag, 1.0, 0.0), diag) == pytest.approx(1.0)
    assert aupro(scores, np.zeros_like(masks)) is None
    assert aupro(scores, np.ones_like(masks)) is None
    with pytest.raises(ValueError):
        aupro(scores, masks, fpr_limit=0.0)


# ---------------------------------------------------------------- official rule
def official_reference(maps, masks, img, labels, medical):
    """The rule as METHOD.md states it, on copies, with scikit-learn."""
    maps = maps.copy()
    img = img.copy()
    if maps.max() > 1 or maps.min() < 0:
        maps = (maps - maps.min()) / (maps.max() - maps.min())
    if img.max() > 1 or img.min() < 0:
        img = (img - img.min()) / (img.max() - img.min())
    pmax = maps.max(axis=(1, 2))
    final = pmax if medical else pmax * 0.5 + img * 0.5
    pix = sk_metrics(masks.ravel(), maps.ravel())
    im = sk_metrics(labels, final)
    return {
        "pixel_auroc": pix["auroc"],
        "pixel_ap": pix["ap"],
        "pixel_aupro": reference_aupro(maps, masks),
        "pixel_f1_max": pix["f1_max"],
        "image_auroc": im["auroc"],
        "image_ap": im["ap"],
        "image_f1_max": im["f1_max"],
    }


def make_class(seed, n=6, size=20, scale=3.0, offset=-0.5):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, n, size, size)
    masks[0] = False
    masks[1, 3:7, 3:7] = True
    labels = masks.any(axis=(1, 2)).astype(np.int64)
    maps = (rng.random(masks.shape) * scale + offset + 0.7 * masks).astype(np.float32)
    img = (rng.random(n) * 1.4 - 0.2 + 0.2 * labels).astype(np.float32)
    return maps, masks, img, labels


@pytest.mark.parametrize("domain", ["industrial", "Medical", "INDUSTRIAL"])
@pytest.mark.parametrize("scale, offset", [(3.0, -0.5), (0.2, 0.05)])  # leaves / stays in [0, 1]
def test_evaluate_class_follows_official_rule(domain, scale, offset):
    maps, masks, img, labels = make_class(4, scale=scale, offset=offset)
    assert (maps.max() > 1) == (scale > 1)
    before = (maps.copy(), masks.copy(), img.copy())
    ours = evaluate_class(maps, masks, img, labels, domain)
    ref = official_reference(maps, masks, img, labels, domain.lower() == "medical")
    assert set(ours) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key
    for a, b in zip(before, (maps, masks, img)):  # inputs untouched
        np.testing.assert_array_equal(a, b)


def test_evaluate_class_undefined_parts_and_errors():
    maps, masks, img, labels = make_class(5)
    no_gt = evaluate_class(maps, None, img, labels, "industrial")
    assert all(no_gt[k] is None for k in METRIC_KEYS if k.startswith("pixel"))
    assert no_gt["image_auroc"] is not None
    assert evaluate_class(maps, masks, img, labels, "medical", has_pixel_gt=False)["pixel_ap"] is None
    one_label = evaluate_class(maps, masks, img, np.ones_like(labels), "industrial")
    assert all(one_label[k] is None for k in METRIC_KEYS if k.startswith("image"))
    assert one_label["pixel_auroc"] is not None
    with pytest.raises(ValueError, match="domain"):
        evaluate_class(maps, masks, img, labels, "satellite")
    with pytest.raises(ValueError):
        evaluate_class(maps, masks, img[:-1], labels, "industrial")


def test_accumulator_matches_evaluate_class():
    maps, masks, img, labels = make_class(6, n=7)
    want = evaluate_class(maps, masks, img, labels, "industrial")
    for kwargs in ({"num_images": 7, "image_shape": (20, 20)}, {"num_images": 2}, {}):
        acc = ClassAccumulator("Industrial", **kwargs)
        for s in (slice(0, 3), slice(3, 4), slice(4, 7)):
            acc.add(torch.from_numpy(maps[s]), masks[s, None].astype(np.uint8), img[s], labels[s])
        assert len(acc) == 7
        assert acc.compute() == want
    acc = ClassAccumulator("medical", has_pixel_gt=False)
    acc.add(maps, None, img, labels)
    assert acc.compute()["pixel_auroc"] is None
    with pytest.raises(ValueError):
        ClassAccumulator("medical").compute()


def test_official_round_and_average():
    # the official report rounds the fraction to 4 decimals first, then scales by 100 in float arithmetic:
    # the expected values are the hand-rounded fractions times 100 (0.628714 -> 0.6287, not 62.8714 -> 62.87)
    assert official_round(0.628714) == 0.6287 * 100
    assert official_round(0.12346) == 0.1235 * 100 and official_round(0.99996) == 100.0
    assert official_round(0.00004) == 0.0
    assert official_round(None) is None
    avg = average_results(
        [
            {"class name": "a", "pixel_auroc": 0.5, "image_auroc": None},
            {"class name": "b", "pixel_auroc": 1.0, "image_auroc": None},
            {"pixel_auroc": None, "image_auroc": None, "image_ap": 0.25},
        ]
    )
    assert avg == {"pixel_auroc": 0.75, "image_auroc": None, "image_ap": 0.25}
