"""OpenVINO flags: ``moeclip export openvino`` and ``moeclip predict --openvino`` (one hook line in each command).

``moeclip export openvino --checkpoint CK --object "metal nut" --out DIR [--fp16]`` writes
``DIR/model.xml`` (+ ``model.bin``, ``moeclip.json``), converted from the exact ONNX graph of
``export onnx``; object, domain, image size, number of maps, the input normalisation and the
deployment (``--deploy``) travel in the IR's rt_info, so ``moeclip predict --openvino
DIR/model.xml IMAGES --out OUT`` needs nothing else and imports no torch.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MoECLIPError
from .common import add_model_args, model_options


def register_export(sub) -> None:
    """The ``openvino`` format of ``moeclip export``."""
    o = sub.add_parser("openvino", help="OpenVINO IR for one object",
                       description="Export image -> (anomaly map, raw image score) for one object to an OpenVINO "
                                   "IR folder (DIR/model.xml), converted from the ONNX graph.")
    o.add_argument("--out", required=True, metavar="DIR", help="output folder (model.xml, model.bin, moeclip.json)")
    o.add_argument("--object", help="object description (default: the deployment's, else 'object')")
    o.add_argument("--domain", choices=("industrial", "medical"), help="default: the deployment's, else industrial")
    o.add_argument("--deploy", metavar="FILE", help="deployment file to embed (and its checkpoint and object)")
    o.add_argument("--fp16", action="store_true",
                   help="store the weights in fp16 (half the size; measure the map difference with the check)")
    o.add_argument("--no-check", action="store_true", help="skip the OpenVINO-vs-PyTorch comparison")
    o.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_model_args(o, checkpoint_required=False)
    o.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ..inference.deploy import Deployment
    from ..inference.openvino import compare_openvino, export_openvino

    if args.precision != "fp32":
        raise MoECLIPError("OpenVINO export starts from the fp32 model; drop --precision (use --fp16 for fp16 weights)")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MoECLIPError(f"{out} already exists (use --overwrite to replace it)")
    dep = Deployment.load(args.deploy) if args.deploy else None
    if dep is not None:
        if args.object and args.object.strip() != dep.object:
            raise MoECLIPError(f"the deployment was calibrated for {dep.object!r}, not {args.object!r}")
        detector = dep.detector(checkpoint=args.checkpoint, options=model_options(args), device="cpu",
                                domain=args.domain)
        checkpoint = args.checkpoint or dep.checkpoint
    elif args.checkpoint:
        from ..inference.detector import Detector
        from .common import load_model_from_args

        detector = Detector(load_model_from_args(args), device="cpu", domain=args.domain or "industrial",
                            object=args.object)
        checkpoint = str(Path(args.checkpoint).resolve())
    else:
        raise MoECLIPError("--checkpoint is required (or --deploy FILE)")
    path = export_openvino(detector, out, object=args.object, domain=args.domain, deployment=dep, fp16=args.fp16,
                           checkpoint=checkpoint, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in path.parent.iterdir())
    print(f"exported {path} ({size / 1e6:.1f} MB{', fp16 weights' if args.fp16 else ''})")
    if not args.no_check:
        diffs = compare_openvino(detector, path)
        print(f"check: max |openvino - torch| anomaly map {diffs['anomaly_map']:.2e}, image score "
              f"{diffs['image_score']:.2e} on {diffs['batch']} random images")
        if not args.fp16 and (diffs["anomaly_map"] > 1e-3 or diffs["image_score"] > 1e-4):
            raise MoECLIPError(f"{path}: OpenVINO output differs from PyTorch ({diffs})")
    return 0


# ---------------------------------------------------------------------------- predict --openvino
def add_predict_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--openvino", metavar="DIR/model.xml",
                        help="run an exported OpenVINO IR instead of PyTorch (object fixed by the export; "
                             "needs only openvino and numpy)")
