"""``torch`` dataset over :class:`Sample` records, with the official pre-processing.

Each item decodes its image once (and its mask once, only for anomalous samples
with pixel ground truth), resizes both independently to SxS, and optionally
applies the official joint augmentation (training).
"""
from __future__ import annotations

import logging
import sys
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from ..errors import MoECLIPError
from .imageio import DEFAULT_MAX_PIXELS, MASK_POLICIES, load_image, load_mask, verify_image
from .sample import Sample
from .transforms import JointAugment, preprocess_image, preprocess_mask

__all__ = ["ZSADDataset", "collate"]

logger = logging.getLogger(__name__)


def _needs_mask(s: Sample) -> bool:
    """Only anomalous samples of mask-bearing data open a mask (normals: zeros, as official)."""
    return bool(s.label) and s.has_pixel_gt


class ZSADDataset(Dataset):
    """Items for training and zero-shot evaluation.

    Each item is a dict:

    - ``image``: float32 (3, S, S), CLIP-normalised
    - ``mask``: float32 (1, S, S) of 0/1; zeros for normals and for samples
      without pixel ground truth
    - ``label``: int64 scalar tensor
    - ``has_mask``: True when ``mask`` is valid ground truth (``Sample.has_pixel_gt``:
      also True for normals, whose zero mask is correct); False items must be
      left out of pixel metrics
    - ``class_name``, ``path`` (image path), ``index`` (position in this
      dataset), ``orig_size`` ((H, W) of the decoded image)

    ``augment`` is False, True (the official :class:`JointAugment`, global RNG) or
    a :class:`JointAugment` instance. With ``skip_bad=True`` an unreadable file
    does not raise: call :meth:`validate` first to drop bad samples; one that
    still fails while loading is logged, recorded in ``skipped`` and replaced by
    the next readable sample (its ``index``/``path`` say which one was served).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int = 518,
        augment: Union[bool, JointAugment] = False,
        skip_bad: bool = False,
        mask_policy: str = "nonzero",
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    ):
        if mask_policy not in MASK_POLICIES:
            raise MoECLIPError(f"unknown mask policy {mask_policy!r}; choose one of "
                               f"{', '.join(MASK_POLICIES)}")
        self.samples: List[Sample] = list(samples)
        for s in self.samples:
            if _needs_mask(s) and not s.mask_path:
                raise MoECLIPError(
                    f"{s.image_path}: anomalous sample has no mask_path although its dataset "
                    f"has pixel ground truth (give the mask, or set has_pixel_gt=False)")
        self.image_size = int(image_size)
        if augment is True:
            augment = JointAugment()
        self.augment: Optional[JointAugment] = augment or None
        self.skip_bad = skip_bad
        self.mask_policy = mask_policy
        self.max_pixels = max_pixels
        self.skipped: List[Tuple[str, str]] = []
        self._size_warned = False

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Dict:
        s = self.samples[index]
        img = load_image(s.image_path, self.max_pixels)
        orig_size = (img.height, img.width)
        image = preprocess_image(img, self.image_size)
        if _needs_mask(s):
            m = load_mask(s.mask_path, policy=self.mask_policy, max_pixels=self.max_pixels)
            if m.shape != orig_size and not self._size_warned:
                self._size_warned = True
                logger.warning("mask %s is %dx%d but its image %s is %dx%d; both are resized "
                               "independently to %d (reported once)", s.mask_path, m.shape[0],
                               m.shape[1], s.image_path, orig_size[0], orig_size[1],
                               self.image_size)
            mask = preprocess_mask(m, self.image_size)
        else:
            mask = torch.zeros(1, self.image_size, self.image_size)
        if self.augment is not None:
            image, mask = self.augment(image, mask)
        return {
            "image": image,
            "mask": mask,
            "label": torch.tensor(int(s.label), dtype=torch.int64),
            "has_mask": bool(s.has_pixel_gt),
            "class_name": s.class_name,
            "path": s.image_path,
            "index": index,
            "orig_size": orig_size,
        }

    def __getitem__(self, index: int) -> Dict:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        if not self.skip_bad:
            return self._load(index)
        for step in range(n):
            j = (index + step) % n
            try:
                return self._load(j)
            except MoECLIPError as exc:
                path = self.samples[j].image_path
                self.skipped.append((path, str(exc)))
                logger.warning("skipping unreadable sample %s: %s", path, exc)
        raise MoECLIPError("no readable sample in the dataset (all files failed to load)")

    def _check(self, s: Sample) -> Optional[str]:
        """Reason why ``s`` cannot be loaded, or None. Images: header + verify; masks: full decode."""
        try:
            verify_image(s.image_path, self.max_pixels)
            if _needs_mask(s):
                load_mask(s.mask_path, policy=self.mask_policy, max_pixels=self.max_pixels)
        except MoECLIPError as exc:
            return str(exc)
        return None

    def validate(self, progress: bool = True) -> List[Tuple[str, str]]:
        """Open every file once; return ``[(image_path, reason)]`` for the bad samples.

        With ``skip_bad=True`` the bad samples are removed from the dataset (and
        added to ``skipped``); with ``skip_bad=False`` a MoECLIPError listing them
        is raised instead, so nothing is dropped silently.
        """
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is a dependency, but progress is only cosmetic
            tqdm = None
        items = self.samples
        if progress and tqdm is not None:
            items = tqdm(items, desc="validating files", unit="sample", file=sys.stderr)
        good: List[Sample] = []
        bad: List[Tuple[str, str]] = []
        for s in items:
            reason = self._check(s)
            if reason is None:
                good.append(s)
            else:
                bad.append((s.image_path, reason))
        if bad and not self.skip_bad:
            shown = "\n  ".join(reason for _, reason in bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise MoECLIPError(f"{len(bad)} of {len(self.samples)} samples cannot be read "
                               f"(use skip_bad to drop them):\n  {shown}{more}")
        self.samples = good
        self.skipped.extend(bad)
        if bad:
            logger.warning("dropped %d unreadable samples of %d", len(bad), len(good) + len(bad))
        return bad


def collate(batch: Sequence[Dict]) -> Dict:
    """Batch items: tensors stacked; ``class_name``/``path`` stay lists of str and
    ``orig_size`` a list of (H, W) tuples (the default collate would turn those
    into tensors per coordinate)."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "label": torch.stack([b["label"] for b in batch]),
        "has_mask": torch.tensor([b["has_mask"] for b in batch], dtype=torch.bool),
        "class_name": [b["class_name"] for b in batch],
        "path": [b["path"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.int64),
        "orig_size": [tuple(b["orig_size"]) for b in batch],
    }
