"""Does NNCF INT8 keep the pixel maps? fp32 vs INT8 OpenVINO IR on an MVTec-layout folder (e.g. synthetic held-out).

Post-training quantisation (``nncf.quantize``, transformer preset) calibrated on the normal
images, then, per category: max |map difference| against the fp32 IR, relative to the fp32
map range, and pixel AUROC of both (maps at the model's resolution, masks resized with PIL's
nearest rule as ``moeclip test``). Nothing here is a default of the package.

    moeclip datasets synth --out synth --categories heldout --train-normal 8
    python benchmarks/int8.py --checkpoint demo_out/checkpoint --data synth --json int8.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="MVTec-layout folder (category/test/<type>, ground_truth)")
    p.add_argument("--subset-size", type=int, default=64, help="calibration images (default 64)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def category_items(cat: Path):
    """(image path, mask path or None) of the test split."""
    items = []
    for d in sorted((cat / "test").iterdir()):
        for f in sorted(d.glob("*.png")):
            mask = None if d.name == "good" else cat / "ground_truth" / d.name / f"{f.stem}_mask.png"
            items.append((f, mask))
    return items


def main(argv=None) -> int:
    import nncf
    import openvino as ov

    from moeclip.data.imageio import resize_mask
    from moeclip.inference.detector import Detector
    from moeclip.inference.onnx import preprocess
    from moeclip.inference.openvino import export_openvino
    from moeclip.metrics.ranking import auroc
    from moeclip.model.checkpoint import load_model

    args = parse_args(argv)
    root = Path(args.data)
    table = root / "descriptions.json"
    descriptions = json.loads(table.read_text()) if table.is_file() else {}
    model = load_model(args.checkpoint)
    det = Detector(model, device="cpu")
    size = int(model.config.backbone.image_size)
    core = ov.Core()
    rows = []
    for cat in sorted(d for d in root.iterdir() if (d / "test").is_dir()):
        desc = descriptions.get(cat.name, cat.name)
        items = category_items(cat)
        x = np.stack([preprocess(Image.open(f).convert("RGB"), size) for f, _ in items])
        normals = sorted((cat / "train" / "good").glob("*.png")) or [f for f, m in items if m is None]
        calib = [preprocess(Image.open(f).convert("RGB"), size)[None] for f in normals[:args.subset_size]]
        with tempfile.TemporaryDirectory() as tmp:
            xml = export_openvino(det, Path(tmp) / "fp32", object=desc)
            fp32_model = core.read_model(str(xml))
            int8_model = nncf.quantize(fp32_model, nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                                       subset_size=len(calib))
            maps = {}
            for name, m in (("fp32", core.read_model(str(xml))), ("int8", int8_model)):
                compiled = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                maps[name] = np.concatenate([np.asarray(compiled(x[i:i + 4])[0]) for i in range(0, len(x), 4)])
        gt = np.stack([resize_mask(np.asarray(Image.open(m)) > 0, size) if m else np.zeros((size, size), bool)
                       for _, m in items])
        diff = float(np.abs(maps["int8"] - maps["fp32"]).max())
        rng = float(maps["fp32"].max() - maps["fp32"].min())
        row = {"category": cat.name, "images": len(items), "calibration_images": len(calib),
               "max_abs_map_diff": diff, "relative_to_range": diff / rng,
               "pixel_auroc_fp32": auroc(maps["fp32"].ravel(), gt.ravel()),
               "pixel_auroc_int8": auroc(maps["int8"].ravel(), gt.ravel())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "data": str(root), "rows": rows},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
