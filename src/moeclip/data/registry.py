"""The benchmark registry: names, classes, prompt descriptions and on-disk layout of each dataset.

The 14 MoECLIP benchmarks use the official metadata keys (``MVTec``, ``Colon_cvc300``, ...);
class names, their order and the object descriptions (``REAL_NAMES``) are the official tables,
including their quirks: DTD-Synthetic lists "Woven" five times (deduplicated here, reported per
texture folder), the class name differs from the key for CVC-300 and Kvasir, and the MVTec
capsule prompt reads "black asd orange capsule" (kept by default for faithful numbers;
``fix_typos=True`` gives "black and orange capsule").

MPDD, SDD (KolektorSDD, AdaCLIP's conversion) and DAGM 2007 are registered as extras.

``--data`` values (see :func:`parse_data_arg`)::

    NAME=PATH                   known dataset NAME (any alias, case-insensitive); PATH is its
                                folder, or a folder up to 3 levels above it
    folder[:NAME]=PATH          generic MVTec-style tree <class>/test/<good|defect>/...
    jsonl[:NAME]=FILE[@ROOT]    official JSONL manifest; paths relative to ROOT
                                (default: the manifest's folder, or the first folder up to 3
                                levels below it where the listed images exist)
    meta[:NAME]=FILE[@ROOT]     AdaCLIP/AnomalyCLIP meta.json (FILE may be its folder)

The optional ``:NAME`` tags a generic source with a known dataset, so its samples get that key,
prompt descriptions and domain.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import MoECLIPError
from . import layouts

__all__ = [
    "DatasetSpec",
    "DataFormat",
    "GENERIC_FORMATS",
    "get_dataset",
    "list_datasets",
    "parse_data_arg",
    "load_descriptions",
    "describe",
]

PathLike = Union[str, os.PathLike]

#: ``--data`` format names that are not datasets.
GENERIC_FORMATS = ("folder", "jsonl", "meta")


@dataclass(frozen=True, eq=False)
class DatasetSpec:
    """Everything the toolkit knows about one benchmark."""

    key: str                          # official metadata key, also ``Sample.dataset``
    display_name: str                 # as written in the paper's tables
    domain: str                       # "industrial" or "medical" (blur size, image-score rule)
    class_names: Tuple[str, ...]      # official CLASS_NAMES order, deduplicated
    descriptions: Mapping[str, str]   # official REAL_NAMES: class -> object description
    has_masks: bool                   # False: image-level only (HeadCT)
    scanner: Callable[[Path], layouts.ScanResult]
    detect: Callable[[Path], bool]    # does this folder hold the expected layout?
    layout: str                       # short description of the expected layout
    aliases: Tuple[str, ...] = ()
    root_names: Tuple[str, ...] = ()  # folder names seen in downloads (root detection tie-break)
    variant_from_folder: bool = False  # report per first-level folder (DTD-Synthetic)
    benchmark: bool = True            # one of the paper's 14 benchmarks
    typo_fixes: Mapping[str, str] = field(default_factory=dict)

    @property
    def all_names(self) -> Tuple[str, ...]:
        return (self.key, self.display_name) + self.aliases + self.root_names

    def describe(self, class_name: str, *, fix_typos: bool = False) -> str:
        """Object description for prompts; see :func:`describe`."""
        return describe(self, class_name, fix_typos=fix_typos)

    def scan(self, path: PathLike, *, strict: bool = False) -> layouts.ScanResult:
        """Scan this dataset at ``path`` or up to 3 folders below it (archives add wrappers)."""
        root = layouts.find_root(path, self.detect, prefer=self.all_names, what=self.display_name,
                                 expected=self.layout)
        result = self.scanner(root)
        result.root = root
        result.samples = layouts.sort_by_class(result.samples, self.class_names)
        if strict:
            result.raise_if_problems(f"{self.display_name} at {root}")
        return result

    def __repr__(self) -> str:
        return f"DatasetSpec({self.key!r})"


@dataclass(frozen=True)
class DataFormat:
    """A generic source chosen with ``--data folder=...``, ``jsonl=...`` or ``meta=...``."""

    name: str                            # one of GENERIC_FORMATS
    dataset: Optional[DatasetSpec] = None  # from ``jsonl:MVTec=...``
    root: Optional[Path] = None          # from ``...=FILE@ROOT``

    @property
    def key(self) -> str:
        return self.dataset.key if self.dataset else "custom"


# --------------------------------------------------------------------------- official tables

_MVTEC = {
    "bottle": "dark bottle",
    "cable": "top view of three cables",
    "capsule": "black asd orange capsule",
    "carpet": "gray carpet",
    "grid": "metal or plastic mesh",
    "hazelnut": "single brown hazelnut",
    "leather": "brown leather",
    "metal_nut": "metal nut which has four notched edges",
    "pill": "oval white pill with small red speckles and the letters 'FF' engraved",
    "screw": "screw",
    "tile": "speckled tile surface",
    "transistor": "a three-legged transistor placed vertically",
    "toothbrush": "toothbrush head",
    "wood": "wood surface",
    "zipper": "a black zipper",
}

_VISA = {
    "candle": "candle",
    "pcb3": "infrared sensor pcb module",
    "capsules": "capsules",
    "pipe_fryum": "pipe-shaped fryum",
    "pcb4": "battery charging pcb module",
    "macaroni2": "scattered yellow macaroni",
    "pcb2": "integrated circuits board",
    "chewinggum": "chewing gum",
    "macaroni1": "orange macaroni",
    "cashew": "cashew nut",
    "fryum": "wheel-shaped fryum snack",
    "pcb1": "dual ultrasonic distance sensor pcb module",
}

_BTAD = {
    "01": ("Bright concentric rings in neon yellow and blue tones against a dark blue background, "
           "resembling a stylized wave or energy field radiating outward."),
    "02": "vertical fabric lines in warm, dusty pink and beige tones",
    "03": "oval concentric circular rings in gradient shades of blue and white",
}

# DTD-Synthetic: prompt class = texture family (identity descriptions); reported per folder.
_DTD_FOLDERS = {
    "Blotchy_099": "Blotchy",
    "Fibrous_183": "Fibrous",
    "Marbled_078": "Marbled",
    "Matted_069": "Matted",
    "Mesh_114": "Mesh",
    "Perforated_037": "Perforated",
    "Stratified_154": "Stratified",
    "Woven_001": "Woven",
    "Woven_068": "Woven",
    "Woven_104": "Woven",
    "Woven_125": "Woven",
    "Woven_127": "Woven",
}

# AA-CLIP's table (MoECLIP dropped MPDD); order as in AA-CLIP's CLASS_NAMES.
_MPDD = {
    "connector": "metal clamps with black adjustment knobs",
    "tubes": "scattered metal objects",
    "metal_plate": "blue rectangular metal plate with a notch on one side",
    "bracket_white": "white, elongated triangular metal bracket with a smooth, matte finish",
    "bracket_brown": ("brown L-shaped metal bracket with smooth, glossy finish and multiple "
                      "mounting holes along its arms"),
    "bracket_black": "black ornamental metal bracket with spiral design attached to a rectangular frame",
}

_DAGM_CLASSES = tuple(f"Class{i}" for i in range(1, 11))


def _unique(names: Sequence[str]) -> Tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _folder_spec(key, display, domain, class_dirs: Mapping[str, str], descriptions, *,
                 normal=("good",), layout, variant_from_folder=False, **kw) -> DatasetSpec:
    """An MVTec-style dataset: ``<folder>/test/...`` with ``ground_truth/`` masks."""
    dirs = dict(class_dirs)
    return DatasetSpec(
        key=key, display_name=display, domain=domain,
        class_names=_unique(dirs.values()), descriptions=MappingProxyType(dict(descriptions)),
        has_masks=True,
        scanner=partial(layouts.scan_folder, dataset=key, class_dirs=dirs, normal_names=normal,
                        has_masks=True, variant_from_folder=variant_from_folder),
        detect=partial(layouts.looks_like_folder, class_dirs=dirs),
        layout=layout, variant_from_folder=variant_from_folder, **kw)


def _bmad_spec(key, display, aliases, root_names) -> DatasetSpec:
    return DatasetSpec(
        key=key, display_name=display, domain="medical", class_names=(key,),
        descriptions=MappingProxyType({key: "scan"}), has_masks=True,
        scanner=partial(layouts.scan_bmad, dataset=key, class_name=key), detect=layouts.looks_like_bmad,
        layout="test/{good,Ungood}/img/*.png + test/Ungood/label/*.png",
        aliases=aliases, root_names=root_names)


def _pairs_spec(key, display, class_name, description, aliases, root_names, subdir="") -> DatasetSpec:
    base = f"{subdir}/" if subdir else ""
    return DatasetSpec(
        key=key, display_name=display, domain="medical", class_names=(class_name,),
        descriptions=MappingProxyType({class_name: description}), has_masks=True,
        scanner=partial(layouts.scan_image_mask_pairs, dataset=key, class_name=class_name, subdir=subdir),
        detect=partial(layouts.looks_like_image_mask_pairs, subdir=subdir),
        layout=f"{base}images/<name> + {base}masks/<name>", aliases=aliases, root_names=root_names)


_SPECS: Tuple[DatasetSpec, ...] = (
    # ---- industrial benchmarks
    _folder_spec("MVTec", "MVTec AD", "industrial", {c: c for c in _MVTEC}, _MVTEC,
                 layout="<class>/test/<good|defect>/*.png + <class>/ground_truth/<defect>/*_mask.png",
                 aliases=("mvtec", "mvtec_ad", "mvtecad", "mvtec-ad"),
                 root_names=("mvtec_anomaly_detection",),
                 typo_fixes=MappingProxyType({"capsule": "black and orange capsule"})),
    DatasetSpec(
        key="VisA", display_name="VisA", domain="industrial", class_names=tuple(_VISA),
        descriptions=MappingProxyType(dict(_VISA)), has_masks=True,
        scanner=partial(layouts.scan_visa, classes=tuple(_VISA)),
        detect=partial(layouts.looks_like_visa, classes=tuple(_VISA)),
        layout="<class>/Data/Images/{Normal,Anomaly}/*.JPG + <class>/Data/Masks/Anomaly/*.png "
               "(+ split_csv/1cls.csv)",
        aliases=("visa",), root_names=("VisA_20220922", "VisA_pytorch", "visa_pytorch", "1cls")),
    _folder_spec("BTAD", "BTAD", "industrial", {c: c for c in _BTAD}, _BTAD, normal=("ok",),
                 layout="<01|02|03>/test/{ok,ko}/* + <class>/ground_truth/ko/<stem>.*",
                 aliases=("btad", "btech"), root_names=("BTech_Dataset_transformed",)),
    _folder_spec("RSDD", "RSDD", "industrial", {"Metal15": "RSDD"}, {"RSDD": "metal"},
                 layout="Metal15/test/{good,anomaly}/*.bmp + Metal15/ground_truth/anomaly/<stem>.png",
                 aliases=("rsdd",)),
    _folder_spec("DTD-Synthetic", "DTD-Synthetic", "industrial", _DTD_FOLDERS,
                 {c: c for c in _DTD_FOLDERS.values()}, variant_from_folder=True,
                 layout="<Family_NNN>/test/{good,bad}/*.png + <Family_NNN>/ground_truth/bad/*_mask.png",
                 aliases=("dtd", "dtd-synthetic", "dtd_synthetic", "dtdsynthetic")),
    # ---- medical benchmarks
    _bmad_spec("Brain", "BrainMRI", ("brain", "brainmri", "brain_mri", "brats"), ("Brain_AD",)),
    DatasetSpec(
        key="headct", display_name="HeadCT", domain="medical", class_names=("headct",),
        descriptions=MappingProxyType({"headct": "scan"}), has_masks=False,
        scanner=partial(layouts.scan_test_folders, dataset="headct", class_name="headct"),
        detect=layouts.looks_like_test_folders, layout="test/{good,defect}/*.png (no masks)",
        aliases=("headct", "head_ct", "head-ct", "head ct"), root_names=("HeadCT_anomaly_detection",)),
    _bmad_spec("Liver", "LiverCT", ("liver", "liverct", "livect", "liver_ct"), ("Liver_AD",)),
    _bmad_spec("Retina", "RetinaOCT", ("retina", "retinaoct", "retina_oct", "resc", "retina_resc"),
               ("Retina_RESC_AD", "RESC")),
    _pairs_spec("Colon_colonDB", "ColonDB", "Colon_colonDB", "colon endoscopy image",
                ("colondb", "colon_colondb", "cvc-colondb"), ("CVC-ColonDB",)),
    _pairs_spec("Colon_clinicDB", "ClinicDB", "Colon_clinicDB", "colon endoscopy image",
                ("clinicdb", "colon_clinicdb", "cvc-clinicdb"), ("CVC-ClinicDB",)),
    _pairs_spec("Colon_cvc300", "CVC-300", "CVC-300", "colon endoscopy image",
                ("cvc300", "cvc-300", "colon_cvc300"), ()),
    _pairs_spec("Endo", "Endo", "Endo", "polyp", ("endo", "endotect"),
                ("EndoTect_2020_Segmentation_Test_Dataset",), subdir="test dataset"),
    _pairs_spec("Colon_Kvasir", "Kvasir", "Kvasir", "colon endoscopy image",
                ("kvasir", "colon_kvasir", "kvasir-seg"), ()),
    # ---- extras (not in MoECLIP's metadata)
    _folder_spec("MPDD", "MPDD", "industrial", {c: c for c in _MPDD}, _MPDD, benchmark=False,
                 layout="<class>/test/<good|defect>/*.png + <class>/ground_truth/<defect>/*_mask.png",
                 aliases=("mpdd",)),
    # AdaCLIP's conversion puts the single class at the root; AnomalyCLIP calls the class
    # folder "electrical commutators", used here as the description.
    _folder_spec("SDD", "KolektorSDD", "industrial", {".": "SDD"},
                 {"SDD": "electrical commutators"}, benchmark=False,
                 layout="test/{good,defect}/*.png + ground_truth/defect/*_mask.png",
                 aliases=("sdd", "ksdd", "kolektorsdd", "kolektor"),
                 root_names=("electrical commutators",)),
    DatasetSpec(
        key="DAGM", display_name="DAGM 2007", domain="industrial", class_names=_DAGM_CLASSES,
        descriptions=MappingProxyType({}), has_masks=True,
        scanner=partial(layouts.scan_dagm, classes=_DAGM_CLASSES),
        detect=partial(layouts.looks_like_dagm, classes=_DAGM_CLASSES),
        layout="ClassN/Test/NNNN.PNG + ClassN/Test/Label/NNNN_label.PNG", benchmark=False,
        aliases=("dagm", "dagm2007"), root_names=("DAGM_anomaly_detection",)),
)


def _norm(name: str) -> str:
    """Case- and punctuation-insensitive form: ``MVTec AD`` == ``mvtec_ad`` == ``mvtec-ad``."""
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def _build_index() -> Dict[str, DatasetSpec]:
    index: Dict[str, DatasetSpec] = {}
    for spec in _SPECS:
        for name in (spec.key, spec.display_name) + spec.aliases:
            other = index.setdefault(_norm(name), spec)
            assert other is spec, f"alias {name!r} used by {other.key} and {spec.key}"
    for fmt in GENERIC_FORMATS:
        assert fmt not in index, f"format name {fmt!r} collides with a dataset alias"
    return index


_INDEX = _build_index()


# --------------------------------------------------------------------------- lookup


def list_datasets(*, benchmarks_only: bool = False) -> List[DatasetSpec]:
    """Registered datasets: the 14 benchmarks in the paper's order, then the extras."""
    return [s for s in _SPECS if s.benchmark or not benchmarks_only]


