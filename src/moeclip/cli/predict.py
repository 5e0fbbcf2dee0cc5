"""``moeclip predict``: score image files, folders or globs; write maps, overlays and one JSON line per image.

Output folder::

    DIR/results.jsonl        one line per image, appended and flushed as soon as it is scored
    DIR/maps/<name>.npy      raw anomaly map at the image's size, float32, before any normalisation
    DIR/overlays/<name>.png  heat map over the image (fixed colour scale, comparable across images)
    DIR/masks/<name>.png     binary mask (0/255), when a pixel threshold is known (--deploy)

``<name>`` is the file stem, made unique (``part``, ``part-2``, ...) when stems collide. A line
holds ``path``, ``name``, ``score`` (in [0, 1]), ``raw_score``, ``map_max``, ``object``,
``object_source`` (flag / class-map / deploy / onnx / generic), ``domain``, the written files,
``decision`` and ``threshold`` when a threshold is known, or ``error`` for a file that could not
be read (the run goes on).

Objects: ``--object DESC`` for every image; ``--object KEY=DESC`` (repeatable) and
``--class-map FILE`` (JSON ``{"KEY": "DESC"}`` or ``KEY: DESC`` lines) for mixed folders, where
KEY is a sub-folder name or a glob pattern matched against the path below the given folder
(first matching rule wins; unmatched images get ``--object DESC`` if given, else the generic
"object").
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, is_dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import MoECLIPError
from ..model.prompts import GENERIC_OBJECT
from . import openvino
from .common import add_model_args, model_options, progress

RESULTS_FILE = "results.jsonl"
OUTPUT_DIRS = ("maps", "overlays", "masks")
#: Lower-case file suffixes taken from folders and globs (as the dataset scanners).
IMAGE_EXTENSIONS = frozenset({".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"})


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
    p.add_argument("--domain", choices=("industrial", "medical"),
                   help="blur size and image-score rule (default: the deployment's, else industrial)")
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
    add_model_args(p, checkpoint_required=False)
    openvino.add_predict_args(p)
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------- inputs
@dataclass
class Job:
    path: Path
    root: Path          # the folder given on the command line (or the file's folder)
    object: str = GENERIC_OBJECT
    source: str = "generic"


def _visible_files(folder: Path, exclude: Optional[Path]) -> List[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or (here / d).resolve() != exclude))
        out.extend(here / f for f in sorted(filenames)
                   if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
    return out


def expand_inputs(specs: Sequence[str], exclude: Optional[Path] = None) -> List[Job]:
    """Files, folders (recursive, image suffixes only) and globs -> jobs, first occurrence kept.

    ``exclude`` (the output folder) is skipped so a rerun does not score its own overlays. A
    named file that does not exist is kept: it becomes an ``error`` line.
    """
    exclude = exclude.resolve() if exclude is not None else None
    jobs: List[Job] = []
    seen = set()

    def add(path: Path, root: Path) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            jobs.append(Job(path, root))

    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            for f in _visible_files(p, exclude):
                add(f, p)
        elif p.exists() or not glob.has_magic(spec):
            add(p, p.parent)
        else:
            fixed = []
            for part in p.parts:
                if glob.has_magic(part):
                    break
                fixed.append(part)
            base = Path(*fixed) if fixed else Path(".")
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file() and Path(m).suffix.lower() in IMAGE_EXTENSIONS]
            if not files:
                print(f"warning: {spec!r} matches no image file", file=sys.stderr)
            for f in files:
                if exclude is None or exclude not in f.resolve().parents:
                    add(f, base)
    return jobs


class ObjectRules:
    """Which object description each image gets (see the module docstring)."""

    def __init__(self, default: Optional[str] = None, rules: Sequence[Tuple[str, str]] = (),
                 default_source: str = "flag"):
        self.default = default
        self.default_source = default_source
        self.rules = list(rules)

    @classmethod
    def from_args(cls, objects: Optional[Sequence[str]], class_map: Optional[str],
                  fallback: Optional[str] = None, fallback_source: str = "deploy") -> "ObjectRules":
        default, rules = None, []
        for value in objects or []:
            key, sep, desc = value.partition("=")
            if sep:
                if not key.strip() or not desc.strip():
                    raise MoECLIPError(f"--object {value!r}: expected DESC or KEY=DESC")
                rules.append((key.strip(), desc.strip()))
            elif default is not None:
                raise MoECLIPError(f"--object given twice as a plain description ({default!r}, {value!r}); "
                                   "use KEY=DESC or --class-map for mixed folders")
            elif not value.strip():
                raise MoECLIPError("--object: empty description")
            else:
                default = value.strip()
        if class_map:
            from ..data.registry import load_descriptions

            rules.extend(load_descriptions(class_map).items())
        if default is None and fallback:
            return cls(fallback, rules, fallback_source)
        return cls(default, rules)

    def resolve(self, path: Path, root: Path) -> Tuple[str, str]:
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            rel = path.name
        folders = [root.name.casefold()] + [d.casefold() for d in rel.split("/")[:-1]]
        for key, desc in self.rules:
            if glob.has_magic(key) or "/" in key:
                if fnmatch(rel, key) or fnmatch(path.as_posix(), key) or fnmatch(path.name, key):
                    return desc, "class-map"
            elif key.casefold() in folders:
                return desc, "class-map"
        if self.default:
            return self.default, self.default_source
        return GENERIC_OBJECT, "generic"


# ---------------------------------------------------------------------------- outputs
class ResultWriter:
    """Writes the output folder; each result line is flushed as soon as its files exist."""

    def __init__(self, out: Path, overwrite: bool = False, resume: bool = False, maps: bool = True,
                 overlays: bool = True, masks: bool = False):
        self.out = Path(out)
        self.results = self.out / RESULTS_FILE
        self.maps, self.overlays, self.masks = maps, overlays, masks
        self.names: set = set()
        self.done: set = set()
        if self.out.exists() and not self.out.is_dir():
            raise MoECLIPError(f"--out {self.out}: exists and is not a folder")
        if self.out.is_dir() and any(self.out.iterdir()):
            if resume:
                self._load_previous()
            elif overwrite:
                self.results.unlink(missing_ok=True)
                for d in OUTPUT_DIRS:
                    shutil.rmtree(self.out / d, ignore_errors=True)
            else:
                raise MoECLIPError(f"--out {self.out}: folder is not empty (use --overwrite to replace "
                                   "earlier results or --resume to continue them)")
        for d, on in zip(OUTPUT_DIRS, (maps, overlays, masks)):
            if on:
                (self.out / d).mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.results, "a", encoding="utf-8")

    def _load_previous(self) -> None:
        """Read a previous run's lines; a last line cut by a crash is dropped from the file."""
        if not self.results.is_file():
            return
        data = self.results.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            with open(self.results, "r+b") as fh:
                fh.truncate(len(data))
        for line in data.decode("utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.done.add(os.path.abspath(rec.get("path", "")))
            if rec.get("name"):
                self.names.add(rec["name"].casefold())

    def is_done(self, path: Path) -> bool:
        return os.path.abspath(path) in self.done

    def unique_name(self, path: Path) -> str:
        stem = path.stem or "image"
        name, n = stem, 1
        while name.casefold() in self.names:  # case-insensitive: safe on macOS/Windows file systems
            n += 1
            name = f"{stem}-{n}"
        self.names.add(name.casefold())
        return name

    def _emit(self, record: Dict[str, Any]) -> None:
        self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.fh.flush()

    def write_error(self, job: Job, error: str) -> None:
        self._emit({"path": str(job.path), "object": job.object, "object_source": job.source, "error": error})

    def write(self, job: Job, pred, image, unit: np.ndarray, threshold: Optional[float],
              pixel_threshold: Optional[float]) -> Dict[str, Any]:
        """Write the files of one prediction, then its line (so a line implies its files exist)."""
        from ..inference.deploy import mask_image, overlay, save_png

        name = self.unique_name(job.path)
        rec: Dict[str, Any] = {
            "path": str(job.path), "name": name, "score": pred.score, "raw_score": pred.raw_score,
            "map_max": pred.map_max, "object": pred.object, "object_source": job.source, "domain": pred.domain,
            "width": image.width, "height": image.height,
        }
        if pred.decision is not None:
            rec["decision"] = pred.decision
            rec["threshold"] = threshold
        if self.maps:
            target = self.out / "maps" / f"{name}.npy"
            tmp = target.with_name(f".{target.name}.tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, np.asarray(pred.anomaly_map, dtype=np.float32))
            os.replace(tmp, target)
            rec["map"] = f"maps/{name}.npy"
        if self.overlays:
            save_png(overlay(image, unit), self.out / "overlays" / f"{name}.png")
            rec["overlay"] = f"overlays/{name}.png"
        if self.masks and pixel_threshold is not None:
            save_png(mask_image(pred.anomaly_map, pixel_threshold), self.out / "masks" / f"{name}.png")
            rec["mask"] = f"masks/{name}.png"
            rec["pixel_threshold"] = pixel_threshold
        self._emit(rec)
        return rec

    def close(self) -> None:
        self.fh.flush()
        try:
            os.fsync(self.fh.fileno())
        except OSError:
            pass
        self.fh.close()


# ---------------------------------------------------------------------------- runners
class _Runner:
    """What turns PIL images + an object into predictions (PyTorch detector or ONNX session)."""

    num_maps: int
    normalization: Optional[Dict[str, float]]
    threshold: Optional[float]
    pixel_threshold: Optional[float]

    def __call__(self, images, object: str, domain: str):  # pragma: no cover - interface
        raise NotImplementedError


class _TorchRunner(_Runner):
    def __init__(self, detector, pixel_threshold: Optional[float]):
        self.detector = detector
        self.num_maps = detector.num_maps
        n = detector.normalization
        self.normalization = asdict(n) if n is not None and is_dataclass(n) else None
        self.threshold = detector.threshold
        self.pixel_threshold = pixel_threshold

    def __call__(self, images, object, domain):
        return self.detector.predict(images, object=object, domain=domain, batch_size=max(1, len(images)))


class _OnnxRunner(_Runner):
    def __init__(self, detector):
        self.detector = detector
        self.num_maps = detector.num_maps
        self.normalization = detector.normalization
        self.threshold = detector.threshold
        self.pixel_threshold = detector.pixel_threshold

    def __call__(self, images, object, domain):
        return self.detector.predict(images, batch_size=max(1, len(images)))


def _build_runner(args) -> Tuple[_Runner, Optional[str], Optional[str], str]:
    """(runner, default object, domain, object source of the default)."""
    from ..inference.deploy import Deployment

    dep = Deployment.load(args.deploy) if args.deploy else None
    if getattr(args, "openvino", None):
        return openvino.build_predict_runner(args, dep)
    if args.onnx:
        from ..inference.onnx import OnnxDetector

        if args.checkpoint:
            raise MoECLIPError("--onnx runs the exported model; drop --checkpoint")
        given = model_options(args)
        if given:
            raise MoECLIPError(f"--onnx: model flags {sorted(given)} do not apply to an exported model")
        det = OnnxDetector(args.onnx, deployment=dep, threshold=args.threshold, pixel_threshold=args.pixel_threshold)
        plain = [o for o in (args.object or []) if "=" not in o]
        if args.class_map or len(plain) != len(args.object or []):
            raise MoECLIPError("--onnx: the object is fixed by the export; --class-map and KEY=DESC rules do not apply")
        if plain and plain[0].strip() != det.object:
            raise MoECLIPError(f"--onnx: {args.onnx} was exported for {det.object!r}, not {plain[0]!r}; "
                               "export again for another object")
        if args.domain and args.domain != det.domain:
            raise MoECLIPError(f"--onnx: {args.onnx} was exported for the {det.domain} domain")
        return _OnnxRunner(det), det.object, det.domain, "onnx"
    if dep is not None:
        plain = [o.strip() for o in (args.object or []) if "=" not in o]
        if plain and plain[0] != dep.object and (args.threshold is None or dep.normalization is not None):
            print(f"warning: {args.deploy} was calibrated for {dep.object!r}; its threshold and "
                  f"normalisation may not suit {plain[0]!r}", file=sys.stderr)
        det = dep.detector(checkpoint=args.checkpoint, options=model_options(args), device=args.device,
                           precision=args.precision, threshold=args.threshold, domain=args.domain)
        pixel = args.pixel_threshold if args.pixel_threshold is not None else dep.pixel_threshold
        return _TorchRunner(det, pixel), dep.object, det.domain.value, "deploy"
    if not args.checkpoint:
        raise MoECLIPError("--checkpoint is required (or --deploy FILE, or --onnx MODEL)")
    from .common import load_detector

    det = load_detector(args, threshold=args.threshold)
    return _TorchRunner(det, args.pixel_threshold), None, det.domain.value, "flag"


def _batches(jobs: Sequence[Job], size: int) -> Iterator[List[Job]]:
    """Consecutive jobs of the same object, at most ``size`` at a time (one text encoding per batch)."""
    batch: List[Job] = []
    for job in jobs:
        if batch and (len(batch) >= size or job.object != batch[0].object):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def run(args: argparse.Namespace) -> int:
    from ..data.imageio import DEFAULT_MAX_PIXELS, load_image
    from ..inference.deploy import unit_map

    if args.batch_size < 1 or args.workers < 1:
        raise MoECLIPError("--batch-size and --workers must be at least 1")
    if args.overwrite and args.resume:
        raise MoECLIPError("--overwrite and --resume exclude each other")
    out = Path(args.out)
    jobs = expand_inputs(args.inputs, exclude=out)
    if not jobs:
        raise MoECLIPError("no input images found")
    runner, fallback, domain, fallback_source = _build_runner(args)
    if args.onnx or getattr(args, "openvino", None):
        rules = ObjectRules(fallback, default_source=fallback_source)
    else:
        rules = ObjectRules.from_args(args.object, args.class_map, fallback, fallback_source)
    for job in jobs:
        job.object, job.source = rules.resolve(job.path, job.root)
    writer = ResultWriter(out, overwrite=args.overwrite, resume=args.resume, maps=not args.no_maps,
                          overlays=not args.no_overlays, masks=runner.pixel_threshold is not None)
    todo = [j for j in jobs if not writer.is_done(j.path)]
    max_pixels = args.max_pixels if args.max_pixels is not None else DEFAULT_MAX_PIXELS

    def load(job: Job):
        try:
            return load_image(job.path, max_pixels=max_pixels), None
        except MoECLIPError as exc:
            return None, str(exc)

    ok = errors = flagged = 0
    bar = progress(total=len(todo), unit="img", desc="predict")
    try:
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            batches = list(_batches(todo, args.batch_size))
            pending = pool.map(load, batches[0]) if batches else None
            for i, batch in enumerate(batches):
                loaded = list(pending)
                if i + 1 < len(batches):  # decode the next batch while the model runs
                    pending = pool.map(load, batches[i + 1])
                good = [img for img, err in loaded if img is not None]
                preds = iter(runner(good, batch[0].object, domain) if good else [])
                for job, (img, err) in zip(batch, loaded):  # input order, errors in place
                    if err is not None:
                        writer.write_error(job, err)
                        errors += 1
                        continue
                    pred = next(preds)
                    if not (np.isfinite(pred.raw_score) and np.isfinite(pred.map_max)):
                        writer.write_error(job, "the model returned non-finite values (try --precision fp32)")
                        errors += 1
                        continue
                    unit = unit_map(pred.anomaly_map, runner.normalization, runner.num_maps)
                    writer.write(job, pred, img, unit, runner.threshold, runner.pixel_threshold)
                    ok += 1
                    flagged += bool(pred.decision)
                bar.update(len(batch))
    finally:
        bar.close()
        writer.close()
    skipped = len(jobs) - len(todo)
    parts = [f"{ok} image(s) scored"]
    if runner.threshold is not None:
        parts.append(f"{flagged} anomalous (threshold {runner.threshold:.4g})")
    if errors:
        parts.append(f"{errors} unreadable (see 'error' in the results)")
    if skipped:
        parts.append(f"{skipped} already done")
    print(", ".join(parts) + f" -> {writer.results}")
    return 0 if ok or skipped or not errors else 1
