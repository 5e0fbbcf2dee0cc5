"""One scanner per on-disk layout family: a dataset folder -> :class:`Sample` lists and problems.

Each ``scan_*`` function handles one layout family (its docstring shows the layout) and is bound
to a benchmark by the registry (``functools.partial`` with the class folders, normal folder
names, ...); each ``looks_like_*`` tells whether a folder holds that layout, for root detection.
All of them reproduce the official MoECLIP test lists exactly when pointed at the standard
layout. This module knows no dataset names: :mod:`moeclip.data.registry` binds layouts to
datasets and :mod:`moeclip.data.scanners` resolves what ``--data`` names.

Rules shared by every scanner, because real downloads break each naive assumption:
* only directories are descended into (``license.txt`` sits next to the class folders) and
  hidden entries (``.DS_Store``, macOS ``._*`` files) are ignored;
* image files are recognised by extension case-insensitively (VisA ``.JPG``, DAGM ``.PNG``);
* masks are paired **by file name** (``<stem>_mask.*`` or ``<stem>.*``), never by sorted
  position, so a missing or extra file cannot shift every later pair;
* anomalous images without a mask are kept with ``has_pixel_gt=False`` (so pixel metrics skip
  them) and reported, except in datasets that have no masks at all (HeadCT);
* problems are collected as readable strings that name the file; ``strict=True`` turns them
  into a :class:`MoECLIPError`.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

from ..errors import MoECLIPError
from .manifest import NORMAL_FOLDER_NAMES, resolve_path
from .sample import Sample

__all__ = [
    "IMAGE_EXTENSIONS",
    "ScanResult",
    "find_root",
    "sort_by_class",
    "scan_folder",
    "looks_like_folder",
    "scan_visa",
    "looks_like_visa",
    "scan_bmad",
    "looks_like_bmad",
    "scan_test_folders",
    "looks_like_test_folders",
    "scan_image_mask_pairs",
    "looks_like_image_mask_pairs",
    "scan_dagm",
    "looks_like_dagm",
]

PathLike = Union[str, os.PathLike]

#: Compared lower-case, so ``.JPG``/``.PNG`` count too.
IMAGE_EXTENSIONS = frozenset({".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"})

#: How many problems a strict-mode error message quotes before summarising.
_STRICT_QUOTE = 10


@dataclass
class ScanResult:
    """What a scan found: the samples, the human-readable problems, and the root used."""

    samples: List[Sample]
    problems: List[str] = field(default_factory=list)
    root: Optional[Path] = None

    def raise_if_problems(self, what: str = "dataset") -> None:
        """Strict mode: every problem is an error (quotes the first few)."""
        if not self.problems:
            return
        shown = "\n  ".join(self.problems[:_STRICT_QUOTE])
        more = len(self.problems) - _STRICT_QUOTE
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise MoECLIPError(f"{what}: {len(self.problems)} problem(s) found:\n  {shown}{tail}")


# --------------------------------------------------------------------------- file-system helpers


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _subdirs(path: Path) -> List[Path]:
    """Sorted visible sub-directories; anything else (license.txt, symlinked files) is skipped."""
    try:
        with os.scandir(path) as it:
            return sorted(Path(e.path) for e in it if _visible(e.name) and e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except PermissionError as exc:
        raise MoECLIPError(f"{path}: cannot list folder ({exc.strerror})") from None


def _image_files(path: Path) -> List[Path]:
    """Sorted visible image files directly inside ``path``."""
    try:
        with os.scandir(path) as it:
            return sorted(Path(e.path) for e in it
                          if _visible(e.name) and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
                          and e.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except PermissionError as exc:
        raise MoECLIPError(f"{path}: cannot list folder ({exc.strerror})") from None


def _index_by_stem(files: Sequence[Path]) -> Dict[str, Path]:
    """stem -> file; with two extensions for one stem the first in sort order wins."""
    index: Dict[str, Path] = {}
    for f in files:
        index.setdefault(f.stem, f)
    return index


def _match_mask(stem: str, index: Mapping[str, Path], suffixes: Sequence[str]) -> Optional[Path]:
    for suffix in suffixes:
        found = index.get(stem + suffix)
        if found is not None:
            return found
    return None


class _Collector:
    """Accumulates samples and problems for one dataset root."""

    def __init__(self, root: Path, dataset: str):
        self.root = root
        self.dataset = dataset
        self.samples: List[Sample] = []
        self.problems: List[str] = []

    def add(self, image: Path, label: int, class_name: str, mask: Optional[Path] = None, *,
            variant: Optional[str] = None, defect: Optional[str] = None,
            has_pixel_gt: bool = True) -> None:
        self.samples.append(Sample(str(image), label, class_name, str(mask) if mask else None,
                                   self.dataset, variant, defect, has_pixel_gt))

    def problem(self, path: PathLike, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def add_anomalous(self, images: Sequence[Path], masks: Mapping[str, Path], class_name: str, mask_dir: PathLike,
                      image_dir: PathLike, *, defect: Optional[str] = None, report_missing: bool = True) -> None:
        """Anomalous images paired with their masks by stem (``x`` or ``x_mask``). An image without a
        mask is kept without pixel GT (and reported); a mask without an image is reported."""
        used = set()
        for image in images:
            mask = _match_mask(image.stem, masks, ("", "_mask"))
            if mask is None:
                if report_missing:
                    self.problem(image, f"anomalous image has no mask in {mask_dir}")
            else:
                used.add(mask)
            self.add(image, 1, class_name, mask, defect=defect, has_pixel_gt=mask is not None)
        for mask in masks.values():
            if mask not in used:
                self.problem(mask, f"mask without a matching image in {image_dir}")

    def result(self) -> ScanResult:
        return ScanResult(self.samples, self.problems, self.root)


def _abs(path: PathLike) -> Path:
    # abspath, not resolve(): keep the user's symlinked data folder in the paths we report.
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


# --------------------------------------------------------------------------- root detection


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def find_root(path: PathLike, detect: Callable[[Path], bool], *, max_depth: int = 3,
              prefer: Sequence[str] = (), what: str = "dataset", expected: str = "") -> Path:
    """The shallowest folder at or below ``path`` (at most ``max_depth`` levels down) for which
    ``detect`` is true: archives unpack with one or two extra wrapper folders.

    Several matches at the same depth are resolved by ``prefer`` (folder names compared without
    case/punctuation); if that does not single one out, the error lists them, because guessing
    would silently evaluate the wrong dataset (e.g. ``/data`` holding ClinicDB and ColonDB).
    """
    start = _abs(path)
    if not start.exists():
        raise MoECLIPError(f"{start}: does not exist")
    if not start.is_dir():
        raise MoECLIPError(f"{start}: is a file, expected the {what} folder")
    wanted = {_norm(p) for p in prefer}
    level = [start]
    for depth in range(max_depth + 1):
        hits = [d for d in level if detect(d)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            preferred = [d for d in hits if _norm(d.name) in wanted]
            if len(preferred) == 1:
                return preferred[0]
            names = ", ".join(str(d) for d in (preferred or hits))
            raise MoECLIPError(f"{start}: several folders look like {what}: {names}; "
                               f"pass the one you mean")
        if depth < max_depth:
            level = [c for d in level for c in _subdirs(d)]
    hint = f" (expected {expected})" if expected else ""
    raise MoECLIPError(f"{start}: no {what} layout found here or up to {max_depth} folders "
                       f"below{hint}")


# --------------------------------------------------------------------------- MVTec-style trees


def _discover_class_dirs(root: Path) -> Dict[str, str]:
    """Generic trees: the root itself when it has ``test/``, else every child with ``test/``."""
    if (root / "test").is_dir():
        return {".": root.name}
    return {d.name: d.name for d in _subdirs(root) if (d / "test").is_dir()}


def looks_like_folder(path: Path, class_dirs: Optional[Mapping[str, str]] = None) -> bool:
    """True when ``path`` holds ``<class>/test/`` (or is itself a class folder with ``test/``)."""
    if class_dirs is None:
        return (path / "test").is_dir() or any((d / "test").is_dir() for d in _subdirs(path))
    return any((path / folder / "test").is_dir() for folder in class_dirs)


def _scan_class_dir(out: _Collector, class_dir: Path, class_name: str, variant: Optional[str],
                    normal_names: Sequence[str], mask_suffixes: Sequence[str],
                    has_masks: bool) -> None:
    test = class_dir / "test"
    gt_root = class_dir / "ground_truth"
    count = 0
    used_masks = set()
    for specie_dir in _subdirs(test):
        specie = specie_dir.name
        label = 0 if specie.lower() in normal_names else 1
        images = _image_files(specie_dir)
        count += len(images)
        mask_dir = gt_root / specie
        index = _index_by_stem(_image_files(mask_dir)) if label and has_masks else {}
        if label and has_masks and images and not mask_dir.is_dir():
            out.problem(mask_dir, f"folder missing: {len(images)} anomalous image(s) in "
                                  f"{specie_dir} have no mask")
        for image in images:
            mask = _match_mask(image.stem, index, mask_suffixes) if index else None
            if label and has_masks and mask is None and mask_dir.is_dir():
                out.problem(image, f"anomalous image has no mask in {mask_dir} "
                                   f"(looked for {image.stem}_mask.* and {image.stem}.*)")
            if mask is not None:
                used_masks.add(mask)
            out.add(image, label, class_name, mask, variant=variant, defect=specie,
                    has_pixel_gt=has_masks and (label == 0 or mask is not None))
    if count == 0:
        out.problem(test, f"class {class_name!r} has no test images")
    if has_masks:
        for mask_dir in _subdirs(gt_root):
            if mask_dir.name.lower() in normal_names:
                continue
            for mask in _image_files(mask_dir):
                if mask not in used_masks:
                    out.problem(mask, f"mask without a matching image in "
                                      f"{test / mask_dir.name}")


def scan_folder(root: PathLike, *, dataset: str = "custom",
                class_dirs: Optional[Mapping[str, str]] = None,
                normal_names: Sequence[str] = NORMAL_FOLDER_NAMES,
                mask_suffixes: Sequence[str] = ("_mask", ""),
                has_masks: Optional[bool] = None, variant_from_folder: bool = False) -> ScanResult:
    """Scan an MVTec-style tree: ``<class>/test/<good|defect>/*`` and
    ``<class>/ground_truth/<defect>/<stem>_mask.*`` (same-stem masks accepted too).

    ``class_dirs`` maps folder -> class name (``"."`` = the root itself); ``None`` discovers the
    classes. ``has_masks=None`` means "masks exist if any class has ``ground_truth/``", so an
    image-level dataset is not flooded with missing-mask problems. ``variant_from_folder`` sets
    ``variant`` to the folder (DTD-Synthetic reports per texture folder).
    Used for MVTec AD, BTAD, RSDD, DTD-Synthetic, MPDD, SDD and the generic ``folder`` format.
    """
    root = _abs(root)
    out = _Collector(root, dataset)
    normal = tuple(n.lower() for n in normal_names)
    if class_dirs is None:
        class_dirs = _discover_class_dirs(root)
        if not class_dirs:
            out.problem(root, "no class folders with a test/ sub-folder found")
    else:
        present = {f: c for f, c in class_dirs.items() if (root / f / "test").is_dir()}
        if not present:
            out.problem(root, f"none of the expected folders found: {', '.join(class_dirs)}")
        else:
            for folder in class_dirs:
                if folder not in present and folder != ".":
                    out.problem(root / folder, "expected class folder is missing")
            for d in _subdirs(root):
                if d.name not in class_dirs and (d / "test").is_dir():
                    out.problem(d, "not a known class folder of this dataset; skipped")
        class_dirs = present
    if has_masks is None:
        has_masks = any((root / f / "ground_truth").is_dir() for f in class_dirs)
    for folder, class_name in class_dirs.items():
        class_dir = root if folder == "." else root / folder
        variant = (root.name if folder == "." else folder) if variant_from_folder else None
        _scan_class_dir(out, class_dir, class_name, variant, normal, mask_suffixes, has_masks)
    return out.result()


# --------------------------------------------------------------------------- VisA


def looks_like_visa(path: Path, classes: Sequence[str] = ()) -> bool:
    """Raw release (``<cls>/Data/Images``) or a converted ``<cls>/test`` tree."""
    return any((path / c / "Data" / "Images").is_dir() or (path / c / "test").is_dir()
               for c in classes)


def _visa_csv(out: _Collector, csv_path: Path) -> None:
    """Official test split: rows of ``split_csv/1cls.csv`` with ``split == test``."""
    root = out.root
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            needed = {"object", "split", "label", "image", "mask"}
            missing = needed - set(reader.fieldnames or ())
            if missing:
                raise MoECLIPError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
            rows = list(enumerate(reader, start=2))
    except OSError as exc:
        raise MoECLIPError(f"{csv_path}: cannot read ({exc.strerror or exc})") from None
    mask_indexes: Dict[Path, Dict[str, Path]] = {}
    for line, row in rows:
        def get(key: str) -> str:
            return (row.get(key) or "").strip()  # short rows give None

        if get("split").lower() != "test":
            continue
        where = f"{csv_path}:{line}"
        label_text = get("label").lower()
        if label_text not in ("normal", "anomaly") or not get("image") or not get("object"):
            out.problems.append(f"{where}: needs object, image and label 'normal' or "
                                f"'anomaly'; row skipped")
            continue
        label = int(label_text == "anomaly")
        cls = get("object")
        image = resolve_path(root, get("image"))
        if not image.is_file():
            out.problem(image, f"listed in {where} but missing; skipped")
            continue
        mask = None
        if label:
            listed = get("mask")
            mask = resolve_path(root, listed) if listed else None
            if mask is None or not mask.is_file():
                mask_dir = root / cls / "Data" / "Masks" / "Anomaly"
                if mask_dir not in mask_indexes:
                    mask_indexes[mask_dir] = _index_by_stem(_image_files(mask_dir))
                mask = _match_mask(image.stem, mask_indexes[mask_dir], ("", "_mask"))
            if mask is None:
                out.problem(image, f"anomalous image has no mask (listed: {listed or 'none'})")
        out.add(image, label, cls, mask, has_pixel_gt=label == 0 or mask is not None)


def scan_visa(root: PathLike, *, classes: Sequence[str], dataset: str = "VisA") -> ScanResult:
    """VisA: official ``split_csv/1cls.csv`` when present (the raw ``Normal`` folders hold the
    training normals too); otherwise every image under ``<cls>/Data/Images/{Normal,Anomaly}``
    with same-stem ``Data/Masks/Anomaly/*.png`` masks; converted ``<cls>/test`` trees
    (spot-diff, anomalib) go through :func:`scan_folder`.
    """
    root = _abs(root)
    out = _Collector(root, dataset)
    csv_path = root / "split_csv" / "1cls.csv"
    if csv_path.is_file():
        _visa_csv(out, csv_path)
        return out.result()
    raw = [c for c in classes if (root / c / "Data" / "Images").is_dir()]
    if not raw:
        return scan_folder(root, dataset=dataset,
                           class_dirs={c: c for c in classes if (root / c / "test").is_dir()})
    out.problem(root, "split_csv/1cls.csv not found: using every image under "
                      "<class>/Data/Images, which includes training normals if the full "
                      "release is present (the official test split lists 962 normals)")
    for cls in classes:
        if cls not in raw:
            out.problem(root / cls, "expected class folder is missing")
            continue
        images_dir = root / cls / "Data" / "Images"
        mask_dir = root / cls / "Data" / "Masks" / "Anomaly"
        masks = _index_by_stem(_image_files(mask_dir))
        normals = _image_files(images_dir / "Normal")
        anomalies = _image_files(images_dir / "Anomaly")
        if not normals and not anomalies:
            out.problem(images_dir, f"class {cls!r} has no images")
        for image in normals:
            out.add(image, 0, cls)
        out.add_anomalous(anomalies, masks, cls, mask_dir, images_dir / "Anomaly")
    return out.result()


# --------------------------------------------------------------------------- BMAD (Brain, Liver, Retina)

_BMAD_MASK_DIRS = ("label", "anomaly_mask")


def looks_like_bmad(path: Path) -> bool:
    test = path / "test"
    return (test / "good" / "img").is_dir() or (test / "Ungood" / "img").is_dir()


def scan_bmad(root: PathLike, *, dataset: str, class_name: str) -> ScanResult:
    """BMAD slices: ``test/{good,Ungood}/img/*`` with same-name masks in ``Ungood/label/``
    (MVFA copies call it ``anomaly_mask/``; ``label`` wins when both exist)."""
    root = _abs(root)
    out = _Collector(root, dataset)
    test = root / "test"
    count = 0
    for specie_dir in _subdirs(test):
        label = 0 if specie_dir.name.lower() in NORMAL_FOLDER_NAMES else 1
        images = _image_files(specie_dir / "img")
        count += len(images)
        if not label:
            for image in images:
                out.add(image, 0, class_name, defect=specie_dir.name)
            continue
        mask_dir = next((specie_dir / m for m in _BMAD_MASK_DIRS if (specie_dir / m).is_dir()), None)
        if mask_dir is None:
            if images:
                out.problem(specie_dir, f"no label/ or anomaly_mask/ folder: {len(images)} "
                                        f"anomalous image(s) have no mask")
            masks: Dict[str, Path] = {}
        else:
            masks = _index_by_stem(_image_files(mask_dir))
        # without a mask folder, the folder itself was reported above
        out.add_anomalous(images, masks, class_name, mask_dir, specie_dir / "img", defect=specie_dir.name,
                          report_missing=mask_dir is not None)
    if count == 0:
        out.problem(test, f"class {class_name!r} has no test images")
    return out.result()


# --------------------------------------------------------------------------- image-level test trees (HeadCT)


def looks_like_test_folders(path: Path) -> bool:
    """``test/<specie>/`` with image files directly inside (not BMAD's extra ``img/`` level)."""
    return any(_image_files(d) for d in _subdirs(path / "test"))


def scan_test_folders(root: PathLike, *, dataset: str, class_name: str) -> ScanResult:
    """Image-level datasets without masks: ``test/good/*`` normal, any other
    ``test/<specie>/*`` anomalous (HeadCT: ``test/defect``); every sample ``has_pixel_gt=False``."""
    root = _abs(root)
    out = _Collector(root, dataset)
    count = 0
    for specie_dir in _subdirs(root / "test"):
        label = 0 if specie_dir.name.lower() in NORMAL_FOLDER_NAMES else 1
        for image in _image_files(specie_dir):
            out.add(image, label, class_name, defect=specie_dir.name, has_pixel_gt=False)
            count += 1
    if count == 0:
        out.problem(root / "test", f"class {class_name!r} has no test images")
    return out.result()


# --------------------------------------------------------------------------- images/ + masks/ (polyps, Endo)


def looks_like_image_mask_pairs(path: Path, subdir: str = "") -> bool:
    base = path / subdir if subdir else path
    return (base / "images").is_dir() and (base / "masks").is_dir()


def scan_image_mask_pairs(root: PathLike, *, dataset: str, class_name: str,
                          subdir: str = "") -> ScanResult:
    """All-anomalous segmentation sets: ``[subdir/]images/<name>`` with ``masks/<name>`` of the
    same stem (the extension may differ). Endo uses ``subdir="test dataset"`` (with a space)."""
    root = _abs(root)
    out = _Collector(root, dataset)
    base = root / subdir if subdir else root
    images = _image_files(base / "images")
    masks = _index_by_stem(_image_files(base / "masks"))
    if not images:
        out.problem(base / "images", f"class {class_name!r} has no images")
    out.add_anomalous(images, masks, class_name, base / "masks", base / "images")
    return out.result()


# --------------------------------------------------------------------------- DAGM 2007


def looks_like_dagm(path: Path, classes: Sequence[str] = ()) -> bool:
    return any((path / c / "Test").is_dir() or (path / c / "test").is_dir() for c in classes)


def scan_dagm(root: PathLike, *, classes: Sequence[str], dataset: str = "DAGM") -> ScanResult:
    """DAGM 2007 raw release: ``ClassN/Test/NNNN.PNG``, anomalous when
    ``ClassN/Test/Label/NNNN_label.PNG`` exists. AdaCLIP's MVTec-like conversion (``ClassN/test``)
    goes through :func:`scan_folder`. Unlike AdaCLIP, all test normals are kept (AdaCLIP keeps
    only as many as there are anomalies).
    """
    root = _abs(root)
    if not any((root / c / "Test").is_dir() for c in classes):
        return scan_folder(root, dataset=dataset, class_dirs={c: c for c in classes})
    out = _Collector(root, dataset)
    for cls in classes:
        test = root / cls / "Test"
        if not test.is_dir():
            out.problem(root / cls, "expected class folder (with Test/) is missing")
            continue
        label_dir = test / "Label"
        masks = _index_by_stem(_image_files(label_dir))
        images = _image_files(test)
        if not images:
            out.problem(test, f"class {cls!r} has no test images")
        used = set()
        for image in images:
            mask = _match_mask(image.stem, masks, ("_label",))
            if mask is not None:
                used.add(mask)
            out.add(image, int(mask is not None), cls, mask,
                    defect="good" if mask is None else "defect")
        for mask in masks.values():
            if mask not in used:
                out.problem(mask, f"label without a matching image in {test}")
    return out.result()


# --------------------------------------------------------------------------- ordering


def sort_by_class(samples: List[Sample], class_names: Sequence[str]) -> List[Sample]:
    """Official class order first (unknown classes after), then by path: stable output."""
    order = {c: i for i, c in enumerate(class_names)}
    return sorted(samples, key=lambda s: (order.get(s.class_name, len(order)), s.class_name,
                                          s.group, s.image_path))
