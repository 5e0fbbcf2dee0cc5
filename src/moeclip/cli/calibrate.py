"""``moeclip calibrate``: choose decision thresholds for one object and write a deployment file.

Two ways to calibrate:

* ``--normal DIR`` (defect-free images only): the image threshold is the lowest one that keeps
  the false-positive rate on those images at most ``--max-fpr``; the pixel threshold likewise
  keeps at most ``--pixel-max-fpr`` of their pixels in the masks. Without anomalies the score
  normalisation gets ``--headroom`` (default 1: the normals fill the lower half of [0, 1]) so that
  stronger anomalies do not all saturate at 1.
* ``--data NAME=PATH`` (labelled test data, e.g. ``folder=/data/mine``): thresholds maximise F1
  (images; pixels when masks exist), or meet ``--max-fpr`` on its normals with ``--criterion fpr``.
  The normalisation is the min-max of all images, as the official per-class evaluation.

Pixel statistics use the maps resized to at most 128x128 (the maps are smooth upsamplings of the
patch grid, so this changes thresholds negligibly and bounds memory).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import MoECLIPError
from .common import add_domain_arg, add_model_args, model_options, progress

PIXEL_STATS_SIZE = 128


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="set decision thresholds for one object, write a deployment file",
        description="Run the model on normal images (--normal) or labelled data (--data) of one "
                    "object and write deploy.json: image threshold, pixel threshold and score "
                    "normalisation, for 'predict --deploy', 'serve --deploy' and 'export onnx --deploy'.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--normal", nargs="+", metavar="IMAGE|FOLDER|GLOB",
                     help="defect-free images of the object (files, folders, globs)")
    src.add_argument("--data", metavar="NAME=PATH",
                     help="labelled data: a known dataset (MVTec=/data/mvtec) or folder=/jsonl=/meta=; "
                          "see 'moeclip datasets list'")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="with --data: the class to calibrate (needed when the data has several)")
    p.add_argument("--object", help="object description (default: the dataset's for --class, else 'object')")
    add_domain_arg(p, "default: the dataset's domain, else industrial")
    p.add_argument("--max-fpr", type=float, default=0.01,
                   help="largest false-positive rate on normal images (default 0.01)")
    p.add_argument("--pixel-max-fpr", type=float, default=None,
                   help="largest fraction of normal pixels inside masks (default: --max-fpr)")
    p.add_argument("--criterion", choices=("f1", "fpr"), default=None,
                   help="threshold rule with --data: F1-optimal (default) or --max-fpr on its normals")
    p.add_argument("--headroom", type=float, default=None,
                   help="widen the normalisation range above the observed maximum by this fraction "
                        "of the range (default 1 with --normal, 0 with --data)")
    p.add_argument("--out", required=True, metavar="deploy.json", help="deployment file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--batch-size", type=int, default=8)
    fs = p.add_argument_group("few-shot (see README 'Few-shot')")
    fs.add_argument("--reference", nargs="*", metavar="IMAGE|FOLDER|GLOB",
                    help="normal reference images: their memory bank is written beside --out and used by "
                         "predict/serve --deploy; without a value, the --normal images themselves, each "
                         "scored leave-one-out (never against its own patches)")
    fs.add_argument("--reference-weight", type=float, default=0.5, metavar="W",
                    help="weight of the few-shot map in the fused map (default 0.5)")
    fs.add_argument("--bank-size", type=int, metavar="N", help="greedy-coreset subsample of each map's bank")
    fs.add_argument("--bank-fp16", action="store_true", help="store the memory bank in fp16")
    add_model_args(p, checkpoint_required=True)
    p.set_defaults(func=run)


def _labelled_items(args) -> Tuple[List[Tuple[Path, int, Optional[str]]], Optional[str], Optional[str]]:
    """(path, label, mask path) of the chosen class, plus the dataset's description and domain."""
    from ..data.registry import DatasetSpec, describe, parse_data_arg
    from ..data.scanners import load_data

    source, path = parse_data_arg(args.data)
    spec = source if isinstance(source, DatasetSpec) else source.dataset
    result = load_data((source, path))
    for problem in result.problems[:5]:
        print(f"warning: {problem}", file=sys.stderr)
    samples = result.samples
    classes = sorted({s.class_name for s in samples})
    if args.class_name:
        samples = [s for s in samples if s.class_name == args.class_name]
        if not samples:
            raise MoECLIPError(f"--class {args.class_name!r} not in the data (classes: {', '.join(classes)})")
    elif len(classes) > 1:
        raise MoECLIPError(f"the data holds {len(classes)} classes; choose one with --class "
                           f"({', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''})")
    if not samples:
        raise MoECLIPError(f"--data {args.data}: no images found")
    cls = args.class_name or samples[0].class_name
    items = [(Path(s.image_path), int(s.label), s.mask_path if s.has_pixel_gt else None) for s in samples]
    return items, describe(spec, cls), (spec.domain if spec else None)