def get_dataset(name: Union[str, DatasetSpec]) -> DatasetSpec:
    """Look a dataset up by key, paper name or alias (case and ``-``/``_``/space ignored)."""
    if isinstance(name, DatasetSpec):
        return name
    spec = _INDEX.get(_norm(name))
    if spec is None:
        known = ", ".join(s.key for s in _SPECS)
        raise MoECLIPError(f"unknown dataset {name!r}; known: {known} "
                           f"(or a generic format: {', '.join(GENERIC_FORMATS)})")
    return spec


def parse_data_arg(value: str) -> Tuple[Union[DatasetSpec, DataFormat], Path]:
    """Parse ``--data NAME=PATH`` (grammar in the module docstring).

    Splits at the first ``=`` (paths may contain ``=``). For ``jsonl``/``meta`` an ``@ROOT``
    suffix is split off at the last ``@`` only when the whole PATH is not an existing file,
    so file names containing ``@`` keep working.
    """
    if "=" not in value:
        raise MoECLIPError(f"--data {value!r}: expected NAME=PATH, e.g. MVTec=/data/mvtec, "
                           f"folder=/data/mine or jsonl=/data/mine/test.jsonl")
    name, path_text = (part.strip() for part in value.split("=", 1))
    if not name or not path_text:
        raise MoECLIPError(f"--data {value!r}: both NAME and PATH are required (NAME=PATH)")
    fmt, sep, tag = name.partition(":")
    if fmt.strip().lower() not in GENERIC_FORMATS:
        if sep:
            raise MoECLIPError(f"--data {value!r}: NAME:DATASET is only allowed with the "
                               f"generic formats {', '.join(GENERIC_FORMATS)}")
        return get_dataset(name), Path(path_text).expanduser()
    fmt = fmt.strip().lower()
    spec = get_dataset(tag.strip()) if tag.strip() else None
    root = None
    if fmt in ("jsonl", "meta") and "@" in path_text and not Path(path_text).expanduser().exists():
        path_text, _, root_text = path_text.rpartition("@")
        if not path_text or not root_text:
            raise MoECLIPError(f"--data {value!r}: expected {fmt}=FILE@ROOT")
        root = Path(root_text).expanduser()
    return DataFormat(fmt, spec, root), Path(path_text).expanduser()


