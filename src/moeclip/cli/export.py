"""``moeclip export onnx``: an ONNX model for one object (image -> anomaly map, raw image score).

The object's text features are baked in, the batch size is dynamic, and the deployment
(threshold, normalisation, pixel threshold), object and domain go into the model's metadata, so
``moeclip predict --onnx MODEL.onnx IMAGES --out DIR`` needs nothing else. After exporting, the
ONNX output is compared with PyTorch on random images (``--no-check`` skips this).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MoECLIPError
from . import openvino
from .common import add_check_args, add_source_args, export_source, refuse_existing


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a model (ONNX, OpenVINO)",
                              description="Export a model for deployment outside PyTorch.")
    sub = p.add_subparsers(dest="export_format", metavar="FORMAT")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    o = sub.add_parser("onnx", help="ONNX model for one object",
                       description="Export image -> (anomaly map, raw image score) for one object to ONNX.")
    add_source_args(o, metavar="MODEL.onnx")
    o.add_argument("--exporter", choices=("auto", "torchscript", "dynamo"), default="auto",
                   help="torch.onnx exporter: auto (default) tries the fast TorchScript exporter, then "
                        "dynamo (needs onnxscript)")
    o.add_argument("--opset", type=int, help="ONNX opset (default 18 for dynamo, 17 for torchscript)")
    o.add_argument("--routing-outputs", action="store_true",
                   help="also output the experts chosen in every MoE layer (routing.<i>)")
    add_check_args(o, "onnxruntime", "file")
    o.set_defaults(func=run_onnx)
    openvino.register_export(sub)


def run_onnx(args: argparse.Namespace) -> int:
    from ..inference.onnx import compare_onnx, export_onnx

    out = Path(args.out)
    refuse_existing(out, args.overwrite)
    if args.precision != "fp32":
        raise MoECLIPError("ONNX export is fp32; drop --precision")
    detector, dep, checkpoint = export_source(args)
    path = export_onnx(detector, out, object=args.object, domain=args.domain, deployment=dep,
                       routing_outputs=args.routing_outputs, exporter=args.exporter, opset=args.opset,
                       checkpoint=checkpoint)
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if not args.no_check:
        diffs = compare_onnx(detector, path)
        print(f"check: max |onnx - torch| anomaly map {diffs['anomaly_map']:.2e}, image score "
              f"{diffs['image_score']:.2e} on {diffs['batch']} random images"
              + (f", {diffs['routing_mismatches']} routing mismatch(es)" if "routing_mismatches" in diffs else ""))
        if diffs["anomaly_map"] > 1e-3 or diffs["image_score"] > 1e-4:
            raise MoECLIPError(f"{path}: ONNX output differs from PyTorch ({diffs}); try --exporter torchscript")
    return 0
