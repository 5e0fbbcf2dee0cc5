"""Heat-map overlays of anomaly maps on images (matplotlib colormaps, no OpenCV)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image


def heatmap_rgb(amap: np.ndarray, vmin: Optional[float] = None, vmax: Optional[float] = None) -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8 with the 'jet' colormap, min-max scaled unless limits are given."""
    from matplotlib import colormaps

    a = np.asarray(amap, dtype=np.float32)
    lo = float(a.min()) if vmin is None else vmin
    hi = float(a.max()) if vmax is None else vmax
    a = np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1)
    return (colormaps["jet"](a)[..., :3] * 255).astype(np.uint8)


def overlay(image: Image.Image, amap: np.ndarray, alpha: float = 0.5, **limits) -> Image.Image:
    """Blend the heat map over the image (the map is resized to the image)."""
    image = image.convert("RGB")
    heat = Image.fromarray(heatmap_rgb(amap, **limits)).resize(image.size, Image.BILINEAR)
    return Image.blend(image, heat, alpha)


def save_triptych(image_path: str, amap: np.ndarray, mask: Optional[np.ndarray], out_path: Path,
                  size: int = 256) -> None:
    """image | heat-map overlay | ground truth, side by side."""
    from ..data.imageio import load_image

    img = load_image(image_path).resize((size, size), Image.BICUBIC)
    over = overlay(img, np.asarray(Image.fromarray(np.asarray(amap, np.float32)).resize((size, size), Image.BILINEAR)))
    gt = np.zeros((size, size), np.uint8) if mask is None else \
        np.asarray(Image.fromarray((np.asarray(mask) > 0.5).astype(np.uint8) * 255).resize((size, size), Image.NEAREST))
    panels = [np.asarray(img), np.asarray(over), np.stack([gt] * 3, -1)]
    gap = np.full((size, 6, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)).save(out_path)
