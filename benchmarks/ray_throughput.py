"""Throughput of ``moeclip predict --ray`` (1, 2, ... scoring actors) against single-process ``predict``.

Everything runs in this process's view of one machine: a local Ray cluster (``ray.init``), a checkpoint
of a random-weight CLIP (speed does not depend on the values), and synthetic images. For each
variant the whole command is timed (wall: listing, model loading on the driver and in every actor,
scoring, files; the Ray cluster's own start is not included) and the moment the first line of
results.jsonl appears (Ray hands results over in blocks, so a Ray run's lines come in bursts).
The variants run interleaved, ``--repeats`` rounds. ``--stages`` also times, per image, the CPU
work around the model (decode; map + overlay files), which bounds how many images/s one GPU can
be fed per CPU core.

    python benchmarks/ray_throughput.py --clip-model ViT-B-16 --images 32 --actors 1,2 --stages --json OUT
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_moeclip, finish, machine_info, print_table  # noqa: E402


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """Smooth random images (PNG sizes like photos', not like noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i:05d}.png")


class LineWatcher:
    """Records when each line of results.jsonl appears (polling every 20 ms)."""

    def __init__(self, path: Path):
        self.path, self.times, self._stop = path, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        seen = 0
        while not self._stop.is_set():
            try:
                n = self.path.read_bytes().count(b"\n")
            except OSError:
                n = 0
            now = time.perf_counter()
            self.times.extend([now] * max(0, n - seen))
            seen = max(seen, n)
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def run_variant(argv: List[str], out: Path, n: int) -> Dict[str, float]:
    from moeclip.cli import main

    start = time.perf_counter()
    with LineWatcher(out / "results.jsonl") as w:
        code = main([*argv, "--out", str(out)])
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code})")
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == n and not any("error" in json.loads(x) for x in lines), "every image once, no error"
    t = sorted(w.times) or [start + wall]
    return {"wall_s": wall, "images_per_s": n / wall, "first_result_s": t[0] - start}


def stage_costs(images: Path, ckpt: Path, k: int = 16) -> Dict[str, float]:
    """Per image, one thread: decode (pipeline.decode) and the files of predict (npy + overlay PNG)."""
    from moeclip.inference.build import RuntimeSpec
    from moeclip.inference.pipeline import decode
    from moeclip.inference.render import overlay, png_bytes

    files = sorted(images.iterdir())[:k]
    built = RuntimeSpec(checkpoint=str(ckpt), device="cpu").build()
    warm = decode(files[0])  # imports (matplotlib's colour maps) outside the timing
    png_bytes(overlay(warm, built.post.unit_map(np.zeros((warm.height, warm.width), np.float32))))
    t0 = time.perf_counter()
    decoded = [decode(f) for f in files]
    t1 = time.perf_counter()
    h, w = decoded[0].height, decoded[0].width  # a smooth map, as the model's (noise would not compress)
    amap = (20 * np.outer(np.hanning(h), np.hanning(w))).astype(np.float32)
    for img in decoded:
        buf = io.BytesIO()
        np.save(buf, amap)
        png_bytes(overlay(img, built.post.unit_map(amap)))
    t2 = time.perf_counter()
    return {"decode_ms": 1e3 * (t1 - t0) / len(files), "files_ms": 1e3 * (t2 - t1) / len(files)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip-model", default="ViT-B-16", help="open_clip architecture (random weights) or a JSON config")
    p.add_argument("--image-size", type=int, default=224, help="model input side")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--size", type=int, default=512, help="side of the synthetic images")
    p.add_argument("--actors", default="1,2", help="comma list of --ray-actors values")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds (medians reported)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--no-overlays", action="store_true", help="maps only (no overlay PNGs), in every variant")
    p.add_argument("--stages", action="store_true", help="also time decode and file rendering per image")
    p.add_argument("--device", default="cpu", help="predict's --device (cuda on a GPU node)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--gpus-per-actor", type=float, default=0, help="--ray-gpus-per-actor (GPU nodes)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import ray
    import torch

    from moeclip.model.checkpoint import save_checkpoint

    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    make_images(work / "images", args.images, args.size)
    model = build_moeclip(args.clip_model, args.image_size, torch.device("cpu"))
    ckpt = save_checkpoint(model, work / "ckpt", include_backbone=True)
    del model
    # Ray runs its workers at nice 15 by default: on a machine shared with other jobs (this one) that
    # starves the actors and would time the neighbours, not Ray; 0 = the same priority as `predict`
    os.environ.setdefault("RAY_worker_niceness", "0")
    t = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start = time.perf_counter() - t
    base = ["predict", "--checkpoint", str(ckpt), "--device", args.device, "--precision", args.precision,
            "--object", "object",
            "--batch-size", str(args.batch_size), str(work / "images")]
    base += ["--no-overlays"] if args.no_overlays else []
    variants = {"predict (1 process)": base}
    for a in (int(x) for x in args.actors.split(",")):
        variants[f"predict --ray, {a} actor(s)"] = [*base, "--ray", "local", "--ray-actors", str(a),
                                                    "--ray-gpus-per-actor", str(args.gpus_per_actor)]
    runs: Dict[str, List[Dict[str, float]]] = {k: [] for k in variants}
    for r in range(args.repeats):
        for name, argv in variants.items():
            runs[name].append(run_variant(argv, work / f"out-{r}-{len(runs[name])}-{abs(hash(name))}", args.images))
            print(f"round {r + 1}: {name}: {runs[name][-1]}", flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    single = med["predict (1 process)"]["images_per_s"]
    rows = [[k, v["wall_s"], v["first_result_s"], v["images_per_s"], v["images_per_s"] / single]
            for k, v in med.items()]
    print(f"\n{args.images} images {args.size}x{args.size}, {args.clip_model} @ {args.image_size}, batch "
          f"{args.batch_size}, {os.cpu_count()} CPUs, Ray cluster start {ray_start:.1f} s (not in the figures)")
    print_table(rows, ["variant", "wall s", "first result s", "img/s", "x 1 process"])
    doc: Dict[str, Any] = {"args": vars(args), "machine": machine_info(torch.device("cpu")), "ray": ray.__version__,
                           "ray_start_s": ray_start, "runs": runs, "median": med}
    if args.stages:
        doc["stages"] = stage_costs(work / "images", ckpt)
        print(f"per image, one thread: decode {doc['stages']['decode_ms']:.1f} ms, map + overlay files "
              f"{doc['stages']['files_ms']:.1f} ms")
    ray.shutdown()
    finish(doc, args.json)


if __name__ == "__main__":
    main()
