"""``moeclip predict``: score image files, folders or globs; write maps, overlays and one JSON line per image.

Argument parsing only: the work is :mod:`moeclip.inference.pipeline` (inputs, decoding,
runtimes, post-processing, the output folder).

Output folder::

    DIR/results.jsonl        one line per image, appended and flushed as soon as it is scored
    DIR/maps/<name>.npy      raw anomaly map at the image's size, float32, before any normalisation
    DIR/overlays/<name>.png  heat map over the image (fixed colour scale, comparable across images)
    DIR/masks/<name>.png     binary mask (0/255), when a pixel threshold is known (--deploy)

``<name>`` is the file stem, made unique (``part``, ``part-2``, ...) when stems collide. A line
holds ``path``, ``name``, ``score`` (in [0, 1]), ``raw_score``, ``map_max``, ``object``,
``object_source`` (flag / class-map / deploy / onnx / generic), ``domain``, the written files,
``decision`` and ``threshold`` when a threshold is known, or ``error`` for a file that could not
be read (the run goes on). With ``--reference`` (few-shot) a line also holds ``references`` (K, 0
for an object without references), ``zero_shot_raw_score``, ``zero_shot_map_max``,
``zero_shot_score`` and ``few_shot_map_max``; ``score``, ``raw_score``, ``map_max`` and the map are
then the fused ones, in zero-shot raw units (``moeclip.model.fusion.fused_raw``: both maps
standardised by the bank's leave-one-out statistics, weighted, written back on the zero-shot scale).

With ``--transductive --scoring musc`` (training-free, no checkpoint) each object's images are scored as
one batch by MuSc (:mod:`moeclip.inference.transductive`): ``raw_score`` is the RsCIN image score, the map
MuSc's own, and each line adds ``transductive`` (the batch size N) and ``scoring`` ("musc").
With ``--transductive`` (``--scoring fused``, the default; needs ``--checkpoint``) each object's images are
one batch too (:mod:`moeclip.inference.fused`): the map is the zero-shot map fused with the mutual map (and
the few-shot map with ``--reference``), in zero-shot raw units, and each line keeps the zero-shot fields
(``zero_shot_raw_score``, ``zero_shot_map_max``, ``zero_shot_score``) and adds ``mutual_map_max``,
``transductive`` (N) and ``scoring`` ("fused").

Objects: ``--object DESC`` for every image; ``--object KEY=DESC`` (repeatable) and
``--class-map FILE`` (JSON ``{"KEY": "DESC"}`` or ``KEY: DESC`` lines) for mixed folders, where
KEY is a sub-folder name or a glob pattern matched against the path below the given folder
(first matching rule wins; unmatched images get ``--object DESC`` if given, else the generic
"object").
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MoECLIPError
from ..integrations.ray import add_ray_args
from . import openvino
from .common import add_bank_args, add_domain_arg, add_model_args, int_list, model_options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="score images: anomaly maps, scores, overlays, decisions",
        description="Score images for one object (or several, with --class-map). Writes "
                    "DIR/results.jsonl, DIR/maps/*.npy (raw maps), DIR/overlays/*.png and, with a "
                    "deployment file, DIR/masks/*.png and decisions.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|FOLDER|GLOB",
                   help="image files, folders (searched recursively) or glob patterns (quote them)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty, see --overwrite)")
    p.add_argument("--object", action="append", metavar="DESC | KEY=DESC",
                   help="object description for every image (e.g. 'metal nut'); KEY=DESC adds a "
                        "class-map rule (repeatable)")
    p.add_argument("--class-map", metavar="FILE",
                   help="JSON {\"KEY\": \"DESC\"} or 'KEY: DESC' lines; KEY is a sub-folder name or a glob")
    add_domain_arg(p, "blur size and image-score rule (default: the deployment's, else industrial)")
    p.add_argument("--deploy", metavar="FILE", help="deployment file from 'moeclip calibrate' "
                   "(threshold, normalisation, masks; also supplies --checkpoint and --object)")
    p.add_argument("--threshold", type=float, help="decision threshold on the score (overrides --deploy)")
    p.add_argument("--pixel-threshold", type=float, metavar="T",
                   help="raw map value for binary masks (overrides --deploy)")
    p.add_argument("--onnx", metavar="MODEL.onnx",
                   help="run an exported model with onnxruntime instead of PyTorch (object fixed by the export)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--workers", type=int, default=4, help="threads decoding images (default 4)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse larger images (decompression bombs; default about 179 Mpx)")
    p.add_argument("--no-maps", action="store_true", help="do not write maps/*.npy")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlays/*.png")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in DIR")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in DIR: skip images already in results.jsonl")
    fs = p.add_argument_group("few-shot (normal reference images; see README 'Few-shot')")
    fs.add_argument("--reference", action="append", default=[], metavar="DIR_OR_GLOB | KEY=DIR_OR_GLOB",
                    help="normal reference images of the object (folder, glob or file); KEY=... for the object "
                         "of an --object KEY=DESC / --class-map rule (repeatable)")
    add_bank_args(fs)
    add_transductive_args(p)
    add_model_args(p, checkpoint_required=False)
    add_ray_args(p)
    openvino.add_predict_args(p)
    p.set_defaults(func=run)


def add_transductive_args(p: argparse.ArgumentParser) -> None:
    tr = p.add_argument_group("transductive (the unlabeled batch itself; see README 'Transductive scoring (MuSc)')")
    tr.add_argument("--transductive", action="store_true",
                    help="score each image against the other images of the same object in this run (2 or more)")
    tr.add_argument("--scoring", choices=("fused", "musc"), default=None,
                    help="fused (default): the --checkpoint's zero-shot map + the mutual map (+ the few-shot map "
                         "with --reference), one calibrated fusion; musc: MuSc alone on the frozen CLIP tower, "
                         "training-free (no --checkpoint; --clip-model/--clip-weights/--image-size/--levels "
                         "choose the tower)")
    tr.add_argument("--mutual-tokens", choices=("adapted", "frozen", "seg"), default=None,
                    help="fused: the tokens the mutual score reads (default adapted: the MoE-adapted level tokens "
                         "of the zero-shot pass; frozen: a second pass of the frozen tower; seg: the 12 "
                         "segmentation features)")
    tr.add_argument("--mutual-weight", type=float, default=None, metavar="U",
                    help="fused: weight of the mutual map after standardisation, in [0, 1] (default 0.5)")
    tr.add_argument("--rscin", type=int_list, metavar="K,..",
                    help="RsCIN windows re-scoring the image scores (default 1,2,3; 0: map maximum as is)")
    tr.add_argument("--mutual-images", type=int, metavar="M",
                    help="compare each image with at most M others (default: all), drawn with --mutual-seed")
    tr.add_argument("--mutual-seed", type=int, default=0, metavar="S", help="which M others (default 0)")


def transductive_spec(args: argparse.Namespace):
    """The MuSc scorer's :class:`~moeclip.inference.transductive.MuScSpec` from the flags (with the checks)."""
    from ..inference.transductive import MuScSpec

    clashing = [flag for flag, given in (("--checkpoint", args.checkpoint), ("--deploy", args.deploy),
                                         ("--onnx", args.onnx), ("--openvino", getattr(args, "openvino", None)),
                                         ("--reference", args.reference), ("--ray", args.ray is not None),
                                         ("--pixel-threshold", args.pixel_threshold is not None)) if given]
    adapter = sorted(set(model_options(args)) - {"clip_model", "clip_weights", "image_size", "quick_gelu", "levels"})
    clashing += ["--" + name.replace("_", "-") for name in adapter]
    if clashing:
        raise MoECLIPError("--transductive --scoring musc is training-free on the frozen CLIP: "
                           f"drop {', '.join(clashing)}")
    if args.precision != "fp32":
        raise MoECLIPError("--transductive --scoring musc runs in fp32 (drop --precision)")
    return MuScSpec(clip_model=args.clip_model or "ViT-L-14-336",
                    clip_weights="openai" if args.clip_weights is None else args.clip_weights,
                    image_size=args.image_size or 518, quick_gelu=bool(args.quick_gelu), levels=args.levels,
                    windows=tuple(args.rscin or (1, 2, 3)), mutual_images=args.mutual_images, seed=args.mutual_seed,
                    device=args.device, batch_size=args.batch_size)


