"""``moeclip demo``: the whole method on synthetic data, offline, in a few minutes on a CPU."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    from ..engine.demo import DemoConfig

    d = DemoConfig(out=Path("demo_out"))
    p = sub.add_parser("demo", help="offline end-to-end demo on synthetic data (no downloads)",
                       description="Generate synthetic anomalies, train MoECLIP on some categories with a tiny "
                                   "random CLIP, evaluate zero-shot on held-out categories before and after.")
    p.add_argument("--out", default="demo_out", help="output directory (default: %(default)s)")
    p.add_argument("--clip-model", help="open_clip architecture or JSON config instead of the built-in tiny one")
    p.add_argument("--clip-weights", help="pretrained tag or weight file for --clip-model")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--steps", type=int, default=d.steps, help="training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--train-per-category", type=int, default=d.train_per_category)
    p.add_argument("--heldout-per-category", type=int, default=d.heldout_per_category)
    p.add_argument("--defect-scale", type=float, default=d.defect_scale,
                   help="defect size relative to the image (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--shots", type=int, default=d.shots,
                   help="normal references per held-out category in the few-shot stage, 0 skips it "
                        "(default: %(default)s)")
    p.add_argument("--no-transductive", action="store_true",
                   help="skip the transductive stage (each held-out category's test images as one batch)")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..analysis.overlay import save_triptych
    from ..engine.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=Path(args.out), clip_model=args.clip_model, clip_weights=args.clip_weights,
                        image_size=args.image_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        train_per_category=args.train_per_category, heldout_per_category=args.heldout_per_category,
                        seed=args.seed, shots=args.shots, transductive=not args.no_transductive,
                        defect_scale=args.defect_scale, device=args.device,
                        overwrite=args.overwrite), draw=save_triptych)
    return 0
