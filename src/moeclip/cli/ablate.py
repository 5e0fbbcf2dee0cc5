"""``moeclip ablate``: train + zero-shot test over the paper's ablation switches; one table."""
from __future__ import annotations

import json
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

    from ..analysis.ablate import DEFAULT_SWITCHES, apply, label, parse_switches, settings, table
    from ..fileio import atomic_write_text
    from ..model.config import ModelConfig
    from ..engine.evaluate import evaluate_source
    from ..engine.sources import build_sources
    from ..engine.train import Trainer, TrainConfig, prepare_run_dir
    from ..errors import MoECLIPError
    from ..model.moeclip import MoECLIP
    from ..precision import resolve_device

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise MoECLIPError(f"{out}: output directory is not empty (use --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    switches = parse_switches(args.switch or DEFAULT_SWITCHES)
    runs = settings(switches, args.mode)
    descriptions = args.descriptions
    workers = 0
    if not args.data:  # the demo's synthetic setting: shared description, tiny random CLIP
        from ..data.synth import DEFAULT_HELDOUT_CATEGORIES, DEFAULT_TRAIN_CATEGORIES, generate_dataset
        from ..engine.demo import SHARED_DESCRIPTION, DemoConfig, builtin_clip_config

        d = DemoConfig(out=out)
        size = args.image_size or d.image_size
        generate_dataset(out / "data" / "train", DEFAULT_TRAIN_CATEGORIES, n_normal=d.train_per_category // 2,
                         n_anomalous=d.train_per_category // 2, image_size=size, seed=args.seed, overwrite=True,
                         defect_scale=d.defect_scale)
        generate_dataset(out / "data" / "heldout", DEFAULT_HELDOUT_CATEGORIES, n_normal=d.heldout_per_category // 2,
                         n_anomalous=d.heldout_per_category // 2, image_size=size, seed=args.seed + 1,
                         overwrite=True, defect_scale=d.defect_scale)
        shared = out / "data" / "shared-description.json"
        shared.write_text(json.dumps({c: SHARED_DESCRIPTION for c in DEFAULT_TRAIN_CATEGORIES + DEFAULT_HELDOUT_CATEGORIES}))
        args.data = [f"folder={out / 'data' / 'train'}"]
        args.test_data = args.test_data or [f"folder={out / 'data' / 'heldout'}"]
        descriptions = descriptions or str(shared)
        args.clip_model = args.clip_model or builtin_clip_config()
        args.clip_weights = args.clip_weights or "none"
        args.image_size = size
        torch.set_num_threads(1)  # as the demo: the tiny model gains nothing from a second thread
        workers = 1
    if not args.test_data:
        raise MoECLIPError("--test-data NAME=PATH is required when --data is given")
    args.clip_model = args.clip_model or "ViT-L-14-336"
    args.clip_weights = args.clip_weights or "openai"
    args.image_size = args.image_size or 518
    train_src = build_sources(args.data, descriptions=descriptions)
    test_src = build_sources(args.test_data, descriptions=descriptions)
    base_cfg = model_config_from_args(args)
    base = runs[0] if args.mode == "one-at-a-time" else {n: v[0] for n, v in switches}
    keys = ("pixel_auroc", "pixel_ap", "image_auroc", "image_ap")
    rows = []
    for i, setting in enumerate(runs):
        name = label(setting, base)
        print(f"[{i + 1}/{len(runs)}] {name}")
        torch.manual_seed(args.seed)
        model = MoECLIP.from_config(ModelConfig(base_cfg.backbone, apply(base_cfg.adapter, setting))).to(device)
        run_dir = out / "runs" / f"{i:02d}"
        prepare_run_dir(run_dir, resume=False, overwrite=True)
        cfg = TrainConfig(epochs=10 ** 6, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          max_steps=args.steps, precision=args.precision, workers=workers)
        Trainer(model, train_src, cfg, run_dir, device).train()
        results = [evaluate_source(model, s, image_size=args.image_size, device=device, precision=args.precision)
                   for s in test_src]
        avg = {k: _mean([r.average.get(k) for r in results]) for k in keys}
        rows.append({"setting": name, **{k: setting[k] for k in setting}, **avg,
                     "per_dataset": {r.source: r.average for r in results}})
        print(table(rows[-1:], keys))
    md = table(rows, keys)
    atomic_write_text(out / "ablation.md", md + "\n")
    atomic_write_text(out / "ablation.json", json.dumps({"switches": [[n, v] for n, v in switches], "mode": args.mode,
                                                         "steps": args.steps, "runs": rows}, indent=2, default=str) + "\n")
    header = ["setting", *[n for n, _ in switches], *keys]
    lines = [",".join(header)] + [",".join(str(r.get(h, "")) if r.get(h) is not None else "" for h in header)
                                  for r in rows]
    atomic_write_text(out / "ablation.csv", "\n".join(lines) + "\n")
    print("\n" + md + f"\n\nwritten to {out / 'ablation.md'}, ablation.json, ablation.csv")
    return 0


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