def transductive_jobs(args: argparse.Namespace, out: Path) -> list:
    """The inputs with their objects; refused before anything is written when no object has two images."""
    from ..inference.pipeline import ObjectRules, expand_inputs
    from ..inference.transductive import check_batch

    jobs = expand_inputs(args.inputs, exclude=out)
    if not jobs:
        raise MoECLIPError("no input images found")
    ObjectRules.from_args(args.object, args.class_map).assign(jobs)
    check_batch(jobs)
    return jobs


def run_transductive(args: argparse.Namespace) -> int:
    """``predict --transductive``: every object group of the inputs is one batch (moeclip.inference.transductive)."""
    from ..data.imageio import DEFAULT_MAX_PIXELS
    from ..inference.pipeline import ResultWriter
    from ..inference.transductive import MuScPostProcessor
    from ..inference.transductive import run_transductive as run_batches

    spec = transductive_spec(args)
    out = Path(args.out)
    jobs = transductive_jobs(args, out)
    scorer = spec.build()  # before the output folder: a bad model flag writes nothing
    writer = ResultWriter(out, overwrite=args.overwrite, resume=args.resume, maps=not args.no_maps,
                          overlays=not args.no_overlays, masks=False)
    post = MuScPostProcessor(domain=args.domain or "industrial", threshold=args.threshold)
    summary = run_batches(jobs, scorer, post, writer, workers=args.workers,
                          max_pixels=args.max_pixels if args.max_pixels is not None else DEFAULT_MAX_PIXELS)
    print(summary.line(post.threshold) + f" -> {writer.results}")
    return summary.exit_code


