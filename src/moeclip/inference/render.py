"""Pictures of anomaly maps: heat maps, overlays, masks, PNG bytes (the one place colours are chosen).

A heat map colours a map already on [0, 1]. Which [0, 1] is a choice of the caller:

- :meth:`~moeclip.inference.postprocess.PostProcessor.unit_map`: a deployment's calibrated scale,
  so colours compare across images, else the map's own range (``map_scale`` says which);
  ``predict`` and ``serve`` use it;
- ``stretch=True``: each map min-max scaled on its own (or to given ``lo``/``hi``), which shows
  the structure of one map whatever its level; ``moeclip test --visualize`` uses it.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..fileio import atomic_open

#: The colormap of heat maps and overlays.
COLORMAP = "jet"


def stretch(amap, lo: Optional[float] = None, hi: Optional[float] = None) -> np.ndarray:
    """Min-max to [0, 1] with the map's own range (or ``lo``/``hi`` where given), clipped."""
    a = np.asarray(amap, dtype=np.float32)
    lo = float(a.min()) if lo is None else float(lo)
    hi = float(a.max()) if hi is None else float(hi)
    return np.clip((a - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def heatmap_rgb(unit, stretch_each: bool = False) -> np.ndarray:
    """[0, 1] map -> uint8 (H, W, 3) colours of :data:`COLORMAP` (matplotlib, no pyplot).

    ``stretch_each`` min-max scales the map on its own first (see the module docstring).
    """
    import matplotlib

    unit = stretch(unit) if stretch_each else np.clip(np.asarray(unit, dtype=np.float32), 0.0, 1.0)
    cmap = matplotlib.colormaps[COLORMAP]
    return (cmap(unit)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def overlay(image: Image.Image, unit, alpha: float = 0.5, stretch_each: bool = False) -> Image.Image:
    """The heat map blended over the image (the map is resized to the image when they differ)."""
    heat = Image.fromarray(heatmap_rgb(unit, stretch_each), mode="RGB")
    if heat.size != image.size:
        heat = heat.resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, alpha)


def mask_image(mask) -> Image.Image:
    """A 0/255 (or boolean) mask as a mode-L picture."""
    m = np.asarray(mask)
    if m.dtype != np.uint8:
        m = (m.astype(bool) * 255).astype(np.uint8)
    return Image.fromarray(m, mode="L")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    """A PNG ``data:`` URL (what the web service returns)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write a PNG atomically: a crash never leaves a half-written picture."""
    with atomic_open(path, "wb") as fh:
        image.save(fh, format="PNG")
