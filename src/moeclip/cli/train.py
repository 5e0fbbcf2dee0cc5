"""``moeclip train``: train the adapters on auxiliary annotated data (official protocol by default)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..model.config import AdapterConfig, BackboneConfig, ModelConfig
from .common import PRECISIONS


def add_architecture_args(p: argparse.ArgumentParser) -> None:
    """Backbone and adapter hyper-parameters of a new model (defaults: the paper's)."""
    d = AdapterConfig()
    g = p.add_argument_group("backbone")
    g.add_argument("--clip-model", default="ViT-L-14-336",
                   help="open_clip architecture name or JSON model config (default: ViT-L-14-336)")
    g.add_argument("--clip-weights", default="openai",
                   help="open_clip pretrained tag (default openai), local weight file (.pt/.safetensors), "
                        "or 'none' for random")
    g.add_argument("--image-size", type=int, default=518, help="input size; position embedding resized (default: 518)")
    g.add_argument("--quick-gelu", action="store_true", help="QuickGELU activation (released checkpoints use GELU)")
    a = p.add_argument_group("adapters")
    a.add_argument("--experts", type=int, default=d.num_experts)
    a.add_argument("--top-k", type=int, default=d.top_k)
    a.add_argument("--rank", type=int, default=d.rank)
    a.add_argument("--alpha", type=float, default=d.alpha)
    a.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    a.add_argument("--moe-layers", default=None, help="0-based blocks, comma list (default: quarter points of depth)")
    a.add_argument("--levels", default=None, help="1-based block outputs, comma list (default: quarter points)")
    a.add_argument("--image-adapt-weight", type=float, default=d.image_adapt_weight)
    a.add_argument("--no-fofs", action="store_true", help="plain trainable LoRA A (no FOFS)")
    a.add_argument("--no-paa", action="store_true", help="no patch average aggregation (4 maps instead of 12)")
    a.add_argument("--seg-proj", choices=["shared", "separate"], default=d.seg_proj)
    a.add_argument("--relu", action="store_true", help="LeakyReLU after the seg projections")
    a.add_argument("--etf-weight", type=float, default=d.etf_weight)
    a.add_argument("--balance-weight", type=float, default=d.balance_weight)
    a.add_argument("--released", action="store_true",
                   help="reproduce the released train.py: no ETF/balance losses, no LoRA dropout")


def _ints(text):
    return None if text in (None, "") else [int(x) for x in str(text).split(",") if x.strip()]


def model_config_from_args(args) -> ModelConfig:
    weights = None if str(args.clip_weights).lower() in ("none", "random", "") else args.clip_weights
    backbone = BackboneConfig(model=args.clip_model, pretrained=weights, image_size=args.image_size,
                              quick_gelu=args.quick_gelu)
    adapter = AdapterConfig(num_experts=args.experts, top_k=args.top_k, rank=args.rank, alpha=args.alpha,
                            lora_dropout=args.lora_dropout, moe_layers=_ints(args.moe_layers),
                            levels=_ints(args.levels), image_adapt_weight=args.image_adapt_weight,
                            fofs=not args.no_fofs, paa=not args.no_paa, seg_proj=args.seg_proj, relu=args.relu,
                            etf_weight=args.etf_weight, balance_weight=args.balance_weight,
                            released_training=args.released)
    return ModelConfig(backbone, adapter)


def register(sub) -> None:
    from ..engine.config import TrainConfig

    t = TrainConfig()
    p = sub.add_parser("train", help="train MoECLIP on auxiliary annotated data",
                       description="Train the adapters (the CLIP stays frozen). Defaults follow the official "
                                   "protocol: Adam 5e-5, betas (0.5, 0.999), MultiStepLR at 16k/32k iterations, "
                                   "batch 2, 20 epochs, seed 111, joint rotation/translation/flip augmentation.")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="training data (repeatable to mix datasets), e.g. VisA=/data/visa")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (checkpoint/, metrics.csv, ...)")
    p.add_argument("--val", action="append", default=[], metavar="NAME=PATH",
                   help="zero-shot validation data, evaluated after each epoch; the best checkpoint is kept in best/")
    p.add_argument("--descriptions", help="class -> object description file (JSON or 'class: text' lines)")
    add_architecture_args(p)
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=t.epochs)
    o.add_argument("--batch-size", type=int, default=t.batch_size)
    o.add_argument("--lr", type=float, default=t.lr, help="learning rate (released code 5e-5; the paper states 5e-4)")
    o.add_argument("--milestones", default=",".join(map(str, t.milestones)), help="LR drops (iterations)")
    o.add_argument("--gamma", type=float, default=t.gamma)
    o.add_argument("--seed", type=int, default=t.seed)
    o.add_argument("--grad-accum", type=int, default=t.grad_accum, help="gradient accumulation steps")
    o.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    o.add_argument("--no-augment", action="store_true", help="disable the joint geometric augmentation")
    o.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute in backward instead of storing: the frozen blocks after the first MoE layer, "
                        "the MoE adapters, the seg head and the full-resolution loss maps "
                        "(less memory, ~25-35%% slower)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto")
    r.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default), or autocast to bf16/fp16 (losses in fp32; the frozen CLIP weights are "
                        "stored in that dtype once, unless the checkpoints must store the CLIP itself)")
    r.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    r.add_argument("--include-backbone", action="store_true",
                   help="store the CLIP weights in the checkpoint (for random or custom backbones)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..engine import distributed as D
    from ..engine.sources import build_sources
    from ..engine.train import (
        TrainConfig,
        Trainer,
        check_resume_settings,
        prepare_run_dir,
        record_run_settings,
        run_settings,
    )
    from ..fileio import atomic_write_text
    from ..model.moeclip import MoECLIP
    from ..precision import resolve_device

    run_dir = Path(args.out)
    with D.session(resolve_device(args.device)) as device:
        if D.is_main():
            prepare_run_dir(run_dir, args.resume, args.overwrite)
        D.barrier()
        say = print if D.is_main() else (lambda *a, **k: None)
        sources = build_sources(args.data, descriptions=args.descriptions, report=say)
        val = build_sources(args.val, descriptions=args.descriptions, report=say) if args.val else []
        config = model_config_from_args(args)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          milestones=tuple(int(x) for x in args.milestones.split(",") if x.strip()),
                          gamma=args.gamma, seed=args.seed, precision=args.precision, grad_accum=args.grad_accum,
                          workers=args.workers, grad_checkpoint=args.grad_checkpoint, max_steps=args.max_steps,
                          augment=not args.no_augment,
                          include_backbone=args.include_backbone or config.backbone.pretrained is None)
        settings = run_settings(sources, config, cfg, val)
        if args.resume:
            from ..model.checkpoint import CLIP_WEIGHTS_FILE, read_checkpoint

            check_resume_settings(run_dir, settings, say)
            config, _, _ = read_checkpoint(run_dir / "checkpoint")
            if (run_dir / "checkpoint" / CLIP_WEIGHTS_FILE).is_file():
                # the CLIP lives inside the checkpoint that the next save replaces: store it again
                cfg = dataclasses.replace(cfg, include_backbone=True)
        elif D.is_main():
            record_run_settings(run_dir, settings)
        torch.manual_seed(args.seed)  # FOFS matrices and projection init
        model = MoECLIP.from_config(config).to(device)
        trainer = Trainer(model, sources, cfg, run_dir, device, val_sources=val)
        if args.resume:
            trainer.resume()
            say(f"resumed {run_dir} at epoch {trainer.epoch}, step {trainer.step}")
        n = len(trainer.dataset)
        n_params = sum(p.numel() for p in trainer.params)
        say(f"training on {n} images ({', '.join(s.name for s in sources)}), {n_params:,} "
            f"trainable parameters, {D.world_size()} process(es), device {device}")
        if D.is_main():
            atomic_write_text(run_dir / "train_args.json", json.dumps(vars(args), indent=2, default=str) + "\n")
        history = trainer.train()
        if history:
            last = history[max(history)]
            say(f"done: epoch {trainer.epoch}, step {trainer.step}, loss {last.get('loss', float('nan')):.4f}; "
                f"checkpoint in {run_dir / 'checkpoint'}")
        return 0