def run_fused(args: argparse.Namespace) -> int:
    """``predict --transductive`` (fused): the checkpoint's detector scores each object group as one batch."""
    from dataclasses import replace

    from ..data.imageio import DEFAULT_MAX_PIXELS
    from ..inference.fused import run_fused as run_batches
    from ..inference.pipeline import ResultWriter

    clashing = [flag for flag, given in (("--deploy", args.deploy), ("--onnx", args.onnx),
                                         ("--openvino", getattr(args, "openvino", None)),
                                         ("--ray", args.ray is not None), ("--rscin", args.rscin)) if given]
    if clashing:
        raise MoECLIPError(f"--transductive (fused) runs the --checkpoint's PyTorch model: drop {', '.join(clashing)} "
                           "(--scoring musc is the training-free mode)")
    if not args.checkpoint:
        raise MoECLIPError("--transductive (fused) needs --checkpoint; --scoring musc needs none")
    out = Path(args.out)
    jobs = transductive_jobs(args, out)
    mutual = {"tokens": args.mutual_tokens, "mutual_images": args.mutual_images, "mutual_seed": args.mutual_seed,
              "mutual_weight": args.mutual_weight, "batch_size": args.batch_size}
    built = replace(runtime_spec(args), transductive=mutual).build()  # before the output folder
    writer = ResultWriter(out, overwrite=args.overwrite, resume=args.resume, maps=not args.no_maps,
                          overlays=not args.no_overlays, masks=built.post.pixel_threshold is not None)
    summary = run_batches(jobs, built.runtime, built.post, writer, workers=args.workers,
                          max_pixels=args.max_pixels if args.max_pixels is not None else DEFAULT_MAX_PIXELS)
    print(summary.line(built.post.threshold) + f" -> {writer.results}")
    return summary.exit_code


