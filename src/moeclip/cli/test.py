"""``moeclip test``: zero-shot evaluation with the official rule, per class and per dataset."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .common import add_bank_args, add_model_args, load_model_from_args


def register(sub) -> None:
    p = sub.add_parser("test", help="zero-shot evaluation of a checkpoint on benchmark or custom data",
                       description="Evaluate class by class: per-class min-max normalisation, domain-dependent "
                                   "image score; pixel AUROC/AP/AUPRO/F1-max and image AUROC/AP/F1-max.")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="evaluation data (repeatable), e.g. MVTec=/data/mvtec, folder=/data/mine")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="writes results.json, results.csv, results.md (the printed table; and maps, overlays)")
    p.add_argument("--descriptions", help="class -> object description file (JSON or 'class: text' lines)")
    p.add_argument("--fix-typos", action="store_true", help="use corrected prompts (e.g. MVTec capsule)")
    p.add_argument("--domain", choices=["industrial", "medical"], help="override the dataset's domain")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--save-maps", action="store_true", help="write raw anomaly maps (.npy, evaluation resolution)")
    p.add_argument("--visualize", action="store_true", help="write heat-map overlays (image | map | ground truth)")
    p.add_argument("--report", action="store_true", help="write an HTML report (curves, failures, histograms)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images and list them")
    p.add_argument("--overwrite", action="store_true", help="replace results in a non-empty --out")
    fs = p.add_argument_group("few-shot (k-shot protocol; see README 'Few-shot')")
    fs.add_argument("--shots", type=int, metavar="K",
                    help="per class, K normal references drawn from its training normals (<class>/train/good)")
    fs.add_argument("--shot-seeds", default="0", metavar="LIST",
                    help="comma-separated seeds; one draw and one evaluation per seed, then mean +- std (default 0)")
    fs.add_argument("--reference-data", action="append", default=[], metavar="NAME=PATH",
                    help="references for --data NAME from PATH/<class>/ (or PATH itself for one class, or a glob) "
                         "instead of the training normals; without --shots all of them are used")
    add_bank_args(fs)
    add_transductive_args(p)
    add_model_args(p)
    p.set_defaults(func=run)


def add_transductive_args(p) -> None:
    tr = p.add_argument_group("transductive (MuSc's protocol; see README 'Transductive scoring')")
    tr.add_argument("--transductive", action="store_true",
                    help="per class, the class's whole test split is one batch: zero-shot + mutual (+ few-shot "
                         "with --shots) maps fused")
    tr.add_argument("--mutual-tokens", choices=("adapted", "frozen", "seg"), default=None,
                    help="tokens the mutual score reads (default adapted)")
    tr.add_argument("--mutual-images", type=int, metavar="M", help="compare each image with at most M others")
    tr.add_argument("--mutual-seed", type=int, default=0, metavar="S", help="which M others (default 0)")
    tr.add_argument("--mutual-weight", type=float, default=None, metavar="U",
                    help="weight of the mutual map after standardisation (default 0.5)")


def transductive_plan(args):
    """``--transductive`` and its options -> :class:`moeclip.engine.evaluate.Transductive` (None without it)."""
    from ..errors import MoECLIPError

    if not args.transductive:
        if args.mutual_tokens or args.mutual_images is not None or args.mutual_weight is not None:
            raise MoECLIPError("--mutual-tokens, --mutual-images and --mutual-weight need --transductive")
        return None
    from ..engine.evaluate import Transductive
    from ..model.fused import DEFAULT_MUTUAL_TOKENS, DEFAULT_MUTUAL_WEIGHT, MutualOptions

    return Transductive(MutualOptions(args.mutual_tokens or DEFAULT_MUTUAL_TOKENS, args.mutual_images,
                                      args.mutual_seed,
                                      DEFAULT_MUTUAL_WEIGHT if args.mutual_weight is None else args.mutual_weight))


def _plan_doc(plan):
    from dataclasses import asdict

    return None if plan is None else asdict(plan.options)


def _map_writer(out: Path, args):
    """Per-batch callback writing raw maps (.npy) and/or overlays under ``out``."""
    import numpy as np

    from ..analysis import overlay
    from ..fileio import atomic_open

    def write(source, group, batch, amap, score):
        sub = Path(_safe(source.name)) / _safe(group)
        for i, path in enumerate(batch["path"]):
            stem = f"{Path(path).parent.name}_{Path(path).stem}"
            if args.save_maps:
                (out / "maps" / sub).mkdir(parents=True, exist_ok=True)
                with atomic_open(out / "maps" / sub / f"{stem}.npy") as fh:
                    np.save(fh, amap[i].numpy().astype(np.float32))
            if args.visualize:
                (out / "overlays" / sub).mkdir(parents=True, exist_ok=True)
                overlay.save_triptych(path, amap[i].numpy(), batch["mask"][i, 0].numpy(),
                                      out / "overlays" / sub / f"{stem}.png")

    return write


def _safe(name: str) -> str:
    """A path component that cannot leave the output folder."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "data"


def run(args) -> int:
    from ..engine import distributed as D
    from ..precision import resolve_device

    with D.session(resolve_device(args.device)) as device:
        return _run(args, Path(args.out), device)


