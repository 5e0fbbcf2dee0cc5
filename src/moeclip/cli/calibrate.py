"""``moeclip calibrate``: choose decision thresholds for one object and write a deployment file.

Argument parsing only; the work is :mod:`moeclip.inference.calibrate`.

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
from pathlib import Path

from ..errors import MoECLIPError
from .common import add_bank_args, add_domain_arg, add_model_args, model_options


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
                         "predict/serve --deploy and export onnx --deploy; without a value, the --normal images "
                         "themselves, each scored leave-one-out (never against its own patches)")
    add_bank_args(fs, "the memory bank")
    add_model_args(p, checkpoint_required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..inference.calibrate import calibrate, labelled_items
    from ..inference.deploy import Deployment
    from ..inference.pipeline import expand_inputs
    from ..inference.torch_runtime import TorchRuntime
    from ..model.options import absolute_options
    from ..model.prompts import GENERIC_OBJECT
    from .common import detector_from_args, refuse_existing

    out_path = Path(args.out)
    refuse_existing(out_path, args.overwrite)
    if args.normal:
        if args.class_name or args.criterion == "f1":
            raise MoECLIPError("--class and --criterion f1 need labelled --data")
        items = [(job.path, 0, None) for job in expand_inputs(args.normal)]
        description, data_domain = None, None
        rule, headroom = "fpr", 1.0 if args.headroom is None else args.headroom
    else:
        items, description, data_domain = labelled_items(args.data, args.class_name)
        rule, headroom = args.criterion or "f1", 0.0 if args.headroom is None else args.headroom
    obj = args.object or description or GENERIC_OBJECT
    domain = args.domain or data_domain or "industrial"
    if not items:
        raise MoECLIPError("no calibration images found")
    detector = detector_from_args(args, domain=domain, object=obj)
    runtime, bank = TorchRuntime(detector), None
    if args.reference is not None:  # few-shot: calibrate on the fused scores
        from ..inference.references import few_shot_calibration

        runtime, bank = few_shot_calibration(detector, obj, args.reference,
                                             [p for p, _, _ in items] if args.normal else None,
                                             weight=args.reference_weight, bank_size=args.bank_size,
                                             fp16=args.bank_fp16)
    cal = calibrate(runtime, items, obj, domain, rule=rule, max_fpr=args.max_fpr, pixel_max_fpr=args.pixel_max_fpr,
                    headroom=headroom, batch_size=args.batch_size, orient=bool(args.normal))
    calibration = {"source": "normal" if args.normal else f"data:{args.data}", "class": args.class_name,
                   **cal.statistics}
    dep = Deployment(object=obj, domain=domain, threshold=cal.threshold, pixel_threshold=cal.pixel_threshold,
                     normalization=cal.normalization.to_dict(), checkpoint=str(Path(args.checkpoint).resolve()),
                     model_options=absolute_options(model_options(args)), calibration=calibration)
    if bank is not None:
        bank_path = out_path.with_name(out_path.stem + ".bank.safetensors")
        bank.save(bank_path, overwrite=args.overwrite)
        dep.references, dep.reference_weight = bank_path.name, args.reference_weight
        calibration["few_shot"] = {"references": bank.num_references, "leave_one_out": not args.reference,
                                   "bank_size": args.bank_size, "bank_fp16": args.bank_fp16}
    dep.save(out_path, overwrite=args.overwrite)
    fpr, tpr = calibration["image"]["fpr"], calibration["image"]["tpr"]
    print(f"{cal.statistics['num_images']} image(s) of {obj!r}: threshold {cal.threshold:.6g} ({rule}; FPR {fpr}"
          + (f", TPR {tpr}" if tpr is not None else "")
          + f"), pixel threshold {cal.pixel_threshold:.6g} -> {out_path}")
    return 0
