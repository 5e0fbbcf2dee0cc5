"""A moeclip checkpoint in anomalib: test on an MVTec AD category, predict a folder, export to OpenVINO.

    pip install 'moeclip[anomalib]'
    python examples/anomalib_mvtec.py --checkpoint runs/visa/checkpoint --root datasets/MVTecAD --category bottle

Without real data, ``moeclip datasets synth --out synth --categories wood --train-normal 2`` writes the
MVTec layout (train/good, test/<defect>, ground_truth/<defect>); pass ``--root synth --category wood``.
An official MoECLIP ``.pth`` works too: add its hyper-parameters, e.g. ``--option clip_model=ViT-L-14-336``.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--root", required=True, help="MVTec AD root (holds <category>/train, test, ground_truth)")
    p.add_argument("--category", default="bottle")
    p.add_argument("--class-name", help="object description (default: moeclip's description of the category)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="official .pth hyper-parameter, e.g. clip_model=ViT-L-14-336 (repeatable)")
    p.add_argument("--out", default="anomalib_results")
    args = p.parse_args()

    from anomalib.data import MVTecAD
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine

    from moeclip.integrations.anomalib import MoEClip

    options = dict(o.split("=", 1) for o in args.option)
    model = MoEClip(checkpoint=args.checkpoint, class_name=args.class_name, **options)
    datamodule = MVTecAD(root=args.root, category=args.category, num_workers=0)
    engine = Engine(default_root_dir=args.out, accelerator="auto", devices=1)

    # zero-shot: validation (bounds and thresholds for the post-processor), then the test metrics
    metrics = engine.test(model, datamodule=datamodule)[0]
    print(f"{args.category} ({model.model.object!r}): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    # a plain folder of images, no datamodule: raw maps and moeclip's uncalibrated scores
    folder = Path(args.root) / args.category / "test"
    first = sorted(d for d in folder.iterdir() if d.is_dir())[0]
    for batch in engine.predict(model=model, data_path=first):
        print(batch.image_path[0], float(batch.pred_score[0]), tuple(batch.anomaly_map.shape))

    # the whole anomalib graph (resize + CLIP normalisation + model + post-processing) as OpenVINO IR
    path = engine.export(model, ExportType.OPENVINO, export_root=args.out)
    print(f"OpenVINO model: {path}")


if __name__ == "__main__":
    main()