def reference_pairs(args: argparse.Namespace):
    """``--reference`` values -> (object description, images) pairs; KEY names an --object/--class-map rule."""
    from ..inference.pipeline import ObjectRules
    plain, rules = ObjectRules.split(args.object)
    if args.class_map:
        from ..data.registry import load_descriptions

        rules.extend(load_descriptions(args.class_map).items())
    by_key = {k.casefold(): d for k, d in rules}
    pairs = []
    for value in args.reference:
        key, sep, spec = value.partition("=")
        if sep and key.strip() and not Path(value).exists():
            desc = by_key.get(key.strip().casefold())
            if desc is None and key.strip() not in [d for _, d in rules] + [plain]:
                raise MoECLIPError(f"--reference {value!r}: no --object {key.strip()}=DESC or --class-map rule "
                                   f"for {key.strip()!r}")
            pairs.append((desc or key.strip(), spec.strip()))
        else:
            pairs.append((plain or "", value))
    return tuple(pairs)


def runtime_spec(args: argparse.Namespace):
    """The :class:`~moeclip.inference.build.RuntimeSpec` from the parsed flags."""
    from ..inference.build import RuntimeSpec  # lazily: `moeclip --help` stays fast
    from ..inference.pipeline import ObjectRules

    plain, rules = ObjectRules.split(args.object)
    return RuntimeSpec(checkpoint=args.checkpoint, model_options=model_options(args), deploy=args.deploy,
                       onnx=args.onnx, device=args.device, precision=args.precision, threshold=args.threshold,
                       pixel_threshold=args.pixel_threshold, domain=args.domain, object=plain,
                       object_rules=bool(rules or args.class_map), openvino=getattr(args, "openvino", None),
                       references=reference_pairs(args), reference_weight=args.reference_weight,
                       bank_size=args.bank_size, bank_fp16=args.bank_fp16)


def run(args: argparse.Namespace) -> int:
    from ..data.imageio import DEFAULT_MAX_PIXELS
    from ..inference.pipeline import ObjectRules, ResultWriter, expand_inputs
    from ..inference.pipeline import run as run_pipeline

    if args.batch_size < 1 or args.workers < 1:
        raise MoECLIPError("--batch-size and --workers must be at least 1")
    if args.overwrite and args.resume:
        raise MoECLIPError("--overwrite and --resume exclude each other")
    if args.transductive:
        return run_transductive(args) if args.scoring == "musc" else run_fused(args)
    if args.scoring or args.rscin or args.mutual_images is not None or args.mutual_tokens or \
            args.mutual_weight is not None:
        raise MoECLIPError("--scoring, --rscin, --mutual-images, --mutual-tokens and --mutual-weight need "
                           "--transductive")
    if args.ray is not None:  # the same run on a Ray cluster: moeclip.integrations.ray
        from ..integrations.ray import predict_from_args

        return predict_from_args(args, runtime_spec(args))
    out = Path(args.out)
    jobs = expand_inputs(args.inputs, exclude=out)
    if not jobs:
        raise MoECLIPError("no input images found")
    built = runtime_spec(args).build()
    if args.onnx or getattr(args, "openvino", None):
        rules = ObjectRules(built.default_object, default_source=built.object_source)
    else:
        rules = ObjectRules.from_args(args.object, args.class_map, built.default_object, built.object_source)
    rules.assign(jobs)
    writer = ResultWriter(out, overwrite=args.overwrite, resume=args.resume, maps=not args.no_maps,
                          overlays=not args.no_overlays, masks=built.post.pixel_threshold is not None)
    summary = run_pipeline(jobs, built.runtime, built.post, writer, batch_size=args.batch_size,
                           workers=args.workers,
                           max_pixels=args.max_pixels if args.max_pixels is not None else DEFAULT_MAX_PIXELS)
    print(summary.line(built.post.threshold) + f" -> {writer.results}")
    return summary.exit_code
