"""Normal reference images at inference time: from files, folders, globs or arrays to memory banks.

One :class:`~moeclip.model.fewshot.MemoryBank` per object; :class:`ReferenceBanks` holds them for a
detector, the CLI and the web service, and saves/loads them as one safetensors file per object in
a folder (``<folder>/<object>.safetensors``).
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data.scanners import IMAGE_EXTENSIONS
from ..data.transforms import preprocess_image
from ..errors import MoECLIPError
from ..model import scoring
from ..model.fewshot import MemoryBank, bank_summary, build_bank, predict_with_bank
from ..model.fusion import DEFAULT_REFERENCE_WEIGHT, check_weight, fused_raw
from ..precision import autocast
from .pipeline import Runtime, decode
from .postprocess import image_score

ImageLike = Union[str, Path, Any]

BANK_SUFFIX = ".safetensors"


def expand_reference_paths(spec: Union[str, Path]) -> List[Path]:
    """A folder (its images, sorted, not recursive), a glob or one image file -> image paths."""
    text = os.path.expanduser(str(spec))
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True)
                       if Path(p).suffix.lower() in IMAGE_EXTENSIONS and Path(p).is_file())
        if not files:
            raise MoECLIPError(f"{spec}: the pattern matches no image files")
        return files
    p = Path(text)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                       and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise MoECLIPError(f"{p}: no reference images in this folder")
        return files
    if p.is_file():
        return [p]
    raise MoECLIPError(f"{spec}: reference image or folder not found")


def load_references(images: Union[ImageLike, Sequence[ImageLike]]) -> Tuple[List[Any], List[str]]:
    """(PIL RGB images, names) from paths, folders, globs, arrays or PIL images."""
    if isinstance(images, (str, Path)) or hasattr(images, "convert") or hasattr(images, "__array_interface__"):
        images = [images]
    pils, names = [], []
    for i, item in enumerate(images):
        if isinstance(item, (str, Path)):
            for p in expand_reference_paths(item):
                pils.append(decode(p))
                names.append(str(p))
        else:
            pils.append(decode(item))
            names.append(f"<image {i}>")
    if not pils:
        raise MoECLIPError("no reference images given")
    return pils, names


def bank_from_images(model, images, object: str, *, image_size: Optional[int] = None, precision: str = "fp32",
                     bank_size: Optional[int] = None, fp16: bool = False, batch_size: int = 8,
                     names: Optional[Sequence[str]] = None, text: Optional[torch.Tensor] = None,
                     domain: str = "industrial") -> MemoryBank:
    """A memory bank for ``object`` from reference images (anything :func:`load_references` takes).

    ``text`` and ``domain``: what the bank's normal statistics are measured with (see
    :func:`moeclip.model.fewshot.build_bank`).
    """
    if names is None:
        pils, names = load_references(images)
    else:
        pils = list(images)
    size = image_size or model.config.backbone.image_size
    batch = torch.stack([preprocess_image(img, size) for img in pils])
    return build_bank(model, batch, object, references=list(names), bank_size=bank_size, fp16=fp16,
                      batch_size=batch_size, precision=precision, text=text, domain=domain)


def _file_name(object: str) -> str:
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", object).strip("._") or "object") + BANK_SUFFIX


class ReferenceBanks:
    """Memory banks by object, plus the fusion weight they are used with."""

    def __init__(self, banks: Iterable[MemoryBank] = (), weight: float = DEFAULT_REFERENCE_WEIGHT):
        self.weight = check_weight(weight)
        self.banks: Dict[str, MemoryBank] = {}
        for b in banks:
            self.add(b)

    def __len__(self) -> int:
        return len(self.banks)

    def __contains__(self, object: str) -> bool:
        return object in self.banks

    def add(self, bank: MemoryBank) -> None:
        self.banks[bank.object] = bank

    def get(self, object: Optional[str]) -> Optional[MemoryBank]:
        """The bank of ``object``; a single bank without an object name serves every object."""
        if object in self.banks:
            return self.banks[object]
        if len(self.banks) == 1 and "" in self.banks:
            return self.banks[""]
        return None

    def summary(self) -> List[Dict[str, Any]]:
        return [bank_summary(b) for b in self.banks.values()]

    def save(self, folder: Union[str, Path], overwrite: bool = False) -> List[Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = {}
        for obj in self.banks:
            name = _file_name(obj)
            if name in names:
                raise MoECLIPError(f"{folder}: objects {names[name]!r} and {obj!r} map to the same file {name}")
            names[name] = obj
        return [self.banks[obj].save(folder / name, overwrite=overwrite) for name, obj in names.items()]

    @classmethod
    def load(cls, folder: Union[str, Path], model=None, weight: float = DEFAULT_REFERENCE_WEIGHT,
             device=None) -> "ReferenceBanks":
        """Every ``*.safetensors`` bank in ``folder`` (or one bank file), checked against ``model``."""
        folder = Path(folder)
        files = [folder] if folder.is_file() else sorted(folder.glob(f"*{BANK_SUFFIX}"))
        if not files:
            raise MoECLIPError(f"{folder}: no memory bank files (*{BANK_SUFFIX})")
        return cls([MemoryBank.load(f, model=model, device=device) for f in files], weight)


class FewShotRuntime(Runtime):
    """A detector's model scoring against memory banks: the pipeline's few-shot runtime.

    ``raw`` returns the fused map and image score on the zero-shot raw scales
    (:func:`moeclip.model.fusion.fused_raw`, the bank's leave-one-out statistics), so the shared
    post-processing (scores, heat maps, masks, thresholds) applies unchanged, plus per-image
    extras: the number of references and the raw zero-shot and few-shot parts. Objects without a
    bank are scored zero-shot (``references`` 0).
    """

    def __init__(self, detector, banks: ReferenceBanks):
        self.detector = detector
        self.banks = banks
        self.num_maps = detector.num_maps
        self.image_size = int(detector.image_size)
        self._on_device: Dict[str, MemoryBank] = {}

    def _bank(self, object: str) -> Optional[MemoryBank]:
        bank = self.banks.get(object)
        if bank is None:
            return None
        key = f"{bank.object}:{id(bank)}"
        if key not in self._on_device:
            self._on_device = {key: bank.to(self.detector.device)}  # one at a time: banks can be large
        return self._on_device[key]

    def raw(self, images, object: str, domain: str):
        det = self.detector
        batch = torch.stack([preprocess_image(img, self.image_size) for img in images]).to(det.device)
        bank = self._bank(object)
        text = det.text_features(object)
        with torch.inference_mode(), autocast(det.device, det.precision):
            out = predict_with_bank(det.model, batch, text, bank, domain)
        zs = out["anomaly_map"].cpu().numpy()
        s = out["image_score"].cpu().numpy()
        zs_max = zs.reshape(zs.shape[0], -1).max(1)
        extras: Dict[str, np.ndarray] = {
            "references": np.full(len(images), bank.num_references if bank else 0, dtype=np.int64),
            "zero_shot_raw_score": s.copy(), "zero_shot_map_max": zs_max,
            "zero_shot_score": np.array([image_score(float(m), float(r), domain, None, self.num_maps)
                                         for m, r in zip(zs_max, s)], dtype=np.float32)}
        if bank is None:
            return zs, s, extras
        few = out["few_shot_map"].cpu().numpy()
        maps, scores = fused_raw(zs, few, s, bank.normal_stats(det.model, text, domain), self.banks.weight)
        extras["few_shot_map_max"] = few.reshape(few.shape[0], -1).max(1)
        return maps, scores, extras

    def clear_cache(self) -> None:
        self.detector.model.text.clear_cache()


def attach_references(detector, images, object: Optional[str] = None, *, bank_size: Optional[int] = None,
                      fp16: bool = False, weight: Optional[float] = None, batch_size: int = 8,
                      names: Optional[Sequence[str]] = None) -> MemoryBank:
    """Build a bank for ``object`` (default: the detector's, else every object) and attach it to ``detector``."""
    if detector.normalization is not None:
        raise MoECLIPError("this detector's normalisation was calibrated zero-shot; few-shot scores are on another "
                           "scale: use a checkpoint without a deployment file with references")
    obj = object if object is not None else (detector.object or "")
    bank = bank_from_images(detector.model, images, obj, image_size=detector.image_size,
                            precision=detector.precision, bank_size=bank_size, fp16=fp16, batch_size=batch_size,
                            names=names, text=detector.text_features(obj), domain=detector.domain)
    if detector.references is None:
        detector.references = ReferenceBanks(weight=DEFAULT_REFERENCE_WEIGHT if weight is None else weight)
    elif weight is not None:
        detector.references.weight = check_weight(weight)
    detector.references.add(bank)
    return bank


class FusedScorer(Runtime):
    """A pipeline runtime scoring against one fixed bank, for ``moeclip calibrate``.

    ``leave_one_out``: the bank was built from the very images being scored; each image is scored
    against the bank without its own patches (the reference whose stored features equal the
    image's own), so a reference is never compared with itself.
    """

    def __init__(self, detector, bank: MemoryBank, weight: float = DEFAULT_REFERENCE_WEIGHT,
                 leave_one_out: bool = False):
        self.detector, self.weight, self.leave_one_out = detector, check_weight(weight), leave_one_out
        self.bank = bank.to(detector.device)
        self.num_maps = detector.num_maps
        self.image_size = int(detector.image_size)
        if leave_one_out and bank.num_references < 2:
            raise MoECLIPError("leave-one-out needs at least 2 normal images")

    def _bank_without_self(self, first_map: torch.Tensor) -> MemoryBank:
        """The bank minus the reference whose first-map features are this image's (within 1e-4)."""
        L = self.bank.grid[0] * self.bank.grid[1]
        blocks = self.bank.features[0].float().reshape(self.bank.num_references, L, -1)
        diff = (blocks - first_map.float()).abs().amax(dim=(1, 2))
        j = int(torch.argmin(diff))
        if float(diff[j]) > 1e-4:
            return self.bank
        feats = [torch.cat([f[:j * L], f[(j + 1) * L:]]) for f in self.bank.features]
        return MemoryBank(feats, self.bank.object, self.bank.num_references - 1, self.bank.image_size,
                          self.bank.grid, self.bank.fingerprint)

    def raw(self, images, object: str, domain: str):
        """PIL images -> (fused raw maps (B, S, S), scores (B,), extras), as :class:`FewShotRuntime`."""
        det = self.detector
        batch = torch.stack([preprocess_image(img, self.image_size) for img in images]).to(det.device)
        with torch.inference_mode(), autocast(det.device, det.precision):
            out = det.model.encode_image(batch, compute_losses=False)
            text = det.text_features(object).to(out.det_feature.dtype)
            size = tuple(batch.shape[-2:])
            zs = scoring.anomaly_map(out.seg_features, text, out.grid, size, domain).float().cpu().numpy()
            s = scoring.image_score(out.det_feature, text).float().cpu().numpy()
            feats = [f.float() for f in out.seg_features]
            few = []
            for b in range(batch.shape[0]):
                bank = self._bank_without_self(feats[0][b]) if self.leave_one_out else self.bank
                few.append(bank.anomaly_map([f[b:b + 1] for f in feats], out.grid, size, domain)[0])
            few = torch.stack(few).cpu().numpy()
        stats = self.bank.normal_stats(det.model, det.text_features(object), domain)
        maps, scores = fused_raw(zs, few, s, stats, self.weight)
        return maps, scores, {"few_shot_map_max": few.reshape(few.shape[0], -1).max(1)}


def few_shot_calibration(detector, object: str, references: Sequence[str], normal_paths=None, *,
                         weight: float = DEFAULT_REFERENCE_WEIGHT, bank_size: Optional[int] = None,
                         fp16: bool = False) -> Tuple[FusedScorer, MemoryBank]:
    """(runtime for :func:`moeclip.inference.calibrate.calibrate`, the bank to save) of ``calibrate --reference``.

    ``references`` empty: the ``normal_paths`` themselves, leave-one-out (scored against the full
    bank minus each image; the saved bank holds them all, subsampled/fp16 as asked).
    """
    check_weight(weight)
    if references:
        pils, names = load_references(list(references))
    elif normal_paths:
        pils, names = load_references([str(p) for p in normal_paths])
    else:
        raise MoECLIPError("--reference without images uses the --normal images (leave-one-out); "
                           "with --data give reference images")
    loo = not references
    common = dict(image_size=detector.image_size, precision=detector.precision, names=names,
                  text=detector.text_features(object), domain=detector.domain)
    saved = bank_from_images(detector.model, pils, object, bank_size=bank_size, fp16=fp16, **common)
    scoring = bank_from_images(detector.model, pils, object, **common) if loo and (bank_size or fp16) else saved
    return FusedScorer(detector, scoring, weight, leave_one_out=loo), saved