def _run(args, out: Path, device) -> int:
    from ..engine import distributed as D
    from ..engine.evaluate import METRIC_KEYS, evaluate_source, format_table
    from ..engine.sources import build_sources
    from ..errors import MoECLIPError
    from ..fileio import atomic_write_text

    if D.is_main():
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise MoECLIPError(f"{out}: output directory is not empty (use --overwrite)")
        out.mkdir(parents=True, exist_ok=True)
    D.barrier()
    plan = transductive_plan(args)
    sources = build_sources(args.data, descriptions=args.descriptions, fix_typos=args.fix_typos, domain=args.domain)
    model = load_model_from_args(args).to(device).cast_frozen_weights(args.precision)
    size = model.config.backbone.image_size

    if args.shots is not None or args.reference_data:
        return _run_few_shot(args, out, device, model, sources, plan)
    writer = _map_writer(out, args) if (args.save_maps or args.visualize) else None

    results = []
    for source in sources:
        res = evaluate_source(model, source, image_size=size, device=device, precision=args.precision,
                              batch_size=args.batch_size, workers=args.workers, skip_bad=args.skip_bad,
                              keep_maps=args.report, on_batch=writer, transductive=plan)
        results.append(res)
    if not D.is_main():
        return 0
    for res in results:
        for path, reason in res.skipped:
            print(f"skipped {path}: {reason}")

    doc = {"checkpoint": str(args.checkpoint), "config": model.config.to_dict(), "transductive": _plan_doc(plan),
           "datasets": [{"name": r.source, "domain": r.domain, "per_class": r.per_class, "average": r.average,
                         "skipped": [list(s) for s in r.skipped]} for r in results]}
    atomic_write_text(out / "results.json", json.dumps(doc, indent=2) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "class", *METRIC_KEYS])
    for r in results:
        for name, m in list(r.per_class.items()) + [("average", r.average)]:
            w.writerow([r.source, name] + ["" if m.get(k) is None else f"{m[k]:.6f}" for k in METRIC_KEYS])
    atomic_write_text(out / "results.csv", buf.getvalue())
    if args.report:
        from ..analysis.report import report_from_eval

        report = report_from_eval(out, results, model.config.to_dict())
        print(f"report: {report}")
    table = format_table(results)
    atomic_write_text(out / "results.md", table + "\n")
    print(table)
    print(f"\nresults written to {out / 'results.json'}, {out / 'results.csv'} and {out / 'results.md'}")
    return 0


def _run_few_shot(args, out: Path, device, model, sources, plan=None) -> int:
    """``--shots`` / ``--reference-data``: the k-shot protocol, per seed and mean +- std."""
    from ..engine import distributed as D
    from ..engine.evaluate import METRIC_KEYS, format_table_seeds
    from ..engine.kshot import evaluate_k_shot, match_reference_data, parse_seeds
    from ..fileio import atomic_write_text

    seeds = parse_seeds(args.shot_seeds) if args.shots is not None else [0]
    user = match_reference_data(args.reference_data, sources, args.data)
    size = model.config.backbone.image_size

    def writer_for(seed):
        return _map_writer(out / f"seed{seed}", args) if (args.save_maps or args.visualize) else None

    results = [evaluate_k_shot(model, src, shots=args.shots, seeds=seeds, user_path=user.get(i),
                               weight=args.reference_weight, bank_size=args.bank_size, bank_fp16=args.bank_fp16,
                               on_batch_for=writer_for, keep_maps_first=args.report, image_size=size, device=device,
                               precision=args.precision, batch_size=args.batch_size, workers=args.workers,
                               skip_bad=args.skip_bad, transductive=plan)
               for i, src in enumerate(sources)]
    if not D.is_main():
        return 0
    few = {"shots": args.shots, "seeds": seeds, "reference_weight": args.reference_weight,
           "bank_size": args.bank_size, "bank_fp16": args.bank_fp16,
           "reference_data": list(args.reference_data)}
    doc = {"checkpoint": str(args.checkpoint), "config": model.config.to_dict(), "few_shot": few,
           "transductive": _plan_doc(plan),
           "datasets": [{"name": r.source, "domain": r.domain, **r.stats,
                         "per_seed": [{"seed": s, "per_class": e.per_class, "average": e.average,
                                       "references": e.references, "skipped": [list(x) for x in e.skipped]}
                                      for s, e in zip(r.seeds, r.per_seed)]} for r in results]}
    atomic_write_text(out / "results.json", json.dumps(doc, indent=2) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "class", "seed", *METRIC_KEYS])

    def row(source, name, seed, m):
        w.writerow([source, name, seed] + ["" if m.get(k) is None else f"{m[k]:.6f}" for k in METRIC_KEYS])

    for r in results:
        for s, e in zip(r.seeds, r.per_seed):
            for name, m in list(e.per_class.items()) + [("average", e.average)]:
                row(r.source, name, s, m)
        for name in list(r.stats["per_class"]) + ["average"]:
            mean = r.stats["average"] if name == "average" else r.stats["per_class"][name]
            std = r.stats["average_std"] if name == "average" else r.stats["per_class_std"][name]
            row(r.source, name, "mean", mean)
            row(r.source, name, "std", std)
    atomic_write_text(out / "results.csv", buf.getvalue())
    if args.report:
        from ..analysis.report import report_from_eval

        print(f"report (seed {seeds[0]}): {report_from_eval(out, [r.per_seed[0] for r in results], doc['config'])}")
    k = "all" if args.shots is None else args.shots
    head = f"few-shot: {k} reference(s) per class, seeds {','.join(map(str, seeds))}; mean ± std over seeds"
    table = format_table_seeds([(r.source, r.stats) for r in results])
    atomic_write_text(out / "results.md", f"{head}\n\n{table}\n")
    print(head)
    print(table)
    print(f"\nresults written to {out / 'results.json'}, {out / 'results.csv'} and {out / 'results.md'}")
    return 0
