"""``moeclip convert``: an official ``.pth`` checkpoint -> our safetensors + JSON format."""
from __future__ import annotations

from pathlib import Path

from .train import add_architecture_args, model_config_from_args


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert an official MoECLIP .pth checkpoint to our format",
                       description="Reads the official {epoch, text_adapter, image_adapter} file with "
                                   "torch.load(weights_only=True), checks every shape against the given "
                                   "hyper-parameters, and writes config.json + adapters.safetensors.")
    p.add_argument("checkpoint", help="official .pth file")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true")
    add_architecture_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    from ..model.backbone import create_clip
    from ..model.checkpoint import read_official, save_checkpoint
    from ..model.moeclip import MoECLIP, tokenizer_for

    config = model_config_from_args(args)
    official = read_official(args.checkpoint)
    # the architecture alone fixes every adapter shape: no need to load (or download) CLIP weights
    clip = create_clip(dataclasses.replace(config.backbone, pretrained=None))
    model = MoECLIP(clip, config.adapter, tokenizer_for(config.backbone.model), config.backbone)
    model.load_adapter_state_dict(official["state"], str(args.checkpoint))
    out = save_checkpoint(model, Path(args.out), overwrite=args.overwrite,
                          meta={"converted_from": str(args.checkpoint), "epoch": official["epoch"]})
    print(f"wrote {out} (epoch {official['epoch']}, backbone {config.backbone.model} / {config.backbone.pretrained})")
    return 0
