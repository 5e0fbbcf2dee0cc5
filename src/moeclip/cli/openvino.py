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
from .common import add_check_args, add_source_args, export_source, refuse_existing


def register_export(sub) -> None:
    """The ``openvino`` format of ``moeclip export``."""
    o = sub.add_parser("openvino", help="OpenVINO IR for one object",
                       description="Export image -> (anomaly map, raw image score) for one object to an OpenVINO "
                                   "IR folder (DIR/model.xml), converted from the ONNX graph.")
    add_source_args(o, metavar="DIR", help="output folder (model.xml, model.bin, moeclip.json)")
    o.add_argument("--fp16", action="store_true",
                   help="store the weights in fp16 (half the size; measure the map difference with the check)")
    add_check_args(o, "OpenVINO", "folder")
    o.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ..inference.openvino import compare_openvino, export_openvino

    if args.precision != "fp32":
        raise MoECLIPError("OpenVINO export starts from the fp32 model; drop --precision (use --fp16 for fp16 weights)")
    out = Path(args.out)
    refuse_existing(out, args.overwrite)
    detector, dep, checkpoint = export_source(args)
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
                             "needs only openvino and numpy); with --precision bf16 OpenVINO computes in bf16 "
                             "on CPUs that have it (AMX)")
