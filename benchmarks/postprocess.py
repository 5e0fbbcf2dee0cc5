"""Post-processing cost per image: the numpy path every runtime now shares vs torch's upsampling.

Since the single inference pipeline, the PyTorch Detector resizes maps to the image's size with
``moeclip.inference.postprocess.resize_map`` (numpy, so the ONNX path stays torch-free) instead of
``F.interpolate``. This times both on a model-resolution map (518 px) up to typical photo sizes,
interleaved, one thread, and the rest of :class:`PostProcessor` (score, decision, fixed-scale unit
map, mask) on the same map.

    python benchmarks/postprocess.py --repeats 5 --json OUT
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np
import torch
import torch.nn.functional as F

from moeclip.inference.postprocess import PostProcessor, resize_map

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SIZES = [(1024, 1024), (2448, 3264), (3000, 4000)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--map-size", type=int, default=518)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    amap = np.random.default_rng(0).normal(8, 4, (args.map_size, args.map_size)).astype(np.float32)
    tmap = torch.from_numpy(amap)[None, None]
    post = PostProcessor(12, "industrial", None, threshold=0.5, pixel_threshold=9.0)
    rows, doc = [], {"config": vars(args), "machine": common.machine_info(cpu), "results": {}}
    for size in SIZES:
        fns = {
            "numpy resize_map": lambda: resize_map(amap, size),
            "torch F.interpolate": lambda: F.interpolate(tmap, size=size, mode="bilinear", align_corners=True),
            "PostProcessor (all)": lambda: (lambda s: (post.unit_map(s.anomaly_map), post.mask(s.anomaly_map)))(
                post(amap, 0.5, size)),
        }
        times = common.bench(fns, cpu, args.warmup, args.repeats, log=False)
        med = {k: statistics.median(v) for k, v in times.items()}
        ref = F.interpolate(tmap, size=size, mode="bilinear", align_corners=True)[0, 0].numpy()
        diff = float(np.abs(resize_map(amap, size) - ref).max())
        ratio = med["torch F.interpolate"] / med["numpy resize_map"]
        rows.append([f"{size[0]}x{size[1]}", med["numpy resize_map"], med["torch F.interpolate"], ratio,
                     med["PostProcessor (all)"], diff])
        doc["results"][f"{size[0]}x{size[1]}"] = {k: common.summary(v) for k, v in times.items()} | {
            "torch_over_numpy": ratio, "max_abs_diff": diff}
    print(f"map {args.map_size}x{args.map_size} -> image size, median of {args.repeats}, 1 thread (seconds)")
    common.print_table(rows, ["image", "numpy resize", "torch resize", "torch/numpy", "PostProcessor all",
                              "max |diff|"])
    common.finish(doc, args.json)


if __name__ == "__main__":
    main()
