"""Metadata files: the official MoECLIP JSONL test list and the AdaCLIP/AnomalyCLIP ``meta.json``.

Both formats store paths relative to a dataset root, so reading happens in two steps:
``read_*_records`` parses and validates the file into :class:`ManifestRecord` rows (paths
untouched), and :func:`records_to_samples` joins them to a root.  Keeping the steps apart lets
callers find the root first (an archive may unpack one or two folders deeper than expected).

Official JSONL rules (as the official test lists are written): one JSON object per line; ``label``
may be ``0``, ``1``, ``0.0`` or ``1.0``; ``mask_path`` is present only for anomalies that have a mask
(a missing key, ``""`` or ``null`` all mean "no mask"); the last line may lack a newline; blank
lines are skipped.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, List, Optional, Sequence, Union

from ..errors import MoECLIPError
from .sample import Sample

__all__ = [
    "FALLBACK_EXTENSIONS",
    "NORMAL_FOLDER_NAMES",
    "ManifestRecord",
    "resolve_path",
    "relative_path",
    "read_jsonl_records",
    "read_meta_records",
    "records_to_samples",
    "samples_to_records",
    "read_jsonl",
    "read_meta",
    "read_manifest",
    "write_jsonl",
    "write_meta",
    "atomic_write_text",
]

PathLike = Union[str, os.PathLike]

#: Tried, in order, when a listed file is missing: anomalib rewrites BTAD's .bmp as .png, VisA
#: uses upper-case .JPG, CVC-ClinicDB originals are .tif.
FALLBACK_EXTENSIONS = (".png", ".bmp", ".jpg", ".JPG", ".jpeg", ".tif", ".tiff")

#: Sub-folder names that mean "normal" in the layouts we know (compared lower-case).
NORMAL_FOLDER_NAMES = ("good", "ok", "normal", "no")

# Suffixes a mask file name may add to the image stem (MVTec, DAGM, ISIC); "" = same stem.
_MASK_STEM_SUFFIXES = ("", "_mask", "_label", "_segmentation")


@dataclass(frozen=True)
class ManifestRecord:
    """One row of a metadata file, paths as written in the file (relative or absolute)."""

    image_path: str
    label: int
    class_name: str
    mask_path: Optional[str] = None
    defect_type: Optional[str] = None


# --------------------------------------------------------------------------- paths


def resolve_path(root: PathLike, rel: PathLike) -> Path:
    """Join ``rel`` to ``root`` and, if that file is missing, try the same stem with the
    usual image extensions (why: converted copies such as anomalib's BTAD change them).

    An absolute ``rel`` is kept as is (AnomalyCLIP's medical metas hold absolute paths).
    Returns the joined path unchanged when no candidate exists, so callers can report it.
    """
    path = Path(os.path.abspath(os.path.join(os.fspath(root), os.fspath(rel))))
    if path.exists():
        return path
    for ext in FALLBACK_EXTENSIONS:
        candidate = path.with_suffix(ext)
        if candidate != path and candidate.exists():
            return candidate
    return path


def relative_path(path: PathLike, root: PathLike) -> str:
    """``path`` relative to ``root`` with ``/`` separators; absolute when outside ``root``
    (a relative path climbing out with ``..`` would break if the manifest is moved)."""
    abs_path = os.path.abspath(os.fspath(path))
    abs_root = os.path.abspath(os.fspath(root))
    try:
        rel = os.path.relpath(abs_path, abs_root)
    except ValueError:  # different drives on Windows
        return Path(abs_path).as_posix()
    if rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
        return Path(abs_path).as_posix()
    return Path(rel).as_posix()


def _defect_from_path(rel: str) -> Optional[str]:
    """The folder after ``test/`` (MVTec ``broken_large``, BMAD ``Ungood``, headct ``defect``)."""
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    for i, part in enumerate(parts[:-2]):
        if part.lower() == "test":
            return parts[i + 1]
    return None


# --------------------------------------------------------------------------- parsing helpers


def _label(value, where: str) -> int:
    """``int(float(x))`` restricted to 0/1; official files mix ints and floats."""
    if isinstance(value, bool):
        value = int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MoECLIPError(f"{where}: label must be 0 or 1, got {value!r}") from None
    if number not in (0.0, 1.0):
        raise MoECLIPError(f"{where}: label must be 0 or 1, got {value!r}")
    return int(number)


def _optional_path(value, where: str, key: str) -> Optional[str]:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise MoECLIPError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _required_str(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise MoECLIPError(f"{where}: missing required key {key!r}")
    value = obj[key]
    if not isinstance(value, str) or not value:
        raise MoECLIPError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: tolerate a byte-order mark left by Windows editors.
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MoECLIPError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise MoECLIPError(f"{path}: is a folder, expected a file") from None
    except UnicodeDecodeError as exc:
        raise MoECLIPError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise MoECLIPError(f"{path}: cannot read ({exc.strerror or exc})") from None


# --------------------------------------------------------------------------- official JSONL


def read_jsonl_records(path: PathLike) -> List[ManifestRecord]:
    """Parse an official JSONL test list; any malformed line raises naming file and line."""
    path = Path(path)
    records: List[ManifestRecord] = []
    # splitlines(): the last line of Brain/Colon_Kvasir has no newline; \r\n also works.
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MoECLIPError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise MoECLIPError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        image = _required_str(obj, "image_path", where)
        if "label" not in obj:
            raise MoECLIPError(f"{where}: missing required key 'label'")
        label = _label(obj["label"], where)
        class_name = _required_str(obj, "class_name", where)
        mask = _optional_path(obj.get("mask_path"), where, "mask_path")
        records.append(ManifestRecord(image, label, class_name, mask, _defect_from_path(image)))
    return records


# --------------------------------------------------------------------------- meta.json


def _stem_matches(image: str, mask: str) -> bool:
    image_stem = PurePosixPath(image.replace("\\", "/")).stem.lower()
    mask_stem = PurePosixPath(mask.replace("\\", "/")).stem.lower()
    return any(mask_stem == image_stem + suffix for suffix in _MASK_STEM_SUFFIXES)


def _repair_by_stem(records: List[ManifestRecord], path: Path, problems: Optional[list]) -> None:
    """AdaCLIP/AnomalyCLIP pair masks by sorted index; re-pair by file name where the name
    shows the index pairing is wrong (e.g. ``10_mask`` sorted before ``2_mask``)."""
    groups: "OrderedDict[tuple, List[int]]" = OrderedDict()
    for i, rec in enumerate(records):
        if rec.mask_path:
            groups.setdefault((rec.class_name, rec.defect_type), []).append(i)
    for indices in groups.values():
        masks = [records[i].mask_path for i in indices]
        for i in indices:
            rec = records[i]
            if _stem_matches(rec.image_path, rec.mask_path):
                continue
            match = next((m for m in masks if _stem_matches(rec.image_path, m)), None)
            if match is None:
                continue  # names unrelated (some medical sets): keep the file's pairing
            if problems is not None:
                problems.append(f"{path}: {rec.image_path}: mask re-paired by name "
                                f"({rec.mask_path} -> {match})")
            records[i] = ManifestRecord(rec.image_path, rec.label, rec.class_name, match,
                                        rec.defect_type)


def read_meta_records(path: PathLike, phase: str = "test",
                      problems: Optional[list] = None) -> List[ManifestRecord]:
    """Parse an AdaCLIP/AnomalyCLIP ``meta.json`` (a folder holding one is accepted too).

    ``phase`` is matched case-insensitively (AnomalyCLIP's DAGM uses ``"Test"``). Records with
    an empty ``img_path`` (Bayes-PFL's dummy train rows) are skipped.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "meta.json"
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise MoECLIPError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise MoECLIPError(f"{path}: expected a JSON object with 'train'/'test' keys")
    phases = {str(k).lower(): k for k in data}
    if phase.lower() not in phases:
        raise MoECLIPError(f"{path}: no {phase!r} section (found: {', '.join(map(str, data)) or 'none'})")
    key = phases[phase.lower()]
    section = data[key]
    if not isinstance(section, dict):
        raise MoECLIPError(f"{path}: {key!r} must map class names to lists of records")
    records: List[ManifestRecord] = []
    for cls, items in section.items():
        if not isinstance(items, list):
            raise MoECLIPError(f"{path}: {key}/{cls} must be a list of records")
        for i, rec in enumerate(items):
            where = f"{path}: {key}/{cls}[{i}]"
            if not isinstance(rec, dict):
                raise MoECLIPError(f"{where}: expected a JSON object")
            image = rec.get("img_path")
            if image in (None, ""):
                continue
            if not isinstance(image, str):
                raise MoECLIPError(f"{where}: img_path must be a string, got {image!r}")
            specie = rec.get("specie_name")
            specie = str(specie) if specie not in (None, "") else None
            if "anomaly" in rec:
                label = _label(rec["anomaly"], where)
            elif specie is not None:
                label = 0 if specie.lower() in NORMAL_FOLDER_NAMES else 1
            else:
                raise MoECLIPError(f"{where}: record has neither 'anomaly' nor 'specie_name'")
            class_name = rec.get("cls_name") or str(cls)
            if not isinstance(class_name, str):
                raise MoECLIPError(f"{where}: cls_name must be a string, got {class_name!r}")
            mask = _optional_path(rec.get("mask_path"), where, "mask_path")
            records.append(ManifestRecord(image, label, class_name, mask, specie))
    _repair_by_stem(records, path, problems)
    return records


# --------------------------------------------------------------------------- records <-> samples


def records_to_samples(records: Sequence[ManifestRecord], root: PathLike, *,
                       dataset: str = "custom", variant_from_path: bool = False,
                       problems: Optional[list] = None) -> List[Sample]:
    """Resolve records against ``root`` (with the extension fallback) into samples.

    ``variant_from_path`` sets ``variant`` to the first path component, as the official code
    does for DTD-Synthetic's texture folders. If no record has a mask the dataset is
    image-level only and every sample gets ``has_pixel_gt=False``; otherwise only anomalies
    without a mask do, so they are left out of pixel metrics instead of counted as clean.
    """
    root = Path(os.path.abspath(os.fspath(root)))
    any_mask = any(r.mask_path for r in records)
    fallbacks = 0
    samples: List[Sample] = []
    for rec in records:
        image = resolve_path(root, rec.image_path)
        mask = resolve_path(root, rec.mask_path) if rec.mask_path else None
        for listed, found in ((rec.image_path, image), (rec.mask_path, mask)):
            if listed and found is not None and found.suffix != PurePosixPath(listed).suffix:
                fallbacks += 1
        variant = None
        if variant_from_path:
            parts = PurePosixPath(rec.image_path.replace("\\", "/")).parts
            variant = parts[0] if len(parts) > 1 and not os.path.isabs(rec.image_path) else None
        has_gt = any_mask and (rec.label == 0 or mask is not None)
        samples.append(Sample(str(image), rec.label, rec.class_name, str(mask) if mask else None,
                              dataset, variant, rec.defect_type, has_gt))
    if fallbacks and problems is not None:
        problems.append(f"{root}: {fallbacks} listed file(s) found only under another extension "
                        f"(e.g. .bmp converted to .png); using those")
    return samples


def samples_to_records(samples: Iterable[Sample], root: PathLike) -> List[ManifestRecord]:
    """Samples -> records with paths relative to ``root`` (absolute when outside it)."""
    return [ManifestRecord(relative_path(s.image_path, root), int(s.label), s.class_name,
                           relative_path(s.mask_path, root) if s.mask_path else None,
                           s.defect_type)
            for s in samples]


# --------------------------------------------------------------------------- convenience readers


def read_jsonl(path: PathLike, root: Optional[PathLike] = None, *, dataset: str = "custom",
               variant_from_path: bool = False, problems: Optional[list] = None) -> List[Sample]:
    """Official JSONL -> samples; ``root`` defaults to the manifest's folder."""
    path = Path(path)
    return records_to_samples(read_jsonl_records(path), root if root is not None else path.parent,
                              dataset=dataset, variant_from_path=variant_from_path,
                              problems=problems)


def read_meta(path: PathLike, root: Optional[PathLike] = None, *, phase: str = "test",
              dataset: str = "custom", variant_from_path: bool = False,
              problems: Optional[list] = None) -> List[Sample]:
    """AdaCLIP/AnomalyCLIP meta.json -> samples; ``root`` defaults to the meta file's folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "meta.json"
    records = read_meta_records(path, phase=phase, problems=problems)
    return records_to_samples(records, root if root is not None else path.parent, dataset=dataset,
                              variant_from_path=variant_from_path, problems=problems)


def read_manifest(path: PathLike, root: Optional[PathLike] = None, **kwargs) -> List[Sample]:
    """Dispatch on the extension: ``.json`` -> meta.json, anything else -> official JSONL."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() == ".json":
        return read_meta(path, root, **kwargs)
    return read_jsonl(path, root, **kwargs)


# --------------------------------------------------------------------------- writers


def atomic_write_text(path: PathLike, text: str, *, overwrite: bool = False) -> None:
    """Atomic write that refuses to clobber unless asked (see :mod:`moeclip.fileio`)."""
    from ..fileio import atomic_write_text as _write

    parent = Path(path).parent
    if str(parent) and not parent.is_dir():
        raise MoECLIPError(f"{path}: folder {parent} does not exist")
    _write(path, text, overwrite=overwrite)


def write_jsonl(samples: Iterable[Sample], path: PathLike, root: Optional[PathLike] = None, *,
                overwrite: bool = False) -> int:
    """Write the official JSONL (``mask_path`` only when there is a mask); returns the row count.

    Paths are written relative to ``root`` (default: the manifest's folder).
    """
    path = Path(path)
    records = samples_to_records(samples, root if root is not None else path.parent)
    lines = []
    for rec in records:
        obj = {"image_path": rec.image_path, "label": rec.label}
        if rec.mask_path:
            obj["mask_path"] = rec.mask_path
        obj["class_name"] = rec.class_name
        lines.append(json.dumps(obj, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines), overwrite=overwrite)
    return len(lines)


def write_meta(samples: Iterable[Sample], path: PathLike, root: Optional[PathLike] = None, *,
               overwrite: bool = False) -> int:
    """Write an AdaCLIP/AnomalyCLIP ``meta.json`` (everything under ``test``, as ZSAD uses
    only test splits); returns the record count."""
    path = Path(path)
    records = samples_to_records(samples, root if root is not None else path.parent)
    test: "OrderedDict[str, list]" = OrderedDict()
    for rec in records:
        specie = rec.defect_type or ("good" if rec.label == 0 else "defect")
        test.setdefault(rec.class_name, []).append({
            "img_path": rec.image_path,
            "mask_path": rec.mask_path or "",
            "cls_name": rec.class_name,
            "specie_name": specie,
            "anomaly": rec.label,
        })
    text = json.dumps({"train": {}, "test": test}, indent=4, ensure_ascii=False) + "\n"
    atomic_write_text(path, text, overwrite=overwrite)
    return len(records)
