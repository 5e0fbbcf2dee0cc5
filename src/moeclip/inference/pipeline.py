"""The inference pipeline: images in, scored results out, one way for every caller.

::

    inputs (files, folders, globs, PIL images, arrays, uploads)      expand_inputs / Job
      -> decode (8-bit RGB, EXIF orientation applied)                decode
      -> batches of one object                                       batches
      -> runtime: raw maps at model resolution + raw image scores    Runtime.raw (a protocol)
      -> post-processing: score, decision, map at the image's size   PostProcessor (postprocess.py)
      -> result records and files                                    result_record / ResultWriter
    run() is the loop of ``moeclip predict``; score_images() one batch of it (serve, Detector, Ray).

The base of :mod:`moeclip.inference`: it imports no runtime. Each runtime imports this module and
implements :class:`Runtime` (``torch_runtime.TorchRuntime``, ``references.FewShotRuntime``,
``onnx.OnnxRuntime``, ``openvino.OpenVINORuntime``); :mod:`moeclip.inference.build` (above them
all) builds one from a :class:`~moeclip.inference.build.RuntimeSpec`. A new scoring mode either
changes what ``raw`` returns (maps and scores on the same raw scale) or post-processes
differently (a :class:`~moeclip.inference.postprocess.PostProcessor` subclass).

Output folder of :class:`ResultWriter`::

    DIR/results.jsonl        one line per image, appended and flushed as soon as it is scored
    DIR/maps/<name>.npy      raw anomaly map at the image's size, float32, before any normalisation
    DIR/overlays/<name>.png  heat map over the image (fixed colour scale, comparable across images)
    DIR/masks/<name>.png     binary mask (0/255), when a pixel threshold is known

This module imports neither torch nor the model: the ONNX path runs without PyTorch.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

from ..data.imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_image_bytes, load_image, to_pil_rgb
from ..data.registry import load_descriptions
from ..errors import MoECLIPError
from ..fileio import atomic_open
from ..model.prompts import GENERIC_OBJECT
from .postprocess import PostProcessor, Scored
from .render import mask_image, overlay, save_png

log = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "RESULTS_FILE", "Job", "expand_inputs", "ObjectRules", "decode", "Prediction",
           "Runtime", "score_images", "result_record", "ResultWriter", "batches", "run", "Summary"]

RESULTS_FILE = "results.jsonl"
OUTPUT_DIRS = ("maps", "overlays", "masks")

ImageLike = Union[str, Path, np.ndarray, Any]  # a path, a numpy array or a PIL image


# ---------------------------------------------------------------------------- inputs
@dataclass
class Job:
    """One input: a file (``path``) or an in-memory image (``image``), and the object it shows."""

    path: Optional[Path] = None
    root: Optional[Path] = None   # the folder given on the command line (or the file's folder)
    object: str = GENERIC_OBJECT
    source: str = "generic"       # where the object came from: flag / class-map / deploy / onnx / form / generic
    image: Any = None             # a PIL image or array instead of a file
    key: Optional[str] = None     # identity for --resume (default: the absolute path)

    def __post_init__(self):
        if self.path is not None:
            self.path = Path(self.path)
            if self.root is None:
                self.root = self.path.parent
            if self.key is None:
                self.key = os.path.abspath(self.path)

    @property
    def label(self) -> str:
        """What error messages and records call this input."""
        return str(self.path) if self.path is not None else (self.key or "<image>")


def _visible_files(folder: Path, exclude: Optional[Path]) -> List[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or (here / d).resolve() != exclude))
        out.extend(here / f for f in sorted(filenames)
                   if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
    return out


def _glob_files(spec: str, exclude: Optional[Path]) -> Tuple[Path, List[Path]]:
    """(the fixed folder before the first wildcard, the image files matching ``spec``)."""
    fixed = []
    for part in Path(spec).expanduser().parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    base = Path(*fixed) if fixed else Path(".")
    matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
    files = [Path(m) for m in matches if Path(m).is_file() and Path(m).suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        print(f"warning: {spec!r} matches no image file", file=sys.stderr)
    return base, [f for f in files if exclude is None or exclude not in f.resolve().parents]


def expand_inputs(specs: Sequence[str], exclude: Optional[Path] = None) -> List[Job]:
    """Files, folders (recursive, image suffixes only) and globs -> jobs, first occurrence kept.

    ``exclude`` (the output folder) is skipped so a rerun does not score its own overlays. A
    named file that does not exist is kept: it becomes an ``error`` line.
    """
    exclude = Path(exclude).resolve() if exclude is not None else None
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
            base, files = _glob_files(spec, exclude)
            for f in files:
                add(f, base)
    return jobs


class ObjectRules:
    """Which object description each image gets.

    ``--object DESC`` for every image; ``--object KEY=DESC`` (repeatable) and ``--class-map
    FILE`` (JSON ``{"KEY": "DESC"}`` or ``KEY: DESC`` lines) for mixed folders, where KEY is a
    sub-folder name or a glob pattern matched against the path below the given folder (first
    matching rule wins; unmatched images get the plain description if given, else the
    fallback, else the generic "object").
    """

    def __init__(self, default: Optional[str] = None, rules: Sequence[Tuple[str, str]] = (),
                 default_source: str = "flag"):
        self.default = default
        self.default_source = default_source
        self.rules = list(rules)

    @staticmethod
    def split(objects: Optional[Sequence[str]]) -> Tuple[Optional[str], List[Tuple[str, str]]]:
        """``--object`` values -> (the plain description or None, KEY=DESC rules)."""
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
        return default, rules

    @classmethod
    def from_args(cls, objects: Optional[Sequence[str]], class_map: Optional[str],
                  fallback: Optional[str] = None, fallback_source: str = "deploy") -> "ObjectRules":
        default, rules = cls.split(objects)
        if class_map:
            rules.extend(load_descriptions(class_map).items())
        if default is None and fallback:
            return cls(fallback, rules, fallback_source)
        return cls(default, rules)

    def resolve(self, path: Path, root: Path) -> Tuple[str, str]:
        """(description, source) of one file."""
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

    def assign(self, jobs: Sequence[Job]) -> None:
        """Set each file job's object and source."""
        for job in jobs:
            if job.path is not None:
                job.object, job.source = self.resolve(job.path, job.root)


