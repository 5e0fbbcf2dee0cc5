"""Flags and loaders shared by every command that runs a model (predict, calibrate, serve, export, test, ...).

A model comes from one of two sources:

* our checkpoint directory (``config.json`` + ``adapters.safetensors``): it records every
  hyper-parameter, so no flag is needed; backbone flags (``--clip-model``, ``--clip-weights``,
  ``--image-size``, ``--quick-gelu``) replace the stored values (e.g. a local weight file on an
  offline machine) and adapter flags override stored inference-time settings (a warning says so;
  a change that does not fit the weights is a one-line error);
* an official ``.pth``/``.pt`` file, which holds only the adapter weights: the flags describe
  the backbone and the adapters, defaulting to the paper's values (ViT-L-14-336 ``openai`` at
  518 px, 4 experts, top-2, rank 8, alpha 16, FOFS and PAA on, shared seg projections).

Every model flag defaults to ``None`` so that "not given" is distinguishable from "given the
default value"; :func:`model_options` returns only the flags given, keyed by their option
names (``clip_model``, ``experts``, ...). The same dictionary is what a deployment file stores
to rebuild the model later (:func:`moeclip.model.options.build_model`, which builds it).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import MoECLIPError
from ..model.domain import Domain
from ..model.options import MODEL_OPTIONS, build_model

__all__ = ["DOMAINS", "PRECISIONS", "MODEL_OPTIONS", "add_model_args", "add_domain_arg", "add_precision_arg",
           "model_options", "build_model", "load_model_from_args", "detector_from_args", "refuse_existing",
           "progress", "int_list"]

log = logging.getLogger(__name__)

#: The valid --domain values (from the library's Domain).
DOMAINS = tuple(d.value for d in Domain)
#: The valid --precision values: the keys of moeclip.precision.PRECISIONS (that module imports
#: torch, which the CLI does not at start-up; a test keeps the two equal).
PRECISIONS = ("fp32", "bf16", "fp16")


def int_list(text: str) -> List[int]:
    """``"5,11,17,23"`` -> ``[5, 11, 17, 23]`` (argparse type)."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_model_args(parser: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    """Add ``--checkpoint``, the backbone/adapter flags for official checkpoints, ``--device`` and ``--precision``."""
    g = parser.add_argument_group("model", "our checkpoint directory, or an official .pth plus its hyper-parameters")
    g.add_argument("--checkpoint", required=checkpoint_required, metavar="CKPT",
                   help="checkpoint directory written by 'moeclip train' (or its config.json), "
                        "or an official MoECLIP .pth file")
    g.add_argument("--clip-model", metavar="NAME|JSON",
                   help="open_clip architecture (default ViT-L-14-336) or a JSON model config")
    g.add_argument("--clip-weights", metavar="TAG|FILE",
                   help="open_clip pretrained tag (default openai), a local weight file, or 'none' (random)")
    g.add_argument("--image-size", type=int, metavar="PX", help="input resolution (default 518)")
    g.add_argument("--quick-gelu", action="store_const", const=True, default=None,
                   help="QuickGELU activations (the released checkpoints use plain GELU)")
    g.add_argument("--experts", type=int, metavar="E", help="LoRA experts per MoE layer (default 4)")
    g.add_argument("--top-k", type=int, metavar="K", help="experts routed per token (default 2)")
    g.add_argument("--rank", type=int, metavar="R", help="LoRA rank (default 8)")
    g.add_argument("--alpha", type=float, help="LoRA alpha (default 16)")
    g.add_argument("--moe-layers", type=int_list, metavar="I,J,..",
                   help="0-based vision blocks followed by an MoE adapter (default: quarter points)")
    g.add_argument("--levels", type=int_list, metavar="I,J,..",
                   help="1-based block outputs used as feature levels (default: quarter points)")
    g.add_argument("--no-fofs", dest="fofs", action="store_const", const=False, default=None,
                   help="the checkpoint was trained without FOFS")
    g.add_argument("--no-paa", dest="paa", action="store_const", const=False, default=None,
                   help="no patch average aggregation (one map per level)")
    g.add_argument("--relu", action="store_const", const=True, default=None,
                   help="LeakyReLU after the seg projections")
    g.add_argument("--seg-proj", choices=("shared", "separate"),
                   help="one seg projection per level (shared, default) or per map (separate)")
    g.add_argument("--image-adapt-weight", type=float, metavar="W",
                   help="weight of the MoE output in the residual mix (default 0.1)")
    r = parser.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps")
    add_precision_arg(r)


def add_precision_arg(parser, help: Optional[str] = None) -> None:
    """``--precision`` with the valid values of :data:`PRECISIONS` (default fp32)."""
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help=help or (
        "fp32 (default), or autocast to bf16/fp16; the frozen CLIP weights are then stored in that dtype once "
        "(same results as plain autocast, no re-cast per batch, half their memory)"))


def add_domain_arg(parser, help: str, default: Optional[str] = None) -> None:
    """``--domain`` with the valid values of :data:`DOMAINS`."""
    parser.add_argument("--domain", choices=DOMAINS, default=default, help=help)


def add_bank_args(group, banks: str = "the memory banks") -> None:
    """``--reference-weight``, ``--bank-size``, ``--bank-fp16``: how few-shot memory banks are built and fused."""
    group.add_argument("--reference-weight", type=float, default=0.5, metavar="W",
                       help="relative weight of the few-shot map in the fused map, after both maps are "
                            "standardised by their normal statistics (0: zero-shot map only; default 0.5)")
    group.add_argument("--bank-size", type=int, metavar="N", help="greedy-coreset subsample of each map's bank")
    group.add_argument("--bank-fp16", action="store_true", help=f"store {banks} in fp16")


def model_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The model flags the user gave (``None`` = not given), keyed by option name."""
    return {name: getattr(args, name) for name in MODEL_OPTIONS if getattr(args, name, None) is not None}


