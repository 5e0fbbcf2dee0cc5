"""``moeclip ablate``: train + zero-shot test over the paper's ablation switches; one table."""
from __future__ import annotations

from pathlib import Path

from .common import PRECISIONS
from .train import add_architecture_args, model_config_from_args


def register(sub) -> None:
    from ..analysis.ablate import DEFAULT_SWITCHES, SWITCHES

    p = sub.add_parser("ablate", help="train+test grid over FOFS/ETF/PAA/experts/top-k switches",
                       description="Each run trains from the same seed and evaluates zero-shot; results go to "
                                   "ablation.json/.csv/.md. Without --data, the demo's synthetic data is used "
                                   "(training and held-out categories), which runs on a CPU in minutes.")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH", help="training data")
    p.add_argument("--test-data", action="append", default=[], metavar="NAME=PATH", help="zero-shot test data")
    p.add_argument("--descriptions", help="class -> object description file")
    p.add_argument("--switch", action="append", default=[], metavar="NAME=V1,V2",
                   help=f"values to compare, first = baseline (names: {', '.join(SWITCHES)}; "
                        f"default: {' '.join(DEFAULT_SWITCHES)})")
    p.add_argument("--mode", choices=["one-at-a-time", "grid"], default="one-at-a-time")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--steps", type=int, default=1000, help="training steps per run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    add_architecture_args(p)
    p.set_defaults(func=run, clip_model=None, clip_weights=None, image_size=None)


def run(args) -> int:
    import torch

    from ..analysis.ablate import DEFAULT_SWITCHES, demo_data, parse_switches, run_ablation, settings, write_ablation
    from ..engine.sources import build_sources
    from ..engine.train import TrainConfig
    from ..errors import MoECLIPError
    from ..precision import resolve_device

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise MoECLIPError(f"{out}: output directory is not empty (use --overwrite)")
    switches = parse_switches(args.switch or DEFAULT_SWITCHES)
    runs = settings(switches, args.mode)
    if args.data and not args.test_data:
        raise MoECLIPError("--test-data NAME=PATH is required when --data is given")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    descriptions, workers = args.descriptions, 0
    if not args.data:  # the demo's synthetic setting: shared description, tiny random CLIP
        from ..engine.demo import DemoConfig, builtin_clip_config

        args.image_size = args.image_size or DemoConfig(out=out).image_size
        train, heldout, shared = demo_data(out, args.image_size, args.seed)
        args.data, args.test_data = [train], args.test_data or [heldout]
        descriptions = descriptions or shared
        args.clip_model = args.clip_model or builtin_clip_config()
        args.clip_weights = args.clip_weights or "none"
        torch.set_num_threads(1)  # as the demo: the tiny model gains nothing from a second thread
        workers = 1
    args.clip_model = args.clip_model or "ViT-L-14-336"
    args.clip_weights = args.clip_weights or "openai"
    args.image_size = args.image_size or 518
    train_cfg = TrainConfig(epochs=10 ** 6, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            max_steps=args.steps, precision=args.precision, workers=workers)
    baseline = runs[0] if args.mode == "one-at-a-time" else {n: v[0] for n, v in switches}
    train_src = build_sources(args.data, descriptions=descriptions)
    test_src = build_sources(args.test_data, descriptions=descriptions)
    rows = run_ablation(model_config_from_args(args), runs, baseline, train_src, test_src, train_cfg, out,
                        image_size=args.image_size, device=device)
    md = write_ablation(out, rows, switches, args.mode, args.steps)
    print("\n" + md + f"\n\nwritten to {out / 'ablation.md'}, ablation.json, ablation.csv")
    return 0
