"""What ``--data`` names, as samples: a known dataset by name, a generic tree or a manifest.

The per-layout scanners live in :mod:`moeclip.data.layouts` (and are importable from here too);
:mod:`moeclip.data.registry` binds them to the benchmarks. This module sits above both: it
resolves a name or a ``--data`` value, scans or reads the manifest, and validates what a
manifest lists.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

from ..errors import MoECLIPError
from . import layouts, manifest
from .layouts import (
    IMAGE_EXTENSIONS,
    PathLike,
    ScanResult,
    _abs,
    find_root,
    looks_like_bmad,
    looks_like_dagm,
    looks_like_folder,
    looks_like_image_mask_pairs,
    looks_like_test_folders,
    looks_like_visa,
    scan_bmad,
    scan_dagm,
    scan_folder,
    scan_image_mask_pairs,
    scan_test_folders,
    scan_visa,
    sort_by_class,
)
from .manifest import resolve_path
from .registry import DataFormat, DatasetSpec, get_dataset, parse_data_arg
from .sample import Sample

__all__ = [
    "scan",
    "load_data",
    "validate_samples",
    # the layouts, for callers that imported them from here
    "IMAGE_EXTENSIONS", "ScanResult", "find_root", "sort_by_class", "scan_folder", "looks_like_folder",
    "scan_visa", "looks_like_visa", "scan_bmad", "looks_like_bmad", "scan_test_folders",
    "looks_like_test_folders", "scan_image_mask_pairs", "looks_like_image_mask_pairs", "scan_dagm",
    "looks_like_dagm",
]

# helpers other modules imported from here before the layouts moved out (the fewshot branch's
# data/references.py); new code imports them from .layouts
_image_files, _subdirs = layouts._image_files, layouts._subdirs


# --------------------------------------------------------------------------- validation of listed samples


def validate_samples(samples: Sequence[Sample], *, has_masks: Optional[bool] = None) -> List[str]:
    """Problems in a sample list read from a manifest: missing image or mask files, duplicate
    images, and anomalies without a mask in a dataset that has masks."""
    problems: List[str] = []
    if has_masks is None:
        has_masks = any(s.mask_path for s in samples)
    seen = set()
    for s in samples:
        if s.image_path in seen:
            problems.append(f"{s.image_path}: listed more than once")
        seen.add(s.image_path)
        if not os.path.isfile(s.image_path):
            problems.append(f"{s.image_path}: image file missing")
        if s.mask_path and not os.path.isfile(s.mask_path):
            problems.append(f"{s.mask_path}: mask file missing (for {s.image_path})")
        if s.label == 1 and has_masks and not s.mask_path:
            problems.append(f"{s.image_path}: anomalous image has no mask")
    return problems


# --------------------------------------------------------------------------- entry points


def scan(dataset: Union[str, DatasetSpec], path: PathLike, *, strict: bool = False) -> ScanResult:
    """Scan a known benchmark (a :class:`~moeclip.data.registry.DatasetSpec` or any of its
    names) below ``path``, auto-detecting the root up to 3 levels down."""
    return get_dataset(dataset).scan(path, strict=strict)


def _manifest_root(records, start: Path, explicit: bool) -> Path:
    """Root for a manifest: the given one, or the first folder (≤3 levels down) under which
    the first few listed images exist, as archives often add a wrapper folder."""
    if explicit or not records:
        return start
    probe = [r.image_path for r in records[:5] if not os.path.isabs(r.image_path)]
    if not probe:
        return start

    def detect(d: Path) -> bool:
        return all(resolve_path(d, p).is_file() for p in probe)

    try:
        return find_root(start, detect, what="the manifest's images")
    except MoECLIPError:
        return start  # the missing files are reported by validate_samples


def load_data(value, *, strict: bool = False) -> ScanResult:
    """Everything ``--data NAME=PATH`` can name, as one :class:`ScanResult`.

    ``value`` is the raw string or the pair returned by
    :func:`moeclip.data.registry.parse_data_arg`.
    """
    source, path = parse_data_arg(value) if isinstance(value, str) else value
    if not isinstance(source, DataFormat):
        return scan(source, path, strict=strict)
    spec = source.dataset
    key = spec.key if spec else "custom"
    what = f"--data {source.name}={path}"
    problems: List[str] = []
    if source.name == "folder":
        root = find_root(path, looks_like_folder, what="an MVTec-style folder",
                         expected="<class>/test/good/...")
        result = scan_folder(root, dataset=key,
                             variant_from_folder=bool(spec and spec.variant_from_folder))
        if spec:
            result.samples = sort_by_class(result.samples, spec.class_names)
    else:
        if source.name == "jsonl":
            records = manifest.read_jsonl_records(path)
            default_root = Path(path).parent
        else:
            meta_path = Path(path) / "meta.json" if Path(path).is_dir() else Path(path)
            records = manifest.read_meta_records(meta_path, problems=problems)
            default_root = meta_path.parent
        explicit = source.root is not None
        root = _abs(source.root if explicit else default_root)
        root = _manifest_root(records, root, explicit)
        samples = manifest.records_to_samples(
            records, root, dataset=key, problems=problems,
            variant_from_path=bool(spec and spec.variant_from_folder))
        has_masks = spec.has_masks if spec else None
        problems.extend(validate_samples(samples, has_masks=has_masks))
        result = ScanResult(samples, problems, root)
    if strict:
        result.raise_if_problems(what)
    return result