def load_model_from_args(args: argparse.Namespace):
    """:func:`build_model` from parsed :func:`add_model_args` flags."""
    return build_model(args.checkpoint, model_options(args))


def detector_from_args(args: argparse.Namespace, **detector_kwargs):
    """A :class:`~moeclip.inference.detector.Detector` on ``--device`` at ``--precision``.

    ``detector_kwargs`` go to the Detector (``domain``, ``normalization``, ``threshold``,
    ``object``); ``domain`` defaults to ``args.domain`` when the command has that flag.
    """
    from ..inference.detector import Detector

    if getattr(args, "domain", None) and "domain" not in detector_kwargs:
        detector_kwargs["domain"] = args.domain
    model = load_model_from_args(args)
    return Detector(model, device=getattr(args, "device", "auto"), precision=getattr(args, "precision", "fp32"),
                    **detector_kwargs)


# ---------------------------------------------------------------------------- export (every format)
def add_source_args(o: argparse.ArgumentParser, metavar: str, help: Optional[str] = None) -> None:
    """``--out``, then what is exported: ``--object``, ``--domain``, ``--deploy`` (every export format)."""
    o.add_argument("--out", required=True, metavar=metavar, help=help)
    o.add_argument("--object", help="object description (default: the deployment's, else 'object')")
    add_domain_arg(o, "default: the deployment's, else industrial")
    o.add_argument("--deploy", metavar="FILE", help="deployment file to embed (and its checkpoint and object)")


def add_check_args(o: argparse.ArgumentParser, engine: str, out_kind: str) -> None:
    """``--no-check``, ``--overwrite`` and the model flags (every export format)."""
    o.add_argument("--no-check", action="store_true", help=f"skip the {engine}-vs-PyTorch comparison")
    o.add_argument("--overwrite", action="store_true", help=f"replace an existing --out {out_kind}")
    add_model_args(o, checkpoint_required=False)


def export_source(args: argparse.Namespace) -> Tuple[Any, Any, Optional[str]]:
    """The fp32 CPU detector to export, the deployment to embed (or None) and the checkpoint to record."""
    from ..inference.deploy import Deployment
    from ..inference.detector import Detector

    dep = Deployment.load(args.deploy) if args.deploy else None
    if dep is not None:
        if args.object and args.object.strip() != dep.object:
            raise MoECLIPError(f"the deployment was calibrated for {dep.object!r}, not {args.object!r}")
        detector = Detector.from_deployment(dep, checkpoint=args.checkpoint, options=model_options(args),
                                            device="cpu", domain=args.domain)
        return detector, dep, args.checkpoint or dep.checkpoint
    if not args.checkpoint:
        raise MoECLIPError("--checkpoint is required (or --deploy FILE)")
    detector = Detector(load_model_from_args(args), device="cpu", domain=args.domain or "industrial",
                        object=args.object)
    return detector, None, str(Path(args.checkpoint).resolve())


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Raise unless ``path`` is absent or ``overwrite`` is set (one-line error naming the flag)."""
    if path.exists() and not overwrite:
        raise MoECLIPError(f"{path} already exists (use --overwrite to replace it)")


def progress(iterable=None, **kwargs):
    """tqdm on stderr, hidden when stderr is not a terminal unless forced with ``disable=False``."""
    from tqdm import tqdm

    kwargs.setdefault("disable", not sys.stderr.isatty())
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
