"""Fusion quality (issue 21): every signal alone and every fusion, on a demo's held-out classes.

Adapted from the issue's probe (``spec/probes/fusion_probe.py``). For each held-out class of a
``moeclip demo --out`` folder and each seed of the reference draw (K normals from the class's
``train/good``), the test images are scored by:

* ``zero-shot``: the raw zero-shot map ``Z``; image score the zero-shot rule (``combine(sigmoid(2
  max Z / n - 1), s)``), as ``moeclip predict`` without a deployment file;
* ``few-shot``: the few-shot map ``F`` of the product's memory bank; image score ``max F``;
* ``mutual``: a MuSc-like mutual map ``U`` over the class's test images (each patch's nearest
  distance to every other test image on the 12 seg features, mean of the smallest 30 %; the
  probe's, not the product's ``musc`` mode); image score ``max U``;
* ``shipped``: the fusion moeclip shipped before issue 21, ``0.5 sigmoid(2 Z / n - 1) + 0.5 F``
  (image score ``0.5 max + 0.25 s + 0.25 max F``);
* ``fused``: the product's rule (``moeclip.model.fusion.fused_raw``, the bank's leave-one-out
  statistics, ``--reference-weight 0.5``); image score the zero-shot rule on the fused map;
* ``fused, batch median/MAD``: the same rule standardising by the test batch's median/MAD instead
  of the references (what the rule does with a single reference);
* ``fused, LOO mean/std``: the probe's variant, mean/std of the leave-one-out evidence;
* ``fused, LOO q99 - median``: the scale taken from the upper tail of the same evidence;
* ``fused (product), w = 0.25 / 0.75``: other ``--reference-weight`` values (not the default);
* ``zero-shot + mutual``, ``zero-shot + few-shot + mutual``: ``fusion.fuse`` with equal
  weights, the mutual map standardised by the batch (it has no reference evidence).

Pixel and image AUROC per class, averaged over the classes, per seed and over the seeds.

    PYTHONPATH=src python benchmarks/fusion.py /work/demo_out --seeds 0-7 --shots 4 [--json out.json]
"""
from __future__ import annotations

import argparse
import glob
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import rankdata


def auroc(y, s) -> float:
    y = np.asarray(y).astype(bool).ravel()
    s = np.asarray(s, dtype=np.float64).ravel()
    if y.all() or (~y).all():
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum()))


def parse_seeds(text: str):
    if "-" in text and "," not in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def checkpoint_dir(demo: Path) -> Path:
    for c in (demo / "checkpoint", demo / "run" / "checkpoint"):
        if (c / "config.json").is_file():
            return c
    raise SystemExit(f"{demo}: no checkpoint/ (run moeclip demo --out {demo})")