# ---------------------------------------------------------------------------- decoding
def decode(item: Union[Job, ImageLike, bytes], max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
    """One input -> 8-bit RGB PIL image as a viewer shows it (EXIF orientation applied).

    Files, PIL images, arrays (HxW, HxWx3, HxWx4; uint8, 16-bit, float in [0, 1]) and encoded
    bytes (uploads: only the decoders of :data:`~moeclip.data.imageio.IMAGE_FORMATS` are tried);
    errors are :class:`MoECLIPError` naming the file.
    """
    if isinstance(item, Job):
        if item.image is not None:
            return decode(item.image, max_pixels) if isinstance(item.image, bytes) else \
                to_pil_rgb(item.image, item.label, orient=True)
        item = item.path
    if isinstance(item, (bytes, bytearray)):
        return decode_image_bytes(bytes(item), "upload", max_pixels)
    if isinstance(item, (str, Path)):
        return load_image(item, max_pixels=max_pixels, orient=True)
    return to_pil_rgb(item, orient=True)


# ---------------------------------------------------------------------------- runtimes
@dataclass
class Prediction:
    """One image's result as the Python API returns it."""

    anomaly_map: np.ndarray          # raw map (H, W) float32 at the image's original size
    raw_score: float                 # (c_abnormal + 1) / 2
    map_max: float
    score: float                     # in [0, 1]
    object: str
    domain: str
    path: Optional[str] = None
    decision: Optional[bool] = None  # score >= threshold, when a threshold is known
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_scored(cls, s: Scored, object: str, domain: str, path: Optional[str] = None) -> "Prediction":
        return cls(s.anomaly_map, s.raw_score, s.map_max, s.score, object, domain, path, s.decision, dict(s.extra))


class Runtime(Protocol):
    """What runs the model: RGB images of one object -> raw outputs at the model's resolution."""

    num_maps: int     # maps summed into the raw map (the uncalibrated scale depends on it)
    image_size: int   # the model's input side S

    def raw(self, images: Sequence[Any], object: str, domain: str) -> Tuple[np.ndarray, ...]:
        """PIL RGB images -> (raw maps float32 (B, S, S), raw image scores float32 (B,)[, extras]).

        ``extras`` (optional third item): a dict of per-image arrays (B, ...) that reach
        :attr:`Scored.extra <moeclip.inference.postprocess.Scored.extra>` unchanged.
        """


# ---------------------------------------------------------------------------- scoring
def score_images(runtime: Runtime, post: PostProcessor, images: Sequence[Any], object: str,
                 domain: Optional[str] = None) -> List[Scored]:
    """One batch: decoded RGB images of one object -> post-processed results at each image's size.

    ``domain`` (default: the post-processor's) sets the blur and the image-score rule.
    """
    if not images:
        return []
    if domain is not None and domain != post.domain:
        post = post.with_domain(domain)
    out = runtime.raw(list(images), object, post.domain)
    maps, raw = out[0], out[1]
    extras = out[2] if len(out) > 2 else {}
    results = []
    for i, img in enumerate(images):
        scored = post(maps[i], float(raw[i]), (img.height, img.width))
        scored.extra = {k: v[i] for k, v in extras.items()}
        results.append(scored)
    return results


def result_record(job: Job, scored: Scored, image, post: PostProcessor, name: Optional[str] = None) -> Dict[str, Any]:
    """The results.jsonl fields of one scored image (without the file entries)."""
    rec: Dict[str, Any] = {"path": job.label}
    if name is not None:
        rec["name"] = name
    rec.update({"score": scored.score, "raw_score": scored.raw_score, "map_max": scored.map_max,
                "object": job.object, "object_source": job.source, "domain": post.domain,
                "width": image.width, "height": image.height, "map_scale": post.map_scale})
    if scored.decision is not None:
        rec["decision"] = scored.decision
        rec["threshold"] = post.threshold
    for key, value in scored.extra.items():  # a runtime's per-image extras (few-shot: references, parts)
        rec[key] = value.item() if hasattr(value, "item") else value
    return rec


# ---------------------------------------------------------------------------- outputs
def is_empty_run(out: Path) -> bool:
    """``out`` holds nothing, or only what a run that never scored an image leaves (an empty
    results.jsonl, empty output folders): such a folder takes a new run without ``--overwrite``."""
    for entry in Path(out).iterdir():
        if entry.name == RESULTS_FILE and entry.is_file() and entry.stat().st_size == 0:
            continue
        if entry.name in OUTPUT_DIRS and entry.is_dir() and not any(entry.iterdir()):
            continue
        return False
    return True


class ResultWriter:
    """Writes the output folder; each result line is flushed as soon as its files exist.

    Nothing is created, and nothing an ``--overwrite`` replaces is deleted, before the first result:
    a run that cannot start (a Ray cluster out of reach, a model that fails to load) leaves the
    folder as it was, and the same command can run again.
    """

    def __init__(self, out: Path, overwrite: bool = False, resume: bool = False, maps: bool = True,
                 overlays: bool = True, masks: bool = False):
        self.out = Path(out)
        self.results = self.out / RESULTS_FILE
        self.maps, self.overlays, self.masks = maps, overlays, masks
        self.names: set = set()
        self.done: set = set()
        self.fh = None
        self._clear = False
        if self.out.exists() and not self.out.is_dir():
            raise MoECLIPError(f"--out {self.out}: exists and is not a folder")
        if self.out.is_dir() and not is_empty_run(self.out):
            if resume:
                self._load_previous()
            elif overwrite:
                self._clear = True
            else:
                raise MoECLIPError(f"--out {self.out}: folder is not empty (use --overwrite to replace "
                                   "earlier results or --resume to continue them)")

    def _start(self) -> None:
        """Create the folder (and replace earlier results) when the first result arrives."""
        if self.fh is not None:
            return
        if self._clear:
            self.results.unlink(missing_ok=True)
            for d in OUTPUT_DIRS:
                shutil.rmtree(self.out / d, ignore_errors=True)
            self._clear = False
        for d, on in zip(OUTPUT_DIRS, (self.maps, self.overlays, self.masks)):
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

    def is_done(self, job: Union[Job, Path, str]) -> bool:
        key = job.key if isinstance(job, Job) else os.path.abspath(job)
        return key in self.done

    def unique_name(self, path: Optional[Path]) -> str:
        stem = (path.stem if path is not None else "") or "image"
        name, n = stem, 1
        while name.casefold() in self.names:  # case-insensitive: safe on macOS/Windows file systems
            n += 1
            name = f"{stem}-{n}"
        self.names.add(name.casefold())
        return name

    def _emit(self, record: Dict[str, Any]) -> None:
        self._start()
        self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.fh.flush()

    def write_error(self, job: Job, error: str) -> None:
        self._emit({"path": job.label, "object": job.object, "object_source": job.source, "error": error})

    def write(self, job: Job, scored: Scored, image, post: PostProcessor) -> Dict[str, Any]:
        """Write the files of one result, then its line (so a line implies its files exist)."""
        self._start()
        name = self.unique_name(job.path)
        rec = result_record(job, scored, image, post, name)
        if self.maps:
            with atomic_open(self.out / "maps" / f"{name}.npy") as fh:
                np.save(fh, np.asarray(scored.anomaly_map, dtype=np.float32))
            rec["map"] = f"maps/{name}.npy"
        if self.overlays:
            save_png(overlay(image, post.unit_map(scored.anomaly_map)), self.out / "overlays" / f"{name}.png")
            rec["overlay"] = f"overlays/{name}.png"
        mask = post.mask(scored.anomaly_map) if self.masks else None
        if mask is not None:
            save_png(mask_image(mask), self.out / "masks" / f"{name}.png")
            rec["mask"] = f"masks/{name}.png"
            rec["pixel_threshold"] = post.pixel_threshold
        self._emit(rec)
        return rec

    def close(self) -> None:
        if self.fh is None:
            return
        self.fh.flush()
        try:
            os.fsync(self.fh.fileno())
        except OSError:
            pass
        self.fh.close()


# ---------------------------------------------------------------------------- the loop
def batches(jobs: Sequence[Job], size: int) -> Iterator[List[Job]]:
    """Consecutive jobs of the same object, at most ``size`` at a time (one text encoding per batch)."""
    batch: List[Job] = []
    for job in jobs:
        if batch and (len(batch) >= size or job.object != batch[0].object):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


@dataclass
class Summary:
    scored: int = 0
    errors: int = 0
    flagged: int = 0     # decision True
    skipped: int = 0     # already in results.jsonl (--resume)

    def line(self, threshold: Optional[float]) -> str:
        """What ``predict`` prints: counts scored, flagged (with a threshold), unreadable, already done."""
        parts = [f"{self.scored} image(s) scored"]
        if threshold is not None:
            parts.append(f"{self.flagged} anomalous (threshold {threshold:.4g})")
        if self.errors:
            parts.append(f"{self.errors} unreadable (see 'error' in the results)")
        if self.skipped:
            parts.append(f"{self.skipped} already done")
        return ", ".join(parts)

    @property
    def exit_code(self) -> int:
        """``predict``'s status: 1 only when every image failed."""
        return 0 if self.scored or self.skipped or not self.errors else 1


def _score_batch(batch: List[Job], loaded, runtime: Runtime, post: PostProcessor, writer: ResultWriter,
                 summary: Summary) -> None:
    good = [img for img, err in loaded if img is not None]
    results = iter(score_images(runtime, post, good, batch[0].object))
    for job, (img, err) in zip(batch, loaded):  # input order, errors in place
        if err is not None:
            writer.write_error(job, err)
            summary.errors += 1
            continue
        scored = next(results)
        if not (np.isfinite(scored.raw_score) and np.isfinite(scored.map_max)):
            writer.write_error(job, "the model returned non-finite values (try --precision fp32)")
            summary.errors += 1
            continue
        writer.write(job, scored, img, post)
        summary.scored += 1
        summary.flagged += bool(scored.decision)


def run(jobs: Sequence[Job], runtime: Runtime, post: PostProcessor, writer: ResultWriter, batch_size: int = 8,
        workers: int = 4, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, progress: bool = True) -> Summary:
    """Score every job not yet in the writer's results; the next batch decodes while the model runs."""
    if batch_size < 1 or workers < 1:
        raise MoECLIPError("--batch-size and --workers must be at least 1")
    todo = [j for j in jobs if not writer.is_done(j)]
    summary = Summary(skipped=len(jobs) - len(todo))

    def load(job: Job):
        try:
            return decode(job, max_pixels), None
        except MoECLIPError as exc:
            return None, str(exc)

    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", desc="predict", file=sys.stderr, dynamic_ncols=True,
               disable=not progress or not sys.stderr.isatty())
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            groups = list(batches(todo, batch_size))
            pending = pool.map(load, groups[0]) if groups else None
            for i, batch in enumerate(groups):
                loaded = list(pending)
                if i + 1 < len(groups):  # decode the next batch while the model runs
                    pending = pool.map(load, groups[i + 1])
                _score_batch(batch, loaded, runtime, post, writer, summary)
                bar.update(len(batch))
    finally:
        bar.close()
        writer.close()
    return summary