def _collect(detector, items, obj: str, domain: str, batch_size: int, orient: bool,
             scorer=None) -> Dict[str, np.ndarray]:
    """Run the model: per-image raw score, map min/max, and downsized maps (and masks) for pixel statistics.

    ``orient``: user photos (``--normal``) are read as ``predict`` reads them (EXIF applied);
    dataset images keep their raw pixels, aligned with their masks.
    """
    import torch
    import torch.nn.functional as F

    from ..data.imageio import load_image, load_mask
    from ..data.transforms import preprocess_image

    size = detector.image_size
    r = min(size, PIXEL_STATS_SIZE)
    raw, mmin, mmax, labels, small, masks, has_mask = [], [], [], [], [], [], []
    skipped = 0
    bar = progress(total=len(items), unit="img", desc="calibrate")
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        tensors, kept = [], []
        for path, label, mask in chunk:
            try:
                tensors.append(preprocess_image(load_image(path, orient=orient), size))
                kept.append((path, label, mask))
            except MoECLIPError as exc:
                print(f"warning: skipped {exc}", file=sys.stderr)
                skipped += 1
        bar.update(len(chunk))
        if not tensors:
            continue
        if scorer is not None:  # few-shot: fused maps and scores on the raw scales
            maps, scores = scorer([str(p) for p, _, _ in kept], torch.stack(tensors), obj, domain)
            out = {"anomaly_map": maps, "image_score": scores}
        else:
            out = detector.predict_tensors(torch.stack(tensors), obj, domain)
        maps = out["anomaly_map"]
        down = F.interpolate(maps[:, None], size=(r, r), mode="bilinear", align_corners=True)[:, 0]
        raw.extend(out["image_score"].cpu().tolist())
        mmin.extend(maps.flatten(1).min(1).values.cpu().tolist())
        mmax.extend(maps.flatten(1).max(1).values.cpu().tolist())
        small.append(down.cpu().numpy())
        for path, label, mask in kept:
            labels.append(label)
            if label and mask:
                masks.append(load_mask(mask, size=(r, r)))
                has_mask.append(True)
            else:
                masks.append(np.zeros((r, r), dtype=bool))
                has_mask.append(not label)  # a normal image's empty mask is known
    bar.close()
    if not raw:
        raise MoECLIPError("no readable calibration image")
    return {"raw": np.array(raw), "map_min": np.array(mmin), "map_max": np.array(mmax),
            "labels": np.array(labels, dtype=int), "maps": np.concatenate(small), "masks": np.stack(masks),
            "has_mask": np.array(has_mask), "skipped": skipped}


