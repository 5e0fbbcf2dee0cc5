"""Evaluation pictures: image | heat map | ground truth side by side (``moeclip test --visualize``).

Colours come from :mod:`moeclip.inference.render`; each map is stretched to its own range here,
since a triptych shows where one map peaks, not how it compares with others.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..inference.render import overlay, save_png


def save_triptych(image_path: str, amap: np.ndarray, mask: Optional[np.ndarray], out_path: Path,
                  size: int = 256) -> None:
    """image | heat-map overlay | ground truth, side by side (raw pixels, as the dataset reads them)."""
    from ..data.imageio import load_image

    img = load_image(image_path).resize((size, size), Image.BICUBIC)
    small = np.asarray(Image.fromarray(np.asarray(amap, np.float32)).resize((size, size), Image.BILINEAR))
    over = overlay(img, small, stretch_each=True)
    gt = np.zeros((size, size), np.uint8) if mask is None else \
        np.asarray(Image.fromarray((np.asarray(mask) > 0.5).astype(np.uint8) * 255).resize((size, size), Image.NEAREST))
    panels = [np.asarray(img), np.asarray(over), np.stack([gt] * 3, -1)]
    gap = np.full((size, 6, 3), 255, np.uint8)
    save_png(Image.fromarray(np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)), out_path)
