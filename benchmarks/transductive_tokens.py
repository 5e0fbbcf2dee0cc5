"""Which tokens should feed the mutual score of the fused transductive mode? Measured on a demo.

For the held-out classes of a ``moeclip demo --out`` folder (MuSc's protocol: per class, the
class's whole test split is one batch), with the product's code (``moeclip test --transductive``,
:mod:`moeclip.model.fused`):

* ``zero-shot``: the trained model alone (no batch);
* ``mutual alone (T)``: ``--mutual-weight 1``, the mutual map on tokens T only;
* ``fused (T)``: zero-shot + mutual, ``--mutual-weight 0.5`` (the default);

for T in ``adapted`` (MoE-adapted level tokens of the zero-shot pass), ``frozen`` (a second pass
of the frozen tower, MuSc's own tokens) and ``seg`` (the 12 segmentation features). Pixel and
image AUROC averaged over the classes, and the seconds each evaluation took.

    PYTHONPATH=src python benchmarks/transductive_tokens.py /work/demo_out [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from moeclip.engine.evaluate import Transductive, evaluate_source
from moeclip.engine.sources import build_source
from moeclip.model.checkpoint import load_model
from moeclip.model.fused import MUTUAL_TOKENS, MutualOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", type=Path, help="a 'moeclip demo --out' folder")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.demo / "checkpoint").eval()
    held = build_source(f"folder={args.demo / 'data' / 'heldout'}",
                        descriptions=str(args.demo / "data" / "shared-description.json"))
    size = model.config.backbone.image_size
    runs = [("zero-shot", None)]
    for tokens in MUTUAL_TOKENS:
        runs.append((f"mutual alone ({tokens})", MutualOptions(tokens, weight=1.0)))
        runs.append((f"fused ({tokens})", MutualOptions(tokens, weight=0.5)))
    rows = []
    for name, opts in runs:
        t = time.perf_counter()
        res = evaluate_source(model, held, image_size=size, device=torch.device("cpu"), batch_size=32,
                              progress=False, transductive=None if opts is None else Transductive(opts))
        rows.append({"variant": name, "pixel_auroc": res.average["pixel_auroc"],
                     "image_auroc": res.average["image_auroc"], "pixel_ap": res.average["pixel_ap"],
                     "seconds": round(time.perf_counter() - t, 2)})
        print(f"{name:<24} pixel AUROC {100 * rows[-1]['pixel_auroc']:5.1f}  image AUROC "
              f"{100 * rows[-1]['image_auroc']:5.1f}  pixel AP {100 * rows[-1]['pixel_ap']:5.1f}  "
              f"({rows[-1]['seconds']} s)", flush=True)
    doc = {"demo": str(args.demo), "cpu": cpu_name(), "threads": args.threads,
           "classes": list(held.groups()), "rows": rows}
    print(f"CPU: {doc['cpu']}, {args.threads} thread(s)")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