def run(args: argparse.Namespace) -> int:
    from ..inference.deploy import Deployment
    from ..inference.postprocess import Normalization, f1_threshold, fpr_threshold, rates
    from ..model.options import absolute_options
    from ..model.prompts import GENERIC_OBJECT
    from .common import detector_from_args, refuse_existing

    out_path = Path(args.out)
    refuse_existing(out_path, args.overwrite)
    if not 0.0 <= args.max_fpr < 1.0:
        raise MoECLIPError(f"--max-fpr must be in [0, 1), got {args.max_fpr}")
    pixel_fpr = args.max_fpr if args.pixel_max_fpr is None else args.pixel_max_fpr
    if args.normal:
        from ..inference.pipeline import expand_inputs

        if args.class_name or args.criterion == "f1":
            raise MoECLIPError("--class and --criterion f1 need labelled --data")
        items = [(job.path, 0, None) for job in expand_inputs(args.normal)]
        description, data_domain = None, None
        criterion, headroom = "fpr", 1.0 if args.headroom is None else args.headroom
    else:
        items, description, data_domain = _labelled_items(args)
        criterion, headroom = args.criterion or "f1", 0.0 if args.headroom is None else args.headroom
    if not items:
        raise MoECLIPError("no calibration images found")
    obj = args.object or description or GENERIC_OBJECT
    domain = args.domain or data_domain or "industrial"
    detector = detector_from_args(args, domain=domain, object=obj)
    scorer, bank = _few_shot(args, detector, items, obj)
    stats = _collect(detector, items, obj, domain, args.batch_size, orient=bool(args.normal), scorer=scorer)
    labels = stats["labels"]
    if criterion == "f1" and (labels.min() == labels.max()):
        raise MoECLIPError("F1 calibration needs normal and anomalous images; use --criterion fpr "
                           "(normals only) or --normal")
    if criterion == "fpr" and not (labels == 0).any():
        raise MoECLIPError("no normal image to calibrate the false-positive rate on")

    norm = Normalization.fit(stats["map_min"].min(), stats["map_max"].max(), stats["raw"].min(),
                             stats["raw"].max(), headroom)
    detector.normalization = norm
    scores = np.array([detector.score_from(m, s) for m, s in zip(stats["map_max"], stats["raw"])])
    if criterion == "f1":
        threshold, _ = f1_threshold(scores, labels)
    else:
        threshold = fpr_threshold(scores[labels == 0], args.max_fpr)

    pixels, pixel_labels = stats["maps"], stats["masks"]
    anomalous_masks = bool((stats["has_mask"] & (labels == 1)).any())
    if criterion == "f1" and anomalous_masks:
        known = stats["has_mask"]
        pixel_threshold, _ = f1_threshold(pixels[known].ravel(), pixel_labels[known].ravel())
        pixel_rule = "f1"
    else:
        pixel_threshold = fpr_threshold(pixels[labels == 0].ravel(), pixel_fpr)
        pixel_rule = "fpr"

    image_rates = rates(scores, labels, threshold)
    calibration = {
        "source": "normal" if args.normal else f"data:{args.data}",
        "class": args.class_name, "criterion": criterion, "pixel_criterion": pixel_rule,
        "max_fpr": args.max_fpr, "pixel_max_fpr": pixel_fpr, "headroom": headroom,
        "num_images": int(labels.size), "num_normal": int((labels == 0).sum()),
        "num_anomalous": int((labels == 1).sum()), "skipped": int(stats["skipped"]),
        "observed": {"map_min": float(stats["map_min"].min()), "map_max": float(stats["map_max"].max()),
                     "score_min": float(stats["raw"].min()), "score_max": float(stats["raw"].max())},
        "image": {k: (None if np.isnan(v) else round(float(v), 6)) for k, v in image_rates.items()},
        "pixel_stats_size": int(stats["maps"].shape[-1]),
        "image_size": int(detector.image_size),
    }
    checkpoint = str(Path(args.checkpoint).resolve())
    dep = Deployment(object=obj, domain=domain, threshold=threshold, pixel_threshold=float(pixel_threshold),
                     normalization=norm.to_dict(), checkpoint=checkpoint,
                     model_options=absolute_options(model_options(args)), calibration=calibration)
    if bank is not None:
        bank_path = out_path.with_name(out_path.stem + ".bank.safetensors")
        bank.save(bank_path, overwrite=args.overwrite)
        dep.references, dep.reference_weight = bank_path.name, args.reference_weight
        calibration["few_shot"] = {"references": bank.num_references, "leave_one_out": not args.reference,
                                   "bank_size": args.bank_size, "bank_fp16": args.bank_fp16}
    dep.save(out_path, overwrite=args.overwrite)
    fpr = calibration["image"]["fpr"]
    tpr = calibration["image"]["tpr"]
    print(f"{labels.size} image(s) of {obj!r}: threshold {threshold:.6g} ({criterion}; FPR {fpr}"
          + (f", TPR {tpr}" if tpr is not None else "") + f"), pixel threshold {pixel_threshold:.6g} -> {out_path}")
    return 0


def _few_shot(args, detector, items, obj: str):
    """(scorer for _collect, the bank to save) with --reference; (None, None) without."""
    if args.reference is None:
        return None, None
    from ..inference.references import FusedScorer, bank_from_images, load_references
    from ..model.fusion import check_weight

    check_weight(args.reference_weight)
    if args.reference:
        pils, names = load_references(args.reference)
        loo = False
    else:
        if not args.normal:
            raise MoECLIPError("--reference without images uses the --normal images (leave-one-out); "
                               "with --data give reference images")
        pils, names = load_references([p for p, _, _ in items])
        loo = True
    common = dict(image_size=detector.image_size, precision=detector.precision, names=names)
    full = bank_from_images(detector.model, pils, obj, **common)
    saved = full
    if args.bank_size is not None or args.bank_fp16:
        saved = bank_from_images(detector.model, pils, obj, bank_size=args.bank_size, fp16=args.bank_fp16, **common)
    # leave-one-out drops one image's rows from the full bank; otherwise score with the bank as saved
    return FusedScorer(detector, full if loo else saved, args.reference_weight, leave_one_out=loo), saved
