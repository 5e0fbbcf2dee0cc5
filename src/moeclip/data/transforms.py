"""Backbone pre-processing and the official joint image/mask training augmentation.

Pre-processing matches the official torchvision pipeline exactly (PIL bicubic
resize to SxS, ``ToTensor``, CLIP ``Normalize``; masks PIL nearest resize).

:class:`JointAugment` reproduces the official ``BaseDataset`` augmentation,
which runs *after* pre-processing on the 4-channel tensor ``cat([image, mask])``
with torchvision v1 transforms, in this order::

    RandomApply([RandomRotation(degrees(pi/6))], p=0.5)      # +-30 deg, NEAREST, fill 0
    RandomApply([RandomAffine(degrees=0, translate=(0.15, 0.15))], p=0.5)  # NEAREST, fill 0
    RandomHorizontalFlip(0.5)
    RandomVerticalFlip(0.5)

Consequences kept on purpose: the fill value 0 is applied to the *normalised*
image (so uncovered corners take the CLIP mean colour, not black), and NEAREST
interpolation keeps the mask exactly 0/1, so the official code does not (and we
do not) re-binarise it afterwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .._imports import light_torchvision
from .imageio import resize_mask, to_pil_rgb

light_torchvision()  # in the moeclip command: transforms only, not torchvision.models/ops (torch._dynamo)
import torchvision.transforms.functional as TF  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "preprocess_image",
    "preprocess_mask",
    "AugmentParams",
    "JointAugment",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SizeLike = Union[int, Tuple[int, int]]

#: The official code writes the rotation range as ``math.degrees(math.pi / 6)``
#: (29.999999999999996); using the same float keeps sampled angles bit-identical.
OFFICIAL_ROTATION_DEGREES = math.degrees(math.pi / 6)


def _as_hw(size: SizeLike) -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def preprocess_image(img, size: SizeLike = 518) -> torch.Tensor:
    """PIL image -> normalised float32 tensor (3, H, W), as the official transform.

    ``Resize((S, S), BICUBIC)`` on the PIL image (no aspect-ratio preservation),
    ``ToTensor`` (/255), ``Normalize(CLIP_MEAN, CLIP_STD)``. Non-RGB inputs
    (other PIL modes, numpy arrays) go through :func:`to_pil_rgb` first.
    """
    if not (isinstance(img, Image.Image) and img.mode == "RGB"):
        img = to_pil_rgb(img)
    h, w = _as_hw(size)
    img = TF.resize(img, [h, w], interpolation=InterpolationMode.BICUBIC)
    return TF.normalize(TF.to_tensor(img), CLIP_MEAN, CLIP_STD)


def preprocess_mask(mask: np.ndarray, size: SizeLike = 518) -> torch.Tensor:
    """Boolean (H, W) mask -> float32 0/1 tensor (1, S, S) by nearest resize.

    The mask is resized on its own, never aligned to the image at native size:
    the official code resizes both independently to SxS.
    """
    m = resize_mask(mask, size)
    return torch.from_numpy(m.astype(np.float32))[None]


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the augmentation; ``None`` / ``False`` means the step is skipped."""

    angle: Optional[float] = None
    translate: Optional[Tuple[int, int]] = None   # (tx, ty) in pixels, x = width
    translate_angle: float = 0.0                  # RandomAffine's (always 0) drawn angle
    hflip: bool = False
    vflip: bool = False


class JointAugment:
    """The official geometric training augmentation, applied jointly to image and mask.

    Random numbers come from ``generator`` when given, else from torch's global
    RNG. Parameters are drawn in the same order and with the same calls as
    torchvision's ``RandomApply`` / ``RandomRotation.get_params`` /
    ``RandomAffine.get_params`` / flips, so with the global RNG and a given
    ``torch.manual_seed`` the output equals the official pipeline bit for bit.

    Reproducibility in training: use the global RNG (the default) with a
    DataLoader. The DataLoader seeds each worker's global torch RNG from its own
    base seed, so ``torch.manual_seed(seed)`` (or ``DataLoader(generator=...)``)
    makes runs repeatable for any ``num_workers``. A ``generator`` is meant for
    single-process use (tests, ``num_workers=0``): each worker would receive a
    copy in the same state and repeat the same augmentations.
    """

    def __init__(
        self,
        degrees: float = OFFICIAL_ROTATION_DEGREES,
        translate: Sequence[float] = (0.15, 0.15),
        p_rotate: float = 0.5,
        p_translate: float = 0.5,
        p_hflip: float = 0.5,
        p_vflip: float = 0.5,
        generator: Optional[torch.Generator] = None,
    ):
        self.degrees = float(degrees)
        self.translate = (float(translate[0]), float(translate[1]))
        self.p_rotate = p_rotate
        self.p_translate = p_translate
        self.p_hflip = p_hflip
        self.p_vflip = p_vflip
        self.generator = generator

    def _rand(self) -> torch.Tensor:
        return torch.rand(1, generator=self.generator)

    def _uniform(self, low: float, high: float) -> float:
        return float(torch.empty(1).uniform_(low, high, generator=self.generator).item())

    def sample_params(self, height: int, width: int) -> AugmentParams:
        """Draw one set of parameters in the official order (skipped steps draw nothing more)."""
        angle = None
        if not self.p_rotate < self._rand():           # RandomApply: skip when p < u
            angle = self._uniform(-self.degrees, self.degrees)
        translate, translate_angle = None, 0.0
        if not self.p_translate < self._rand():
            translate_angle = self._uniform(-0.0, 0.0)  # RandomAffine draws its (zero) angle first
            max_dx = self.translate[0] * width
            max_dy = self.translate[1] * height
            tx = int(round(self._uniform(-max_dx, max_dx)))
            ty = int(round(self._uniform(-max_dy, max_dy)))
            translate = (tx, ty)
        hflip = bool(self._rand() < self.p_hflip)
        vflip = bool(self._rand() < self.p_vflip)
        return AugmentParams(angle, translate, translate_angle, hflip, vflip)

    @staticmethod
    def apply(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply ``params`` to a (C, H, W) tensor with the official interpolation and fill."""
        fill = [0.0] * x.shape[-3]
        if params.angle is not None:
            x = TF.rotate(x, params.angle, InterpolationMode.NEAREST, False, None, fill)
        if params.translate is not None:
            x = TF.affine(x, params.translate_angle, list(params.translate), 1.0, [0.0, 0.0],
                          interpolation=InterpolationMode.NEAREST, fill=fill, center=None)
        if params.hflip:
            x = TF.hflip(x)
        if params.vflip:
            x = TF.vflip(x)
        return x

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Augment a (3, H, W) image and its (1, H, W) mask with one shared draw."""
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} differ in size")
        x = torch.cat([image, mask.to(image.dtype)], dim=0)
        x = self.apply(x, self.sample_params(x.shape[-2], x.shape[-1]))
        return x[:3], x[3:4]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(degrees={self.degrees:g}, translate={self.translate}, "
                f"p_rotate={self.p_rotate}, p_translate={self.p_translate}, "
                f"p_hflip={self.p_hflip}, p_vflip={self.p_vflip})")
