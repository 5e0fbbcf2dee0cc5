"""``moeclip datasets``: list the known benchmarks, scan a dataset folder, make synthetic data.

``scan`` is the first thing to run on a new download: it finds the dataset root, prints the
per-class counts to compare with the paper, lists every problem (missing masks, stray files),
and can write the official JSONL manifest used by ``train``/``test``.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import List, Sequence

from ..errors import MoECLIPError

_DATA_HELP = ("NAME=PATH: a known dataset (e.g. MVTec=/data/mvtec, any alias, see "
              "'moeclip datasets list'), or a generic format: folder=DIR (MVTec-style tree), "
              "jsonl=FILE[@ROOT] (official manifest), meta=FILE[@ROOT] (AdaCLIP/AnomalyCLIP "
              "meta.json); add :NAME to tag a generic source, e.g. jsonl:MVTec=FILE@/data/mvtec")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "datasets", help="list benchmarks, check a dataset folder, write manifests",
        description="Inspect datasets: 'list' the known benchmarks, 'scan' a folder.")
    parser.set_defaults(func=_no_action, _datasets_parser=parser)
    sub = parser.add_subparsers(dest="datasets_command", metavar="ACTION")

    p_list = sub.add_parser("list", help="known datasets with domain and class count")
    p_list.add_argument("--benchmarks-only", action="store_true",
                        help="only the 14 benchmarks of the paper")
    p_list.set_defaults(func=run_list)

    p_scan = sub.add_parser("scan", help="scan a dataset, print counts and problems",
                            description="Scan a dataset folder (or manifest), print per-class "
                                        "counts and problems; optionally write the official JSONL.")
    p_scan.add_argument("--data", required=True, metavar="NAME=PATH", help=_DATA_HELP)
    p_scan.add_argument("--out", metavar="FILE.jsonl",
                        help="write the official JSONL manifest (paths relative to the dataset root)")
    p_scan.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p_scan.add_argument("--strict", action="store_true",
                        help="treat every problem as an error (exit code 2, nothing written)")
    p_scan.add_argument("--max-problems", type=int, default=20, metavar="N",
                        help="problems to print (default 20; 0 = all)")
    p_scan.set_defaults(func=run_scan)

    _register_synth(sub)


def _register_synth(sub) -> None:
    """``datasets synth``: its options are defined next to the generator, in moeclip.data.synth."""
    from ..data.synth import add_synth_arguments

    p_synth = sub.add_parser("synth", help="generate a small synthetic anomaly dataset")
    add_synth_arguments(p_synth)
    p_synth.set_defaults(func=run_synth)


def run_synth(args) -> int:
    from ..data.synth import run_synth as synth

    return int(synth(args) or 0)


def _no_action(args) -> int:
    args._datasets_parser.print_help()
    return 2


# --------------------------------------------------------------------------- output helpers


def _table(headers: Sequence[str], rows: Sequence[Sequence], right: Sequence[bool]) -> str:
    """Plain fixed-width table (no dependency, copy-pasteable into issues)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row):
        return "  ".join(c.rjust(w) if r else c.ljust(w)
                         for c, w, r in zip(row, widths, right)).rstrip()

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in cells[1:]]
    return "\n".join(lines)


def count_rows(samples) -> List[list]:
    """Per reporting group (class, or texture folder for DTD): normal, anomalous, with mask,
    anomalous without mask; plus a total row."""
    groups: "OrderedDict[str, list]" = OrderedDict()
    for s in samples:
        row = groups.setdefault(s.group, [s.group, 0, 0, 0, 0])
        if s.label:
            row[2] += 1
            row[3 if s.mask_path else 4] += 1
        else:
            row[1] += 1
    rows = list(groups.values())
    total = ["total"] + [sum(r[i] for r in rows) for i in range(1, 5)]
    return rows + [total]


# --------------------------------------------------------------------------- actions


def run_list(args) -> int:
    from ..data.registry import list_datasets

    rows = []
    for spec in list_datasets(benchmarks_only=args.benchmarks_only):
        rows.append([spec.key, spec.display_name, spec.domain, len(spec.class_names),
                     "yes" if spec.has_masks else "no", "paper" if spec.benchmark else "extra",
                     ", ".join(spec.aliases)])
    print(_table(["key", "name", "domain", "classes", "masks", "set", "aliases"], rows,
                 [False, False, False, True, False, False, False]))
    return 0


def run_scan(args) -> int:
    from ..data.manifest import write_jsonl
    from ..data.registry import DataFormat, parse_data_arg
    from ..data.scanners import load_data

    source, path = parse_data_arg(args.data)
    if args.max_problems < 0:
        raise MoECLIPError("--max-problems must be >= 0")
    if args.out and os.path.exists(args.out) and not args.overwrite:
        # Fail before a possibly long scan; write_jsonl checks again when writing.
        raise MoECLIPError(f"{args.out}: already exists; pass --overwrite to replace it")
    result = load_data((source, path), strict=args.strict)
    name = (source.dataset.display_name if source.dataset else source.name) \
        if isinstance(source, DataFormat) else source.display_name
    print(f"{name}: {len(result.samples)} images under {result.root}")
    if result.samples:
        print(_table(["class", "normal", "anomalous", "with mask", "without mask"],
                     count_rows(result.samples), [False, True, True, True, True]))
    if result.problems:
        limit = args.max_problems or len(result.problems)
        print(f"\n{len(result.problems)} problem(s):")
        for line in result.problems[:limit]:
            print(f"  {line}")
        if len(result.problems) > limit:
            print(f"  ... and {len(result.problems) - limit} more (--max-problems 0 shows all)")
    else:
        print("\nno problems found")
    if args.out:
        if not result.samples:
            raise MoECLIPError(f"{args.out}: nothing to write, the scan found no images")
        n = write_jsonl(result.samples, args.out, root=result.root, overwrite=args.overwrite)
        print(f"\nwrote {n} records to {args.out} (paths relative to {result.root})")
    return 0
