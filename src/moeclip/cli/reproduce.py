"""``moeclip reproduce``: the paper's zero-shot protocol over several seeds, resumable, with a report."""
from __future__ import annotations

from ..model.options import adapter_overrides, backbone_overrides
from .common import add_model_args, int_list, model_options


def register(sub) -> None:
    from ..engine.config import TrainConfig
    from ..engine.reproduce import DEFAULT_SEEDS, PROTOCOL_NAMES

    t = TrainConfig()
    p = sub.add_parser(
        "reproduce", conflict_handler="resolve",
        help="reproduce the paper's zero-shot results (train, test, report) in one resumable command",
        description="Train on VisA (its test split, as the paper) and test zero-shot on MVTec, BTAD, RSDD, "
                    "DTD-Synthetic and the medical sets; train on MVTec and test on VisA. One training per seed; "
                    "every stage is a folder of --out, skipped when complete, so a rerun continues an interrupted "
                    "run. Writes reproduction.md/.json/.csv: ours (mean ± std over seeds) beside the paper.")
    p.add_argument("--data-root", required=True, metavar="DIR",
                   help="folder holding one folder per dataset, named by its registry name or an alias "
                        "(MVTec, VisA, BTAD, RSDD, DTD-Synthetic, Brain, headct, Liver, Retina, Colon_colonDB, "
                        "Colon_clinicDB, Colon_cvc300, Endo, Colon_Kvasir; see 'moeclip datasets list')")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (created; reused to continue a run)")
    p.add_argument("--protocol", choices=PROTOCOL_NAMES, default="all",
                   help="industrial, medical or all (default) test datasets")
    p.add_argument("--seeds", type=int_list, default=None, metavar="S,S,..",
                   help=f"one training per seed (default {','.join(map(str, DEFAULT_SEEDS))}; "
                        "not with --checkpoint, where each checkpoint is one replicate)")
    p.add_argument("--datasets", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], metavar="LIST",
                   help="only these test datasets of the protocol (comma list; default all)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (stages, datasets found and missing, expected times) and run nothing")
    p.add_argument("--transductive", action="store_true",
                   help="also MuSc's protocol: each test again with each class's test split as one unlabeled batch "
                        "(zero-shot + mutual fused), reported beside MuSc's published figures")
    p.add_argument("--skip-missing", action="store_true", help="run what is there instead of failing on missing data")
    add_model_args(p, checkpoint_required=False)
    p.add_argument("--checkpoint", action="extend", nargs="+", default=[], metavar="[TRAIN=]CKPT",
                   help="skip training and evaluate these checkpoints, one replicate each (official .pth with "
                        "the model flags, or ours); TRAIN= names the data it was trained on (default VisA), "
                        "e.g. --checkpoint visa.pth MVTec=mvtec.pth")
    o = p.add_argument_group("training (defaults: as 'moeclip train', the official protocol)")
    o.add_argument("--released", action="store_true",
                   help="reproduce the released train.py: no ETF/balance losses, no LoRA dropout")
    o.add_argument("--lr", type=float, default=t.lr, help="learning rate (released code 5e-5; the paper states 5e-4)")
    o.add_argument("--epochs", type=int, default=t.epochs)
    o.add_argument("--batch-size", type=int, default=t.batch_size)
    o.add_argument("--max-steps", type=int, default=None, help="stop each training after this many optimiser steps")
    o.add_argument("--grad-checkpoint", action="store_true", help="less memory, ~25-35%% slower (as for train)")
    o.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    o.add_argument("--eval-batch-size", type=int, default=8, help="test batch size (default 8)")
    p.set_defaults(func=run)


def _checkpoints(values):
    from ..data.registry import get_dataset
    from ..errors import MoECLIPError

    out = []
    for value in values:
        train, sep, path = value.partition("=")
        if sep:
            try:
                train = get_dataset(train).key
            except MoECLIPError:
                train, path = "VisA", value  # a path containing '='
        else:
            train, path = "VisA", value
        out.append((train, path))
    return tuple(out)


def config_from_args(args):
    """The library's :class:`~moeclip.engine.reproduce.ReproduceConfig` from the parsed flags."""
    import dataclasses

    from ..engine.config import TrainConfig
    from ..engine.reproduce import DEFAULT_SEEDS, ReproduceConfig
    from ..errors import MoECLIPError
    from ..model.config import AdapterConfig, BackboneConfig, ModelConfig

    if args.seeds is not None and args.checkpoint:
        raise MoECLIPError(f"--seeds {','.join(map(str, args.seeds))} does not apply with --checkpoint: each "
                           "given checkpoint is one replicate (drop --seeds, or drop --checkpoint to train one "
                           "model per seed)")
    seeds = tuple(args.seeds) if args.seeds is not None else tuple(DEFAULT_SEEDS)
    options = model_options(args)
    backbone = backbone_overrides(options)
    if str(backbone.get("pretrained", "")).lower() == "random":
        backbone["pretrained"] = None
    adapter = adapter_overrides(options)
    model = ModelConfig(dataclasses.replace(BackboneConfig(), **backbone),
                        dataclasses.replace(AdapterConfig(), **adapter, released_training=args.released))
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, precision=args.precision,
                        workers=args.workers, grad_checkpoint=args.grad_checkpoint, max_steps=args.max_steps)
    return ReproduceConfig(protocol=args.protocol, seeds=seeds,
                           datasets=tuple(args.datasets) if args.datasets else None,
                           checkpoints=_checkpoints(args.checkpoint), model=model, train=train,
                           backbone_overrides=backbone, adapter_overrides=adapter,
                           eval_batch_size=args.eval_batch_size, skip_missing=args.skip_missing, device=args.device,
                           transductive=args.transductive)


def run(args) -> int:
    from ..engine.reproduce import build_plan, run_plan
    from ..errors import MoECLIPError

    config = config_from_args(args)
    plan = build_plan(args.data_root, args.out, config)
    if args.dry_run:
        print(plan.format())
        try:
            plan.check()
        except MoECLIPError as exc:
            print(f"error: {exc}")
            return 2
        print("dry run: nothing was run")
        return 0
    print(plan.format())
    paths = run_plan(plan)
    print(f"report: {paths['md']} ({paths['json'].name}, {paths['csv'].name})")
    return 0