def main() -> None:
    from moeclip.data.transforms import preprocess_image
    from moeclip.inference.detector import Detector
    from moeclip.inference.postprocess import image_score as zs_image_score
    from moeclip.model.domain import Domain
    from moeclip.model.fewshot import build_bank, extract_features, nearest_distance
    from moeclip.model.fusion import SignalStats, fuse, fused_raw, robust_stats, to_scale
    from moeclip.model.scoring import anomaly_map, image_score, smooth_patch_map

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", type=Path)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--seeds", default="0-7", help="seeds of the reference draw: 0-7 or 0,1,2")
    ap.add_argument("--weight", type=float, default=0.5, help="--reference-weight of the fused rules")
    ap.add_argument("--object", default="object",
                    help="object description (the demo prompts every category as 'object')")
    ap.add_argument("--keep", type=float, default=0.3, help="mutual: fraction of the smallest distances averaged")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    seeds = parse_seeds(a.seeds)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    det = Detector.from_checkpoint(checkpoint_dir(a.demo), device="cpu")
    model = det.model.eval()
    size = int(model.config.backbone.image_size)
    n = det.num_maps
    dom = Domain.parse("industrial")
    w = a.weight

    def load(paths):
        return torch.stack([preprocess_image(Image.open(p).convert("RGB"), size) for p in paths])

    def prob(x):
        return 1 / (1 + np.exp(-(2 * np.asarray(x, dtype=np.float64) / n - 1)))

    def zs_score(map_max, s):
        return np.array([zs_image_score(float(m), float(r), dom, None, n) for m, r in zip(map_max, s)])

    rows = {}  # rule -> seed -> list of (pixel, image) per class
    heldout = a.demo / "data" / "heldout"
    for cls in sorted(p.name for p in heldout.iterdir() if p.is_dir()):
        root = heldout / cls
        tests = sorted(glob.glob(str(root / "test" / "*" / "*.png")))
        labels = np.array([0 if "/good/" in t else 1 for t in tests])
        masks = []
        for t, lab in zip(tests, labels):
            if lab:
                d, f = Path(t).parent.name, Path(t).stem
                m = Image.open(root / "ground_truth" / d / f"{f}_mask.png").convert("L").resize((size, size),
                                                                                              Image.NEAREST)
                masks.append(np.array(m) > 127)
            else:
                masks.append(np.zeros((size, size), bool))
        masks = np.stack(masks)
        normals = sorted(glob.glob(str(root / "train" / "good" / "*.png")))
        text = det.text_features(a.object)
        with torch.inference_mode():
            out = model.encode_image(load(tests), compute_losses=False)
            feats = [f.float() for f in out.seg_features]
            Z = anomaly_map(feats, text, out.grid, (size, size), dom).numpy()
            S = image_score(out.det_feature.float(), text).numpy()
            B, grid = len(tests), tuple(out.grid)
            mutual = np.zeros((B, grid[0] * grid[1]))
            for i in range(B):
                per = np.stack([(sum(nearest_distance(f[i], f[j]) for f in feats) / len(feats)).numpy()
                                for j in range(B) if j != i])
                k = max(1, int(a.keep * (B - 1)))
                mutual[i] = np.sort(per, axis=0)[:k].mean(0)
            U = smooth_patch_map(torch.as_tensor(mutual, dtype=torch.float32), grid, (size, size), dom).numpy()
        ref_images = load(normals)
        for seed in seeds:
            pick = sorted(np.random.default_rng(seed).choice(len(normals), a.shots, replace=False).tolist())
            bank = build_bank(model, ref_images[pick], a.object, text=text, domain=dom)
            with torch.inference_mode():
                F = bank.anomaly_map(feats, grid, (size, size), dom).numpy()
            st = bank.stats
            fmax = F.reshape(B, -1).max(1)
            # the probe's mean/std variant of the same leave-one-out evidence
            L = grid[0] * grid[1]
            rf, _, K = extract_features(model, ref_images[pick])
            rf = [f.reshape(K, L, -1) for f in rf]
            with torch.inference_mode():
                zr = anomaly_map(rf, text, grid, (size, size), dom).numpy()
                loo = [sum(nearest_distance(f[k], torch.cat([f[j] for j in range(K) if j != k])) for f in rf) / n
                       for k in range(K)]
                fr = smooth_patch_map(torch.stack(loo), grid, (size, size), dom).numpy()
            ms_z, ms_f = SignalStats(zr.mean(), zr.std()), SignalStats(fr.mean(), fr.std())
            tz = SignalStats(np.median(zr), np.quantile(zr, 0.99) - np.median(zr))
            tf = SignalStats(np.median(fr), np.quantile(fr, 0.99) - np.median(fr))

            fused, s_f = fused_raw(Z, F, S, st, w)
            fused_b, _ = fused_raw(Z, F, S, None, w)
            fused_ms = to_scale(fuse([(Z, ms_z, 1 - w), (F, ms_f, w)]), ms_z)
            fused_tail = to_scale(fuse([(Z, tz, 1 - w), (F, tf, w)]), tz)
            f25, f75 = fused_raw(Z, F, S, st, 0.25)[0], fused_raw(Z, F, S, st, 0.75)[0]
            shipped = (1 - w) * prob(Z) + w * F
            zu = to_scale(fuse([(Z, robust_stats(Z), 1.0), (U, None, 1.0)]), robust_stats(Z))
            zfu = to_scale(fuse([(Z, st.zero_shot, 1.0), (F, st.few_shot, 1.0), (U, None, 1.0)]), st.zero_shot)

            def mx(m):
                return np.asarray(m).reshape(B, -1).max(1)

            cands = {
                "zero-shot": (Z, zs_score(mx(Z), S)),
                "few-shot": (F, fmax),
                "mutual": (U, mx(U)),
                "shipped (before issue 21)": (shipped, 0.5 * mx(shipped) + 0.25 * S + 0.25 * fmax),
                "fused (product, LOO median/MAD)": (fused, zs_score(mx(fused), s_f)),
                "fused, batch median/MAD": (fused_b, zs_score(mx(fused_b), S)),
                "fused, LOO mean/std (probe)": (fused_ms, zs_score(mx(fused_ms), S)),
                "fused, LOO q99 - median": (fused_tail, zs_score(mx(fused_tail), S)),
                "fused (product), w = 0.25": (f25, zs_score(mx(f25), S)),
                "fused (product), w = 0.75": (f75, zs_score(mx(f75), S)),
                "zero-shot + mutual": (zu, zs_score(mx(zu), S)),
                "zero-shot + few-shot + mutual": (zfu, zs_score(mx(zfu), S)),
            }
            for name, (m, sc) in cands.items():
                rows.setdefault(name, {}).setdefault(seed, []).append((auroc(masks, m), auroc(labels, sc)))
        print(f"  {cls}: done ({time.time() - t0:.0f} s)", flush=True)

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\n{a.demo}: {a.shots} references, seeds {seeds}, --reference-weight {w}; CPU: {cpu}")
    print("pixel / image AUROC, mean over the held-out classes; columns: seeds, then the mean over seeds")
    head = f"{'rule':34s}" + "".join(f"  seed {s:<9d}" for s in seeds) + "  mean"
    print(head)
    doc = {"demo": str(a.demo), "shots": a.shots, "seeds": seeds, "weight": w, "cpu": cpu, "rules": {}}
    for name, per_seed in rows.items():
        vals = {s: np.nanmean(np.array(v), axis=0) for s, v in per_seed.items()}
        mean = np.mean(np.stack(list(vals.values())), axis=0)
        print(f"{name:34s}" + "".join(f"  {v[0]:.3f}/{v[1]:.3f}" for v in vals.values())
              + f"  {mean[0]:.3f}/{mean[1]:.3f}")
        doc["rules"][name] = {"pixel_auroc": float(mean[0]), "image_auroc": float(mean[1]),
                              "per_seed": {str(s): {"pixel_auroc": float(v[0]), "image_auroc": float(v[1])}
                                           for s, v in vals.items()}}
    print(f"({time.time() - t0:.0f} s)")
    if a.json:
        a.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
