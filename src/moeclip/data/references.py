"""Normal reference images for few-shot scoring: where a dataset keeps them and how K are drawn.

The k-shot protocol draws references from a class's normal **training** images, never from the
test set. Every supported layout keeps them next to its ``test`` folder:

* MVTec AD, MPDD, BTAD, DTD-Synthetic, SDD, converted VisA, ``moeclip datasets synth`` and any
  MVTec-style folder: ``<class>/train/<good|ok|normal|no>/*``;
* BMAD scans (Brain MRI, Liver CT, Retina OCT): ``train/good/img/*``;
* the raw VisA release: the ``split == train``, ``label == normal`` rows of ``split_csv/1cls.csv``.

The polyp sets and other all-anomalous data have none: asking for shots there is an error that
names the class.
"""
from __future__ import annotations

import csv
import glob
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import MoECLIPError
from .manifest import NORMAL_FOLDER_NAMES
from .sample import Sample
from .scanners import IMAGE_EXTENSIONS, _image_files, _subdirs


def _test_ancestor(path: Path) -> Optional[Path]:
    """The nearest ancestor folder called ``test`` (any case)."""
    for parent in path.parents:
        if parent.name.lower() == "test":
            return parent
    return None


def _train_normals_beside(test_dir: Path) -> List[Path]:
    train = next((d for d in _subdirs(test_dir.parent) if d.name.lower() == "train"), None)
    if train is None:
        return []
    found: List[Path] = []
    for d in _subdirs(train):
        if d.name.lower() in NORMAL_FOLDER_NAMES:
            found += _image_files(d) or _image_files(d / "img")
    return found


def _visa_train_normals(sample_path: Path, class_name: str) -> List[Path]:
    """Raw VisA: ``<root>/<cls>/Data/Images/...``; the train normals are listed in the split CSV."""
    parts = sample_path.parts
    if "Data" not in parts:
        return []
    root = Path(*parts[:len(parts) - 1 - parts[::-1].index("Data") - 1])
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        return []
    out = []
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            if (row.get("split") or "").strip().lower() == "train" and \
                    (row.get("label") or "").strip().lower() == "normal" and \
                    (row.get("object") or "").strip() == class_name and row.get("image"):
                p = root / row["image"].strip()
                if p.is_file():
                    out.append(p)
    return sorted(out)


def training_normals(samples: Sequence[Sample], dataset: str = "", group: str = "") -> List[Path]:
    """The normal training images of the class whose test ``samples`` are given (sorted, unique).

    Raises :class:`MoECLIPError` naming the class when its dataset keeps none.
    """
    if not samples:
        raise MoECLIPError(f"{dataset}/{group}: no test samples")
    class_name = samples[0].class_name
    found: Dict[str, Path] = {}
    tests = {t for t in (_test_ancestor(Path(s.image_path)) for s in samples) if t is not None}
    for t in sorted(tests):
        for p in _train_normals_beside(t):
            found.setdefault(str(p), p)
    if not found:
        for p in _visa_train_normals(Path(samples[0].image_path), class_name):
            found.setdefault(str(p), p)
    if not found:
        where = ", ".join(str(t.parent / "train" / "good") for t in sorted(tests)) or \
            f"no <class>/test folder above {samples[0].image_path}"
        raise MoECLIPError(f"{dataset}/{group or class_name}: no normal training images for class {class_name!r} "
                           f"(looked in {where}); few-shot needs them, or pass --reference-data")
    return sorted(found.values())


def folder_references(path: str, class_name: str = "", single_class: bool = False) -> List[Path]:
    """User-supplied references: ``PATH/<class>/`` (or its ``train/good``), or PATH itself for one class.

    PATH may also be a glob of image files (then used for every class).
    """
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(path), recursive=True)
                       if Path(p).suffix.lower() in IMAGE_EXTENSIONS and Path(p).is_file())
        if not files:
            raise MoECLIPError(f"{path}: the pattern matches no image files")
        return files
    root = Path(path).expanduser()
    if not root.is_dir():
        raise MoECLIPError(f"{root}: reference folder not found")
    candidates = [root / class_name, root / class_name / "train" / "good"] if class_name else []
    if single_class or not class_name:
        candidates.append(root)
    for c in candidates:
        files = _image_files(c)
        if files:
            return files
    raise MoECLIPError(f"{root}: no reference images for class {class_name!r} "
                       f"(looked in {', '.join(str(c) for c in candidates)})")


def draw_shots(pool: Sequence[Path], k: Optional[int], seed: int, what: str = "") -> List[Path]:
    """``k`` distinct images of ``pool`` drawn with ``seed`` (all of them, in order, when k is None)."""
    pool = sorted(pool)
    if k is None:
        return list(pool)
    if k < 1:
        raise MoECLIPError(f"--shots must be at least 1, got {k}")
    if len(pool) < k:
        raise MoECLIPError(f"{what}: only {len(pool)} normal reference image(s), --shots {k} needs {k}")
    idx = np.random.default_rng(int(seed)).choice(len(pool), size=k, replace=False)
    return [pool[int(i)] for i in sorted(idx)]
