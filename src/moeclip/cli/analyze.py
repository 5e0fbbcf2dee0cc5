"""``moeclip analyze experts``: how different the experts are and how evenly they are used.

Over a set of images, per MoE layer: the E x E mean cosine similarity between the experts'
outputs on the same tokens (the paper reports the mean off-diagonal value: 0.45 for a plain
MoE, 0.24 with FOFS, 0.02 with FOFS + ETF) and the expert load (share of tokens each expert
gets as top-1 and within the top-k). Writes ``experts.json``, one heat map per layer and a
load chart into ``--out``.
"""
from __future__ import annotations

import glob
import json
import sys
from pathlib import Path
from typing import List

from ..errors import MoECLIPError

JSON_FILE = "experts.json"


def register(subparsers) -> None:
    from .common import add_model_args

    p = subparsers.add_parser("analyze", help="analyse a trained model (expert similarity and load)",
                              description="Analyses of a trained model over a set of images.")
    p.set_defaults(func=_no_action, _analyze_parser=p)
    sub = p.add_subparsers(dest="analyze_command", metavar="WHAT")
    e = sub.add_parser("experts", help="expert output similarity and load per MoE layer",
                       description="Mean pairwise cosine similarity of the experts' outputs on the same tokens "
                                   "and the share of tokens each expert receives, per MoE layer.")
    src = e.add_argument_group("images (one or both, repeatable)")
    src.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                     help="a dataset as for 'moeclip test' (MVTec=/data/mvtec, folder=DIR, jsonl=FILE); "
                          "all its test images are used")
    src.add_argument("--images", action="append", default=[], metavar="DIR|GLOB",
                     help="a folder (searched recursively) or a glob pattern of image files")
    e.add_argument("--max-images", type=int, default=200, metavar="N",
                   help="use at most N images, evenly spread over the sorted list (default 200; 0 = all)")
    e.add_argument("--tokens", choices=("all", "patches"), default="all",
                   help="tokens to average over: CLS + patches (all, default; what the ETF loss sees) or patches")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--out", required=True, metavar="DIR", help="output folder (experts.json, PNGs)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier analysis in --out")
    add_model_args(e)
    e.set_defaults(func=run_experts)


def _no_action(args) -> int:
    args._analyze_parser.print_help()
    return 2


def collect_images(data: List[str], images: List[str]) -> List[str]:
    """Sorted, de-duplicated image paths from ``--data`` sources and ``--images`` folders/globs."""
    from ..data.scanners import IMAGE_EXTENSIONS, load_data

    found = set()
    for value in data:
        found.update(s.image_path for s in load_data(value).samples)
    for value in images:
        p = Path(value).expanduser()
        if p.is_dir():
            hits = [q for q in p.rglob("*") if q.is_file()]
        elif p.is_file():
            hits = [p]
        else:
            hits = [Path(q) for q in glob.glob(str(p), recursive=True)]
            if not hits:
                raise MoECLIPError(f"--images {value}: no such folder or file, and the pattern matches nothing")
        found.update(str(q.resolve()) for q in hits
                     if q.suffix.lower() in IMAGE_EXTENSIONS and not q.name.startswith("."))
    return sorted(found)


def spread(items: List[str], n: int) -> List[str]:
    """``n`` items evenly spaced over the list, so every class of a sorted dataset is seen."""
    if n <= 0 or len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def run_experts(args) -> int:
    import numpy as np
    import torch

    from ..analysis import viz
    from ..data.imageio import load_image
    from ..data.transforms import preprocess_image
    from ..analysis.explain import ExpertStatsAccumulator
    from ..precision import autocast
    from .common import detector_from_args, progress

    if not args.data and not args.images:
        raise MoECLIPError("give the images to analyse with --data NAME=PATH or --images DIR|GLOB")
    if args.batch_size < 1:
        raise MoECLIPError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    if (out / JSON_FILE).exists() and not args.overwrite:
        raise MoECLIPError(f"{out}: holds an earlier analysis (use --overwrite to replace it)")
    paths = spread(collect_images(args.data, args.images), args.max_images)
    if not paths:
        raise MoECLIPError("no images found in the given --data / --images")
    det = detector_from_args(args)
    model, size = det.model, det.image_size
    acc = ExpertStatsAccumulator(model, tokens=args.tokens)
    used, skipped = 0, []
    for start in progress(range(0, len(paths), args.batch_size), desc="images", unit="batch"):
        tensors = []
        for path in paths[start:start + args.batch_size]:
            try:
                tensors.append(preprocess_image(load_image(path), size))
            except MoECLIPError as exc:
                skipped.append(path)
                print(f"skipped: {exc}", file=sys.stderr)
        if tensors:
            with torch.inference_mode(), autocast(det.device, det.precision):
                acc.update(torch.stack(tensors).to(det.device))
            used += len(tensors)
    if not used:
        raise MoECLIPError("none of the images could be read")

    cfg = model.adapter_config
    stats = acc.result()
    out.mkdir(parents=True, exist_ok=True)
    layers = []
    for i, s in enumerate(stats):
        name = f"similarity_layer{i}_block{s.block}.png"
        off = "n/a" if s.mean_off_diagonal is None else f"{s.mean_off_diagonal:.3f}"
        viz.save_figure(viz.similarity_figure(s.similarity, f"MoE layer {i} (after block {s.block})\n"
                                                            f"mean off-diagonal {off}"), out / name)
        layers.append({"layer": i, **s.to_dict(), "figure": name})
    titles = [f"layer {i} (block {s.block})" for i, s in enumerate(stats)]
    viz.save_figure(viz.load_figure([s.top1_fraction for s in stats], [s.topk_fraction for s in stats],
                                    titles, cfg.top_k), out / "load.png")
    offs = [s.mean_off_diagonal for s in stats if s.mean_off_diagonal is not None]
    doc = {"checkpoint": str(args.checkpoint), "images": used, "skipped": skipped, "tokens": args.tokens,
           "num_experts": cfg.num_experts, "top_k": cfg.top_k,
           "mean_off_diagonal_similarity": float(np.mean(offs)) if offs else None,
           "layers": layers, "load_figure": "load.png"}
    (out / JSON_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{used} images; per MoE layer: mean off-diagonal similarity, top-1 load per expert")
    for i, s in enumerate(stats):
        off = "n/a" if s.mean_off_diagonal is None else f"{s.mean_off_diagonal:+.3f}"
        print(f"  layer {i} (block {s.block:>2}): {off}   " + " ".join(f"{v:.2f}" for v in s.top1_fraction))
    print(f"written to {out / JSON_FILE}")
    return 0
