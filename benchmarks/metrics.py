"""Pixel-metric speed and memory: moeclip.metrics vs scikit-learn on one synthetic class.

    python benchmarks/metrics.py [--images 167 --size 518 --anomaly-ratio 0.05 --json OUT.json]

Builds random float32 maps (N, S, S) with disc-shaped masks on half of the
images, then times on the same arrays:
  ours     binary_curve_metrics (pixel AUROC + AP + F1-max, one sort)
  ours     aupro (FPR <= 0.3), separately
  ours     evaluate_class (all pixel + image metrics incl. AUPRO, official rule)
  sklearn  roc_auc_score + average_precision_score + precision_recall_curve
checks that the values agree (1e-6), and reports the peak extra memory of ours
(tracemalloc, which sees NumPy's buffers) in a separate, untimed run.
"""
from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np


def make_class(images: int, size: int, ratio: float, seed: int = 0):
    """Random maps; about ``ratio`` of all pixels anomalous, as 1-3 discs per anomalous image."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((images, size, size), dtype=bool)
    yy, xx = np.ogrid[:size, :size]
    anomalous = rng.random(images) < 0.5
    anomalous[0], anomalous[-1] = True, False
    area = ratio * size * size * images / anomalous.sum()  # pixels per anomalous image
    for i in np.flatnonzero(anomalous):
        k = int(rng.integers(1, 4))
        for _ in range(k):
            r = np.sqrt(area / k / np.pi)
            cy, cx = rng.integers(int(r), size - int(r), size=2)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    maps = rng.standard_normal(masks.shape, dtype=np.float32)
    maps += masks * np.float32(1.5)
    image_scores = (rng.random(images) * 0.5 + 0.3 * anomalous).astype(np.float32)
    return maps, masks, image_scores, anomalous.astype(np.int64)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def peak_extra_bytes(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - base


def sklearn_metrics(maps, masks):
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    y, s = masks.reshape(-1), maps.reshape(-1)
    out = {"auroc": roc_auc_score(y, s), "ap": average_precision_score(y, s)}
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * p * r / (p + r)
    out["f1_max"] = float(np.max(f1[np.isfinite(f1)]))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=167)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--anomaly-ratio", type=float, default=0.05)
    ap.add_argument("--skip-sklearn", action="store_true", help="only time ours")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    from moeclip.metrics import aupro, binary_curve_metrics, evaluate_class

    maps, masks, image_scores, labels = make_class(args.images, args.size, args.anomaly_ratio)
    n = maps.size
    print(f"{args.images} images of {args.size}x{args.size}: {n:,} pixels, "
          f"{masks.mean():.2%} anomalous; inputs {(maps.nbytes + masks.nbytes) / 2**20:.0f} MiB")

    ours, t_ours = timed(lambda: binary_curve_metrics(maps, masks))
    pro, t_pro = timed(lambda: aupro(maps, masks))
    full, t_full = timed(lambda: evaluate_class(maps, masks, image_scores, labels, "industrial"))
    mem_ours = peak_extra_bytes(lambda: binary_curve_metrics(maps, masks))
    mem_full = peak_extra_bytes(lambda: evaluate_class(maps, masks, image_scores, labels, "industrial"))

    result = {
        "images": args.images, "size": args.size, "pixels": n,
        "anomalous_fraction": float(masks.mean()),
        "ours": {**ours, "seconds": t_ours, "peak_extra_bytes": mem_ours},
        "ours_aupro": {"aupro": pro, "seconds": t_pro},
        "ours_evaluate_class": {"seconds": t_full, "peak_extra_bytes": mem_full,
                                "pixel_aupro": full["pixel_aupro"]},
    }
    if not args.skip_sklearn:
        ref, t_ref = timed(lambda: sklearn_metrics(maps, masks))
        diffs = {k: abs(ours[k] - ref[k]) for k in ref}
        result["sklearn"] = {**ref, "seconds": t_ref}
        result["max_abs_diff"] = max(diffs.values())
        result["agree_1e-6"] = result["max_abs_diff"] <= 1e-6
        result["speedup"] = t_ref / t_ours

    mib = 2**20
    rows = [("ours: AUROC+AP+F1-max", t_ours, f"{mem_ours / mib:.0f} MiB ({mem_ours / n:.2f} B/px)"),
            ("ours: AUPRO (FPR<=0.3)", t_pro, ""),
            ("ours: evaluate_class (all 7)", t_full, f"{mem_full / mib:.0f} MiB ({mem_full / n:.2f} B/px)")]
    if "sklearn" in result:
        rows.append(("sklearn: roc_auc+AP+PR curve", result["sklearn"]["seconds"], ""))
    print(f"{'what':32s} {'seconds':>8s}  peak extra memory")
    for name, t, m in rows:
        print(f"{name:32s} {t:8.2f}  {m}")
    print(f"ours: AUROC {ours['auroc']:.6f}  AP {ours['ap']:.6f}  F1-max {ours['f1_max']:.6f}  AUPRO {pro:.6f}")
    if "sklearn" in result:
        r = result["sklearn"]
        print(f"sklearn: AUROC {r['auroc']:.6f}  AP {r['ap']:.6f}  F1-max {r['f1_max']:.6f}")
        print(f"speed-up {result['speedup']:.1f}x; max |diff| {result['max_abs_diff']:.2e} "
              f"({'agree' if result['agree_1e-6'] else 'DISAGREE'} at 1e-6)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