# --------------------------------------------------------------------------- descriptions


def load_descriptions(path: PathLike) -> Dict[str, str]:
    """Read a user's class -> object description table, so custom data gets good prompts.

    Accepts a JSON object (``{"bolt": "steel hex bolt"}``) or text lines ``class: description``
    (blank lines and ``#`` comments skipped; the first ``:`` separates).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise MoECLIPError(f"{path}: cannot read descriptions ({exc.strerror or exc})") from None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MoECLIPError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        bad = [k for k, v in data.items() if not isinstance(v, str) or not v.strip()]
        if bad:
            raise MoECLIPError(f"{path}: description of {bad[0]!r} must be a non-empty string")
        return {str(k): v.strip() for k, v in data.items()}
    table: Dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        cls, sep, desc = stripped.partition(":")
        if not sep or not cls.strip() or not desc.strip():
            raise MoECLIPError(f"{path}:{number}: expected 'class: description', got {stripped!r}")
        table[cls.strip()] = desc.strip()
    return table


def describe(spec: Optional[DatasetSpec], class_name: str, *, fix_typos: bool = False,
             overrides: Optional[Mapping[str, str]] = None) -> str:
    """The object description used in prompts for ``class_name``.

    Priority: ``overrides`` (a user's table from :func:`load_descriptions`), then the dataset's
    official table (with ``fix_typos`` applying known corrections), then the class name itself
    with underscores as spaces, so unknown classes still get a readable prompt.
    """
    if overrides and class_name in overrides:
        return overrides[class_name]
    if spec is not None:
        if fix_typos and class_name in spec.typo_fixes:
            return spec.typo_fixes[class_name]
        if class_name in spec.descriptions:
            return spec.descriptions[class_name]
    return class_name.replace("_", " ").strip() or class_name
