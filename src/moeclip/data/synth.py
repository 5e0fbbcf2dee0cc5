"""Procedural anomaly data for the offline demo and for tests (``moeclip datasets synth``).

Zero-shot transfer comes from the *diversity* of the auxiliary data (see the demo notes): a
model trained on a few fixed textures learns those textures, one trained on a new random
draw per sample learns what "normal" versus "defective" looks like. So every category here is
a continuous random *family* (stripes of any colour, frequency and orientation; discs of any
size, colour and lighting; ...) and every sample is a fresh draw from it.

Each draw is built in two steps so that the same base can be rendered with and without a
defect (``draw_pair``): a base (surface, coverage alpha, background, sensor grain) and then a
defect painted onto it, whose mask is exactly where the defect's blending weight is
significant. Everything is numpy + PIL + scipy.ndimage and vectorised: a few ms per image.

The on-disk layout is the MVTec one the rest of the toolkit scans::

    DIR/<category>/train/good/NNN.png                (only when n_train > 0)
    DIR/<category>/test/good/NNN.png
    DIR/<category>/test/<defect_type>/NNN.png
    DIR/<category>/ground_truth/<defect_type>/NNN_mask.png   (0/255, single channel)
    DIR/descriptions.json    category -> object description
    DIR/synth.json           generator parameters and seed
"""
from __future__ import annotations

import colorsys
import json
import math
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import MoECLIPError

__all__ = [
    "DEFECT_TYPES", "TEXTURE_FAMILIES", "OBJECT_FAMILIES",
    "DEFAULT_TRAIN_CATEGORIES", "DEFAULT_HELDOUT_CATEGORIES",
    "list_families", "family_info", "defects_for", "resolve_categories",
    "draw_sample", "draw_pair", "draw_batch", "generate_dataset",
    "add_synth_arguments", "run_synth",
]

GENERATOR_VERSION = 1

DEFECT_TYPES: Tuple[str, ...] = ("scratch", "hole", "stain", "spot", "crack", "missing")
_SURFACE_DEFECTS = ("scratch", "hole", "stain", "spot", "crack")  # "missing" needs an object

TEXTURE_FAMILIES: Tuple[str, ...] = (
    "stripes", "checker", "marble", "dots", "gradient", "cells", "weave", "wood")
OBJECT_FAMILIES: Tuple[str, ...] = ("disc", "ring", "tile", "gear", "nut", "pill")

# Held-out families are never drawn in training, so the demo measures transfer to unseen
# textures *and* unseen object shapes.
DEFAULT_HELDOUT_CATEGORIES: Tuple[str, ...] = ("weave", "wood", "nut", "pill")
DEFAULT_TRAIN_CATEGORIES: Tuple[str, ...] = tuple(
    f for f in TEXTURE_FAMILIES + OBJECT_FAMILIES if f not in DEFAULT_HELDOUT_CATEGORIES)

_DESCRIPTIONS = {
    "stripes": "striped fabric", "checker": "checkered tiles", "marble": "marble surface",
    "dots": "polka-dot fabric", "gradient": "painted surface", "cells": "cobblestone pavement",
    "weave": "woven fabric", "wood": "wood grain",
    "disc": "metal disc", "ring": "metal washer", "tile": "rounded square tile",
    "gear": "gear wheel", "nut": "hexagonal nut", "pill": "capsule pill",
}

RngLike = Union[np.random.Generator, int]


# --------------------------------------------------------------------------- helpers

class _Canvas:
    """Pixel-centre coordinates shared by all renderers of one image size."""

    def __init__(self, size: int, defect_scale: float = 1.0):
        self.size = size
        self.defect_scale = defect_scale  # defects' dimensions are drawn for an image this much larger
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self.yy, self.xx = yy + 0.5, xx + 0.5


def _rand_color(rng, s=(0.15, 0.85), v=(0.25, 0.95), h=None) -> np.ndarray:
    hue = rng.uniform(0, 1) if h is None else h % 1.0
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*s), rng.uniform(*v)), np.float32)


def _lum(c) -> np.ndarray:
    return np.asarray(c)[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)


def _lerp(a, b, t):
    """Blend colours/images ``a`` -> ``b`` by weight ``t`` (HxW or scalar)."""
    t = np.asarray(t, np.float32)
    if t.ndim == 2:
        t = t[..., None]
    return a + (b - a) * t


def _noise(rng, size: int, sigma: float) -> np.ndarray:
    """Smooth, tileable, zero-mean unit-variance noise with feature size ~``sigma`` px."""
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32),
                                max(sigma, 0.3), mode="wrap")
    return (n - n.mean()) / (n.std() + 1e-6)


def _fractal(rng, size: int, sigma: float, octaves: int = 3) -> np.ndarray:
    out = np.zeros((size, size), np.float32)
    for k in range(octaves):
        out += _noise(rng, size, sigma / 2 ** k) * 0.5 ** k
    return out / (out.std() + 1e-6)


def _rotated(cv: _Canvas, theta: float, cx: float = 0.0, cy: float = 0.0):
    """Coordinates (in px) rotated by ``theta`` around (cx, cy)."""
    c, s = math.cos(theta), math.sin(theta)
    dx, dy = cv.xx - cx, cv.yy - cy
    return dx * c + dy * s, -dx * s + dy * c


def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _aa(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a signed distance field in px (negative inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _dist_to_polyline(cv: _Canvas, pts: np.ndarray) -> np.ndarray:
    """Distance (px) from every pixel to a polyline given as (K, 2) x/y points."""
    a, b = pts[:-1].astype(np.float32), pts[1:].astype(np.float32)
    ab = b - a
    px, py = cv.xx[..., None], cv.yy[..., None]
    t = ((px - a[:, 0]) * ab[:, 0] + (py - a[:, 1]) * ab[:, 1]) / np.maximum((ab ** 2).sum(1), 1e-6)
    t = np.clip(t, 0.0, 1.0)
    dx, dy = px - (a[:, 0] + t * ab[:, 0]), py - (a[:, 1] + t * ab[:, 1])
    return np.sqrt((dx * dx + dy * dy).min(axis=-1))


def _as_rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


# --------------------------------------------------------------------------- textures
# Each renderer: (rng, canvas) -> HxWx3 float32 in roughly [0, 1].

def _tex_stripes(rng, cv):
    size = cv.size
    u, _ = _rotated(cv, rng.uniform(0, math.pi))
    freq = rng.uniform(2.5, 12.0) / size
    warp = rng.uniform(0, 1.5) * _noise(rng, size, size / rng.uniform(2, 6))
    wave = np.sin(2 * math.pi * freq * u + warp + rng.uniform(0, 2 * math.pi))
    sharp = rng.uniform(0.5, 8.0)
    t = 0.5 + 0.5 * np.tanh(sharp * wave) / math.tanh(sharp)
    c1, c2 = _rand_color(rng), _rand_color(rng)
    img = _lerp(c1, c2, t)
    if rng.random() < 0.4:  # a second, thinner stripe set (pinstripes)
        v, _ = _rotated(cv, rng.uniform(0, math.pi))
        thin = np.cos(2 * math.pi * rng.uniform(4, 16) / size * v) > rng.uniform(0.85, 0.97)
        img = _lerp(img, _rand_color(rng), thin * rng.uniform(0.4, 0.9))
    return img


def _tex_checker(rng, cv):
    size = cv.size
    u, v = _rotated(cv, rng.uniform(0, math.pi / 2) if rng.random() < 0.6 else 0.0)
    n = rng.uniform(2.5, 10.0) / size
    c1, c2 = _rand_color(rng), _rand_color(rng)
    mode = rng.integers(3)
    if mode == 0:  # checkerboard
        k = rng.uniform(2, 12)
        t = 0.5 + 0.5 * np.tanh(k * np.sin(2 * math.pi * n * u) * np.sin(2 * math.pi * n * v))
        return _lerp(c1, c2, t)
    fu, fv = np.abs((u * n) % 1.0 - 0.5), np.abs((v * n) % 1.0 - 0.5)
    w = rng.uniform(0.03, 0.15)
    line = np.maximum(_smoothstep(0.5 - w, 0.5 - w + 0.03, fu), _smoothstep(0.5 - w, 0.5 - w + 0.03, fv))
    if mode == 1:  # grid lines on a plain ground
        return _lerp(c1, c2, line)
    # tiles: per-tile colour jitter plus grout
    iu, iv = np.floor(u * n).astype(np.int64), np.floor(v * n).astype(np.int64)
    table = rng.uniform(-1, 1, (32, 32)).astype(np.float32)
    jit = table[iu % 32, iv % 32] * rng.uniform(0.03, 0.15)
    return _lerp(c1 + jit[..., None], c2, line)


def _tex_marble(rng, cv):
    size = cv.size
    u, _ = _rotated(cv, rng.uniform(0, math.pi))
    turb = _fractal(rng, size, size / rng.uniform(3, 8))
    s = np.sin(2 * math.pi * rng.uniform(0.5, 4.0) / size * u + rng.uniform(1.0, 4.0) * turb)
    vein = np.exp(-(s ** 2) * rng.uniform(4, 30))
    base = _rand_color(rng, s=(0.0, 0.35), v=(0.55, 0.95))
    mid = np.clip(base + rng.uniform(-0.15, 0.15, 3).astype(np.float32), 0, 1)
    img = _lerp(base, mid, 0.5 + 0.25 * _noise(rng, size, size / 10))
    return _lerp(img, _rand_color(rng, v=(0.1, 0.6)), vein * rng.uniform(0.5, 1.0))


def _tex_dots(rng, cv):
    size = cv.size
    u, v = _rotated(cv, rng.uniform(0, math.pi))
    spacing = size / rng.uniform(4, 10)
    row = np.floor(v / spacing)
    if rng.random() < 0.5:  # hexagonal packing
        u = u + (row % 2) * spacing / 2
    col = np.floor(u / spacing)
    du, dv = (u / spacing) % 1.0 - 0.5, (v / spacing) % 1.0 - 0.5
    table = rng.uniform(0.8, 1.2, (32, 32)).astype(np.float32)
    radius = rng.uniform(0.15, 0.4) * table[col.astype(np.int64) % 32, row.astype(np.int64) % 32]
    dist = np.sqrt(du * du + dv * dv)
    dot = _aa((dist - radius) * spacing)
    bg, fg = _rand_color(rng), _rand_color(rng)
    shade = 1.0 - rng.uniform(0, 0.4) * (dist / np.maximum(radius, 1e-3)) ** 2
    return _lerp(bg, fg * shade[..., None], dot)


def _tex_gradient(rng, cv):
    size = cv.size
    c1, c2 = _rand_color(rng), _rand_color(rng)
    if rng.random() < 0.5:
        u, _ = _rotated(cv, rng.uniform(0, 2 * math.pi), size / 2, size / 2)
        t = u / size + 0.5
    else:
        cx, cy = rng.uniform(-0.2, 1.2, 2) * size
        t = np.sqrt((cv.xx - cx) ** 2 + (cv.yy - cy) ** 2) / (size * rng.uniform(0.6, 1.4))
    t = np.clip(t + rng.uniform(0.02, 0.12) * _fractal(rng, size, size / rng.uniform(4, 12)), 0, 1)
    return _lerp(c1, c2, t)


def _tex_cells(rng, cv):
    size = cv.size
    n = int(rng.integers(8, 36))
    pts = rng.uniform(0, size, (n, 2)).astype(np.float32)
    d = np.sqrt((cv.xx[..., None] - pts[:, 0]) ** 2 + (cv.yy[..., None] - pts[:, 1]) ** 2)
    two = np.partition(d, 1, axis=-1)
    d1, d2 = two[..., 0], two[..., 1]
    idx = d.argmin(axis=-1)
    base = _rand_color(rng)
    jit = rng.uniform(-1, 1, (n, 3)).astype(np.float32) * rng.uniform(0.03, 0.2)
    img = np.clip(base + jit[idx], 0, 1)
    cell = size / math.sqrt(n)
    img = img * (1 - rng.uniform(0, 0.5) * np.clip(d1 / cell, 0, 1))[..., None]  # pebble shading
    border = 1 - _smoothstep(0.0, rng.uniform(1.0, 3.0), d2 - d1)
    return _lerp(img, _rand_color(rng, v=(0.05, 0.9)), border)


def _tex_weave(rng, cv):
    size = cv.size
    theta = rng.uniform(-0.25, 0.25) if rng.random() < 0.7 else rng.uniform(0, math.pi)
    u, v = _rotated(cv, theta)
    n = rng.uniform(6, 16) / size
    iu, iv = np.floor(u * n).astype(np.int64), np.floor(v * n).astype(np.int64)
    fu, fv = (u * n) % 1.0, (v * n) % 1.0
    period = int(rng.choice([2, 3, 4]))  # plain weave or twill
    over = ((iu + iv) % period) < period / 2
    prof_h = np.sin(math.pi * fv) ** rng.uniform(0.3, 1.0)  # across a horizontal thread
    prof_v = np.sin(math.pi * fu) ** rng.uniform(0.3, 1.0)
    c1 = _rand_color(rng)
    c2 = c1 if rng.random() < 0.4 else _rand_color(rng)
    fibre = 1 + 0.08 * _noise(rng, size, 0.7)
    h = c1 * (0.45 + 0.55 * prof_h * fibre)[..., None]
    w = c2 * (0.45 + 0.55 * prof_v * fibre)[..., None]
    return np.where(over[..., None], h, w)


def _tex_wood(rng, cv):
    size = cv.size
    theta = rng.uniform(0, math.pi)
    u, v = _rotated(cv, theta, size / 2, size / 2)
    stretch = rng.uniform(0.08, 1.0)
    cu, cv_ = rng.uniform(-1.0, 1.0) * size, rng.uniform(-0.3, 0.3) * size / stretch
    r = np.sqrt((u - cu) ** 2 + ((v - cv_) * stretch) ** 2)
    r = r + rng.uniform(1.0, 6.0) * _fractal(rng, size, size / rng.uniform(4, 10))
    ring = (r / (size / rng.uniform(4, 14))) % 1.0
    ring = ring ** rng.uniform(0.5, 3.0)
    hue = rng.uniform(0.03, 0.12) if rng.random() < 0.7 else rng.uniform(0, 1)
    light = _rand_color(rng, s=(0.3, 0.7), v=(0.55, 0.95), h=hue)
    dark = _rand_color(rng, s=(0.4, 0.9), v=(0.15, 0.5), h=hue + rng.uniform(-0.03, 0.03))
    img = _lerp(light, dark, ring)
    grain = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), (0.4, 3.0))
    grain = ndimage.rotate(grain, -math.degrees(theta), reshape=False, mode="wrap", order=1)
    return img * (1 + rng.uniform(0.03, 0.12) * grain / (grain.std() + 1e-6))[..., None]


_TEXTURES: Dict[str, Callable] = {
    "stripes": _tex_stripes, "checker": _tex_checker, "marble": _tex_marble, "dots": _tex_dots,
    "gradient": _tex_gradient, "cells": _tex_cells, "weave": _tex_weave, "wood": _tex_wood,
}


# --------------------------------------------------------------------------- objects
# Each shape: (rng, canvas, cx, cy, R) -> (sdf in px, negative inside; tint HxW or None).

def _shape_disc(rng, cv, cx, cy, R):
    return np.sqrt((cv.xx - cx) ** 2 + (cv.yy - cy) ** 2) - R, None


def _shape_ring(rng, cv, cx, cy, R):
    d = np.sqrt((cv.xx - cx) ** 2 + (cv.yy - cy) ** 2)
    return np.maximum(d - R, R * rng.uniform(0.35, 0.65) - d), None


def _shape_tile(rng, cv, cx, cy, R):
    u, v = _rotated(cv, rng.uniform(0, math.pi / 2), cx, cy)
    half = R * rng.uniform(0.75, 0.9) * np.array([1.0, rng.uniform(0.7, 1.0)], np.float32)
    rc = R * rng.uniform(0.05, 0.4)
    qx, qy = np.abs(u) - (half[0] - rc), np.abs(v) - (half[1] - rc)
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0) - rc, None


def _polygon_sdf(cv, cx, cy, apothem, n, rot):
    d = np.sqrt((cv.xx - cx) ** 2 + (cv.yy - cy) ** 2)
    ang = np.arctan2(cv.yy - cy, cv.xx - cx) - rot
    sector = 2 * math.pi / n
    local = (ang % sector) - sector / 2
    return d * np.cos(local) - apothem


def _shape_gear(rng, cv, cx, cy, R):
    d = np.sqrt((cv.xx - cx) ** 2 + (cv.yy - cy) ** 2)
    ang = np.arctan2(cv.yy - cy, cv.xx - cx)
    teeth = int(rng.integers(6, 16))
    depth = R * rng.uniform(0.1, 0.22)
    square = np.tanh(rng.uniform(2, 6) * np.sin(teeth * ang + rng.uniform(0, 2 * math.pi)))
    outer = d - (R - depth + depth * 0.5 * (1 + square))
    hole = R * rng.uniform(0.15, 0.35) - d
    return np.maximum(outer, hole), None


def _shape_nut(rng, cv, cx, cy, R):
    apothem = R * math.cos(math.pi / 6) * rng.uniform(0.92, 1.0)
    poly = _polygon_sdf(cv, cx, cy, apothem, 6, rng.uniform(0, math.pi / 3))
    d = np.sqrt((cv.xx - cx) ** 2 + (cv.yy - cy) ** 2)
    r_hole = R * rng.uniform(0.35, 0.5)
    # darker thread band around the hole
    tint = 1 - 0.35 * _smoothstep(r_hole + R * 0.15, r_hole, d)
    return np.maximum(poly, r_hole - d), tint


def _shape_pill(rng, cv, cx, cy, R):
    theta = rng.uniform(0, math.pi)
    r = R * rng.uniform(0.35, 0.55)
    h = max(R - r, 1.0)
    dx, dy = math.cos(theta) * h, math.sin(theta) * h
    seg = _dist_to_polyline(cv, np.array([[cx - dx, cy - dy], [cx + dx, cy + dy]]))
    along = (cv.xx - cx) * math.cos(theta) + (cv.yy - cy) * math.sin(theta)
    return seg - r, along  # "along" picks the two-tone halves in _draw_object


_SHAPES: Dict[str, Callable] = {
    "disc": _shape_disc, "ring": _shape_ring, "tile": _shape_tile,
    "gear": _shape_gear, "nut": _shape_nut, "pill": _shape_pill,
}


# --------------------------------------------------------------------------- base images

@dataclass
class _Base:
    """A defect-free draw, kept in layers so defects can paint on or cut into it."""

    fg: np.ndarray               # HxWx3 surface (texture, or object material over the frame)
    alpha: np.ndarray            # HxW coverage of fg (all ones for textures)
    bg: Optional[np.ndarray]     # HxWx3 background seen where alpha < 1 (objects only)
    grain: np.ndarray            # HxWx3 sensor noise, added last
    interior: np.ndarray         # HxW bool: where defects may be centred
    boundary: Optional[np.ndarray] = None  # HxW bool outer rim of the object (for "missing")
    radius: float = 0.0          # object radius in px (0 for textures)

    def render(self, fg=None, alpha=None) -> np.ndarray:
        fg = self.fg if fg is None else fg
        alpha = self.alpha if alpha is None else alpha
        img = fg if self.bg is None else _lerp(self.bg, fg, alpha)
        return np.clip(img + self.grain, 0.0, 1.0)


def _grain(rng, size):
    return (rng.standard_normal((size, size, 3)) * rng.uniform(0.005, 0.025)).astype(np.float32)


def _draw_texture(family, rng, cv) -> _Base:
    fg = np.clip(_TEXTURES[family](rng, cv), 0, 1).astype(np.float32)
    m = max(2, int(cv.size * 0.1))
    interior = np.zeros((cv.size, cv.size), bool)
    interior[m:-m, m:-m] = True
    ones = np.ones((cv.size, cv.size), np.float32)
    return _Base(fg=fg, alpha=ones, bg=None, grain=_grain(rng, cv.size), interior=interior)


def _background(rng, cv) -> np.ndarray:
    """Plain-ish backdrop: a colour, optionally with a faint training texture on it."""
    colour = _rand_color(rng, s=(0.0, 0.6), v=(0.1, 0.95))
    kind = rng.integers(4)
    if kind == 0:
        return np.broadcast_to(colour, (cv.size, cv.size, 3)).astype(np.float32)
    tex = {1: _tex_gradient, 2: _tex_stripes, 3: _tex_checker}[int(kind)](rng, cv)
    return np.clip(colour + rng.uniform(0.05, 0.2) * (tex - tex.mean((0, 1))), 0, 1).astype(np.float32)


def _draw_object(family, rng, cv) -> _Base:
    size = cv.size
    bg = _background(rng, cv)
    R = size * rng.uniform(0.26, 0.38)
    cx, cy = size / 2 + rng.uniform(-0.07, 0.07, 2) * size
    sdf, extra = _SHAPES[family](rng, cv, cx, cy, R)
    alpha = _aa(sdf).astype(np.float32)

    # material: a colour (often metallic grey), brushed/mottled, lit from a random side
    metal = rng.random() < 0.4
    colour = _rand_color(rng, s=(0.0, 0.15) if metal else (0.3, 0.9), v=(0.35, 0.95))
    if family == "pill":
        other = colour if rng.random() < 0.3 else _rand_color(rng, s=(0.1, 0.9), v=(0.5, 1.0))
        fg = _lerp(colour, other, (extra > 0).astype(np.float32))
    else:
        fg = np.broadcast_to(colour, (size, size, 3)).astype(np.float32)
        if extra is not None:
            fg = fg * extra[..., None]
    streak = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32),
                                     (0.5, rng.uniform(0.5, 6.0)))
    fg = fg * (1 + rng.uniform(0.0, 0.12) * streak / (streak.std() + 1e-6))[..., None]
    la = rng.uniform(0, 2 * math.pi)
    lx, ly = math.cos(la), math.sin(la)
    side = ((cv.xx - cx) * lx + (cv.yy - cy) * ly) / R
    edge = np.clip(-sdf / (0.18 * R), 0, 1)
    shade = (1 - rng.uniform(0.1, 0.3) * side) * (0.65 + 0.35 * np.sqrt(edge))
    hx, hy = cx - 0.4 * R * lx, cy - 0.4 * R * ly
    spec = np.exp(-((cv.xx - hx) ** 2 + (cv.yy - hy) ** 2) / (2 * (0.25 * R) ** 2))
    fg = fg * shade[..., None] + (rng.uniform(0.05, 0.35) * spec)[..., None]
    fg = np.clip(fg, 0, 1).astype(np.float32)

    solid = alpha > 0.5
    interior = ndimage.binary_erosion(alpha > 0.99, iterations=max(1, size // 48))
    if not interior.any():  # a thin ring at a tiny size: any solid pixel will do
        interior = solid
    filled = ndimage.binary_fill_holes(solid)
    boundary = filled & ~ndimage.binary_erosion(filled)
    return _Base(fg=fg, alpha=alpha, bg=bg, grain=_grain(rng, size), interior=interior,
                 boundary=boundary, radius=float(R))


def _draw_base(family: str, rng, size: int) -> _Base:
    cv = _Canvas(size)
    if family in _TEXTURES:
        return _draw_texture(family, rng, cv)
    return _draw_object(family, rng, cv)


# --------------------------------------------------------------------------- defects
# Each: (rng, base, canvas) -> (new fg, new alpha or None, mask bool).

def _pick(rng, where: np.ndarray) -> Tuple[float, float]:
    ys, xs = np.nonzero(where)
    k = rng.integers(len(xs))
    return float(xs[k]) + 0.5, float(ys[k]) + 0.5


def _local_colour(fg, weight) -> np.ndarray:
    w = weight[..., None]
    return (fg * w).sum((0, 1)) / max(float(weight.sum()), 1e-6)


def _contrasting(rng, ref, min_dist=0.4, **kw) -> np.ndarray:
    """A random colour at least ``min_dist`` (RGB distance) from ``ref``: visible but not always bright."""
    for _ in range(16):
        c = _rand_color(rng, **kw)
        if np.linalg.norm(c - ref) >= min_dist:
            return c
    return np.full(3, 0.05 if _lum(ref) > 0.5 else 0.95, np.float32)


def _dark_or_bright(rng, ref) -> np.ndarray:
    """Near-black or near-white, whichever the surface is not; sometimes the other way if it still shows."""
    dark = _lum(ref) > 0.45
    if rng.random() < 0.25 and 0.3 < _lum(ref) < 0.6:
        dark = not dark
    g = rng.uniform(0.0, 0.15) if dark else rng.uniform(0.85, 1.0)
    tint = rng.uniform(-0.05, 0.05, 3).astype(np.float32)
    return np.clip(g + tint, 0, 1).astype(np.float32)


# A pixel belongs to a defect's mask once the defect contributes this much of its colour:
# low enough that the anti-aliased fringe left outside the mask changes the image only faintly.
_MASK_AT = 0.35
_STAIN_MASK_AT = 0.2  # stains fade out gradually; count their visible skirt as defect


def _stroke_mask(base, cv, dist, width):
    a = np.clip(width / 2 + 0.5 - dist, 0, 1) * base.alpha
    return a, a >= _MASK_AT


def _defect_scratch(rng, base, cv):
    size = cv.size * cv.defect_scale
    x0, y0 = _pick(rng, base.interior)
    theta = rng.uniform(0, 2 * math.pi)
    length = size * rng.uniform(0.2, 0.55)
    bend = rng.uniform(-0.35, 0.35) * length
    p0 = np.array([x0, y0])
    d = np.array([math.cos(theta), math.sin(theta)])
    nrm = np.array([-d[1], d[0]])
    p2 = p0 + d * length
    p1 = p0 + d * length / 2 + nrm * bend
    t = np.linspace(0, 1, 20)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # quadratic Bezier
    width = rng.uniform(1.0, 2.6) * size / 96
    a, mask = _stroke_mask(base, cv, _dist_to_polyline(cv, pts), width)
    ref = _local_colour(base.fg, a)
    colour = _dark_or_bright(rng, ref) if rng.random() < 0.7 else _contrasting(rng, ref)
    fg = _lerp(base.fg, colour, a * rng.uniform(0.75, 1.0))
    return fg, None, mask


def _defect_crack(rng, base, cv):
    size = cv.size * cv.defect_scale
    step = size * rng.uniform(0.025, 0.04)

    def walk(x, y, theta, n):
        pts = [(x, y)]
        for _ in range(n):
            theta += rng.uniform(-0.7, 0.7)
            x, y = x + step * math.cos(theta), y + step * math.sin(theta)
            pts.append((x, y))
        return np.array(pts)

    x0, y0 = _pick(rng, base.interior)
    main = walk(x0, y0, rng.uniform(0, 2 * math.pi), int(rng.integers(8, 18)))
    dist = _dist_to_polyline(cv, main)
    for _ in range(int(rng.integers(0, 3))):  # side branches
        k = int(rng.integers(1, len(main) - 1))
        seg = main[k + 1] - main[k - 1]
        theta = math.atan2(seg[1], seg[0]) + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
        dist = np.minimum(dist, _dist_to_polyline(cv, walk(*main[k], theta, int(rng.integers(3, 8)))))
    width = rng.uniform(0.9, 1.8) * size / 96
    a, mask = _stroke_mask(base, cv, dist, width)
    ref = _local_colour(base.fg, a)
    if _lum(ref) > 0.3:
        target = base.fg * rng.uniform(0.0, 0.25)
    else:  # a crack in a dark surface shows its lighter broken edges
        target = np.clip(base.fg + rng.uniform(0.45, 0.7), 0, 1)
    return _lerp(base.fg, target, a), None, mask


def _defect_hole(rng, base, cv):
    size = cv.size * cv.defect_scale
    cx, cy = _pick(rng, base.interior)
    u, v = _rotated(cv, rng.uniform(0, math.pi), cx, cy)
    rx, ry = size * rng.uniform(0.035, 0.09), size * rng.uniform(0.035, 0.09)
    rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    sdf = (rho - 1) * min(rx, ry)  # approx px distance to the ellipse edge
    rim_w = rng.uniform(0.8, 2.0) * size / 96
    inside = _aa(sdf) * base.alpha
    whole = _aa(sdf - rim_w) * base.alpha
    ref = _local_colour(base.fg, whole)
    dark = _lum(ref) > 0.35 or rng.random() < 0.3
    depth = rng.uniform(0.0, 0.18) if dark else rng.uniform(0.8, 1.0)
    # a dark pit (or bright through-hole) shaded towards one side, inside a raised rim
    shading = 1 + 0.6 * np.clip(u / rx, -1, 1)[..., None] * (1 if dark else -0.3)
    pit = np.clip(depth * shading + rng.uniform(-0.04, 0.04, 3).astype(np.float32), 0, 1)
    rim = np.clip(base.fg * rng.uniform(1.3, 1.7) + 0.1, 0, 1) if dark else base.fg * 0.4
    fg = _lerp(base.fg, rim, whole)
    fg = _lerp(fg, pit, inside)
    return fg, None, whole >= _MASK_AT


def _blob_field(rng, cv, cx, cy, rx, ry, rough):
    """Irregular blob: positive inside, roughly px-scaled near the edge."""
    u, v = _rotated(cv, rng.uniform(0, math.pi), cx, cy)
    rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    n = _noise(rng, cv.size, max(min(rx, ry) / 2.0, 0.8))
    return (1 - rho + rough * 0.35 * n) * min(rx, ry)


def _defect_stain(rng, base, cv):
    size = cv.size * cv.defect_scale
    cx, cy = _pick(rng, base.interior)
    rx, ry = size * rng.uniform(0.07, 0.17), size * rng.uniform(0.07, 0.17)
    field = _blob_field(rng, cv, cx, cy, rx, ry, rough=rng.uniform(0.5, 1.5))
    soft = rng.uniform(1.0, 4.0) * size / 96
    opacity = rng.uniform(0.55, 0.9)
    a = _smoothstep(0.0, soft, field).astype(np.float32) * opacity * base.alpha
    ref = _local_colour(base.fg, a)
    colour = _contrasting(rng, ref, min_dist=0.45, s=(0.2, 0.9), v=(0.1, 0.9))
    # the stain keeps some of the surface's own texture showing through
    target = np.clip(colour + 0.35 * (base.fg - ref), 0, 1)
    fg = _lerp(base.fg, target, a)
    return fg, None, a >= _STAIN_MASK_AT


def _defect_spot(rng, base, cv):
    size = cv.size * cv.defect_scale
    cx, cy = _pick(rng, base.interior)
    field = np.full((cv.size, cv.size), -1e3, np.float32)
    spread = size * rng.uniform(0.0, 0.12)
    for _ in range(int(rng.integers(1, 5))):
        x, y = cx + rng.normal(0, spread + 1e-3), cy + rng.normal(0, spread + 1e-3)
        r = size * rng.uniform(0.022, 0.055)
        field = np.maximum(field, _blob_field(rng, cv, x, y, r, r * rng.uniform(0.6, 1.0), 0.5))
    a = np.clip(field + 0.5, 0, 1) * base.alpha
    ref = _local_colour(base.fg, a)
    colour = _contrasting(rng, ref, min_dist=0.5, s=(0.5, 1.0), v=(0.1, 1.0))
    return _lerp(base.fg, colour, a), None, a >= _MASK_AT


def _defect_missing(rng, base, cv):
    """A chunk of the object gone: a rough bite at the rim or a chipped-off side."""
    R = base.radius
    solid = base.alpha > 0.5
    bx, by = _pick(rng, base.boundary)
    if rng.random() < 0.5:
        r = R * rng.uniform(0.25, 0.5)
        sdf = np.sqrt((cv.xx - bx) ** 2 + (cv.yy - by) ** 2) - r
    else:  # cut along a chord near the boundary point
        ys, xs = np.nonzero(solid)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        n = np.array([bx - cx, by - cy])
        n = n / (np.linalg.norm(n) + 1e-6)
        off = np.hypot(bx - cx, by - cy) * rng.uniform(0.55, 0.8)
        sdf = off - ((cv.xx - cx) * n[0] + (cv.yy - cy) * n[1])
    sdf = sdf + rng.uniform(0.5, 2.0) * _noise(rng, cv.size, 1.5) * cv.size / 96
    alpha = base.alpha * (1 - _aa(sdf))
    return base.fg, alpha.astype(np.float32), (base.alpha - alpha) >= _MASK_AT


_DEFECTS: Dict[str, Callable] = {
    "scratch": _defect_scratch, "hole": _defect_hole, "stain": _defect_stain,
    "spot": _defect_spot, "crack": _defect_crack, "missing": _defect_missing,
}


def _apply_defect(rng, base: _Base, defect: str, size: int, defect_scale: float = 1.0):
    """Paint ``defect`` on ``base``; retry a few draws until it is clearly visible."""
    cv = _Canvas(size, defect_scale)
    clean = base.render()
    min_px = max(4, int(size * size * 0.002))
    best = None
    for _ in range(12):
        fg, alpha, mask = _DEFECTS[defect](rng, base, cv)
        img = base.render(fg, alpha)
        n = int(mask.sum())
        if n == 0:
            continue
        change = float(np.abs(img - clean)[mask].mean())
        if best is None or n * change > best[2]:
            best = (img, mask, n * change)
        if n >= min_px and change >= 0.12:
            return img, mask
    if best is None:  # practically unreachable: 12 empty draws in a row
        raise RuntimeError(f"could not place a {defect} defect")
    return best[0], best[1]


# --------------------------------------------------------------------------- public drawing API

def list_families() -> List[str]:
    """All family (= category) names: textures first, then objects."""
    return list(TEXTURE_FAMILIES + OBJECT_FAMILIES)


def family_info(family: str) -> dict:
    """Kind, description, applicable defects and default split of one family."""
    _check_family(family)
    return {
        "name": family,
        "kind": "texture" if family in TEXTURE_FAMILIES else "object",
        "description": _DESCRIPTIONS[family],
        "defects": list(defects_for(family)),
        "split": "heldout" if family in DEFAULT_HELDOUT_CATEGORIES else "train",
    }


def defects_for(family: str) -> Tuple[str, ...]:
    """Defect types that make sense for a family ("missing" only cuts into objects)."""
    _check_family(family)
    return DEFECT_TYPES if family in OBJECT_FAMILIES else _SURFACE_DEFECTS


def _check_family(family: str) -> None:
    if family not in _DESCRIPTIONS:
        raise MoECLIPError(f"unknown synthetic category {family!r}; known: {', '.join(list_families())}")


def _resolve_defect(family: str, defect: Optional[str], rng) -> Optional[str]:
    if defect is None or defect == "good":
        return None
    options = defects_for(family)
    if defect == "random":
        return str(options[rng.integers(len(options))])
    if defect not in options:
        raise MoECLIPError(f"defect {defect!r} does not apply to {family!r}; choose from {', '.join(options)}")
    return defect


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def draw_pair(family: str, rng: RngLike, size: int = 96, defect: Optional[str] = "random",
              defect_scale: float = 1.0):
    """The same base drawn clean and with a defect: ``(clean, defective, mask, defect_type)``.

    With the same seed, ``defective`` equals ``draw_sample(..., defect=defect)[0]``.
    For ``defect=None`` both images are the clean one and the mask is empty.
    """
    rng = _as_rng(rng)
    _check_family(family)
    base = _draw_base(family, rng, size)
    clean = base.render()
    kind = _resolve_defect(family, defect, rng)
    if kind is None:
        img8 = _to_uint8(clean)
        return img8, img8.copy(), np.zeros((size, size), bool), "good"
    img, mask = _apply_defect(rng, base, kind, size, defect_scale)
    return _to_uint8(clean), _to_uint8(img), mask, kind


def draw_sample(family: str, rng: RngLike, size: int = 96, defect: Optional[str] = None,
                defect_scale: float = 1.0):
    """One in-memory sample: ``(image uint8 HxWx3, mask bool HxW, defect_type)``.

    ``defect``: None (or "good") for a normal image, "random" for a random applicable
    defect type, or a name from ``defects_for(family)``. Deterministic for a seed.
    """
    _, img, mask, kind = draw_pair(family, rng, size, defect, defect_scale)
    return img, mask, kind


def draw_batch(families: Sequence[str], rng: RngLike, n: int, size: int = 96,
               anomaly_rate: float = 0.5, defect_scale: float = 1.0):
    """``n`` samples from random families (for training straight from memory).

    Returns ``(images N×H×W×3 uint8, masks N×H×W bool, labels N int64, defect_types list)``.
    """
    rng = _as_rng(rng)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), bool)
    labels = np.zeros(n, np.int64)
    kinds = []
    for i in range(n):
        family = families[int(rng.integers(len(families)))]
        defect = "random" if rng.random() < anomaly_rate else None
        images[i], masks[i], kind = draw_sample(family, rng, size, defect, defect_scale)
        labels[i] = kind != "good"
        kinds.append(kind)
    return images, masks, labels, kinds


# --------------------------------------------------------------------------- writing a dataset

def resolve_categories(spec: Union[None, str, Sequence[str]]) -> List[str]:
    """``None``/"all", "train", "heldout", "a,b,c" or a list -> validated category names."""
    if spec is None:
        return list_families()
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key == "all":
            return list_families()
        if key == "train":
            return list(DEFAULT_TRAIN_CATEGORIES)
        if key in ("heldout", "held-out", "test"):
            return list(DEFAULT_HELDOUT_CATEGORIES)
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    names = list(dict.fromkeys(spec))  # keep order, drop repeats
    if not names:
        raise MoECLIPError("no synthetic categories given")
    for name in names:
        _check_family(name)
    return names


def _seed_for(seed: int, category: str, split: str, index: int) -> np.random.SeedSequence:
    """Per-image seed: independent of which other categories or how many images are written."""
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(category.encode()),
                                   zlib.crc32(split.encode()), index])


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=3)


def _write_image(job: Tuple[int, str, str, str, int, str, Optional[str], int, float]) -> None:
    """Draw one planned image (and its mask) and write it; its seed depends only on its own plan entry."""
    seed, cat, split, kind, i, img_path, mask_path, image_size, defect_scale = job
    rng = np.random.default_rng(_seed_for(seed, cat, f"{split}/{'good' if kind == 'good' else 'bad'}", i))
    img, mask, _ = draw_sample(cat, rng, image_size, None if kind == "good" else kind, defect_scale)
    _save_png(Path(img_path), img)
    if mask_path is not None:
        _save_png(Path(mask_path), mask.astype(np.uint8) * 255)


def _run_jobs(jobs: List[tuple], workers: int) -> None:
    """Write the images in this process or in ``workers`` processes; the files are the same either way."""
    if workers <= 1 or len(jobs) < 2 * workers:
        for job in jobs:
            _write_image(job)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")  # fork: no re-import, starts at once
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        for _ in pool.map(_write_image, jobs, chunksize=max(1, len(jobs) // (8 * workers))):
            pass


def _prepare_out_dir(out: Path, categories: Sequence[str], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MoECLIPError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise MoECLIPError(f"output folder {out} is not empty; choose an empty folder or pass "
                               f"--overwrite (overwrite=True) to replace the generated categories in it")
        # Remove only what a generator run owns, so stale images never mix into the new set.
        stale = set(categories)
        try:
            old = json.loads((out / "synth.json").read_text())
            stale.update(c for c in old.get("categories", []) if c in _DESCRIPTIONS)
        except (OSError, ValueError, AttributeError):
            pass
        for name in stale:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)


def generate_dataset(out_dir, categories=None, n_normal: int = 10, n_anomalous: int = 12,
                     image_size: int = 96, seed: int = 0, overwrite: bool = False,
                     n_train: int = 0, defect_scale: float = 1.0, workers: int = 1) -> dict:
    """Write a synthetic MVTec-style dataset and return a summary with per-category counts.

    Anomalous images cycle through the family's defect types (in a seeded order), so every
    type appears once there are at least as many anomalous images as types.
    ``n_train`` > 0 also writes ``train/good`` normals (not needed for zero-shot use).
    ``workers`` > 1 draws and writes in that many processes: every image has its own seed,
    so the files are identical for any worker count.
    """
    out = Path(out_dir).expanduser().resolve()
    names = resolve_categories(categories)
    for label, value in (("n_normal", n_normal), ("n_anomalous", n_anomalous), ("n_train", n_train)):
        if int(value) < 0:
            raise MoECLIPError(f"{label} must be >= 0, got {value}")
    if n_normal + n_anomalous + n_train == 0:
        raise MoECLIPError("nothing to generate: all image counts are 0")
    if not 32 <= int(image_size) <= 1024:
        raise MoECLIPError(f"image size must be between 32 and 1024 px, got {image_size}")
    if int(workers) < 1:
        raise MoECLIPError(f"workers must be >= 1, got {workers}")
    _prepare_out_dir(out, names, overwrite)

    start = time.perf_counter()
    counts: Dict[str, Dict[str, int]] = {}
    jobs: List[tuple] = []
    for cat in names:
        cdir = out / cat
        plan = [("train", "good", i) for i in range(n_train)] + \
               [("test", "good", i) for i in range(n_normal)]
        order = np.random.default_rng(_seed_for(seed, cat, "order", 0)).permutation(defects_for(cat))
        plan += [("test", str(order[i % len(order)]), i) for i in range(n_anomalous)]
        for folder in {(split, kind) for split, kind, _ in plan}:
            (cdir / folder[0] / folder[1]).mkdir(parents=True, exist_ok=True)
            if folder[1] != "good":
                (cdir / "ground_truth" / folder[1]).mkdir(parents=True, exist_ok=True)
        tally: Dict[str, int] = {}
        for split, kind, i in plan:
            key = "train_good" if split == "train" else kind
            num = tally.get(key, 0)
            tally[key] = num + 1
            mask_path = None if kind == "good" else str(cdir / "ground_truth" / kind / f"{num:03d}_mask.png")
            jobs.append((int(seed), cat, split, kind, i, str(cdir / split / kind / f"{num:03d}.png"), mask_path,
                         int(image_size), float(defect_scale)))
        counts[cat] = tally
    _run_jobs(jobs, int(workers))
    seconds = time.perf_counter() - start

    from .. import __version__
    (out / "descriptions.json").write_text(
        json.dumps({c: _DESCRIPTIONS[c] for c in names}, indent=2) + "\n")
    params = {
        "generator": "moeclip.data.synth", "generator_version": GENERATOR_VERSION,
        "moeclip_version": __version__, "seed": int(seed), "image_size": int(image_size),
        "n_normal": int(n_normal), "n_anomalous": int(n_anomalous), "n_train": int(n_train),
        "defect_scale": float(defect_scale), "categories": names,
        "train_categories": [c for c in names if c in DEFAULT_TRAIN_CATEGORIES],
        "heldout_categories": [c for c in names if c in DEFAULT_HELDOUT_CATEGORIES],
        "defect_types": list(DEFECT_TYPES), "counts": counts,
    }
    (out / "synth.json").write_text(json.dumps(params, indent=2) + "\n")
    total = sum(sum(t.values()) for t in counts.values())
    return {"out_dir": str(out), "seed": int(seed), "image_size": int(image_size),
            "counts": counts, "total_images": total, "seconds": round(seconds, 3)}


# --------------------------------------------------------------------------- CLI glue

def add_synth_arguments(parser) -> None:
    """Flags of ``moeclip datasets synth``."""
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty unless --overwrite)")
    parser.add_argument("--categories", default="all", metavar="LIST",
                        help="comma-separated families, or train / heldout / all (default: all). "
                             f"Families: {', '.join(list_families())}")
    parser.add_argument("--normal", type=int, default=10, metavar="N",
                        help="normal test images per category (default 10)")
    parser.add_argument("--anomalous", type=int, default=12, metavar="N",
                        help="anomalous test images per category, cycling defect types (default 12)")
    parser.add_argument("--train-normal", type=int, default=5, metavar="N",
                        help="also write N train/good normal images per category, the references of the few-shot "
                             "protocol (moeclip test --shots; default 5, 0 for none)")
    parser.add_argument("--size", type=int, default=96, metavar="PX", help="image side in pixels (default 96)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--defect-scale", type=float, default=1.0,
                        help="draw defects this many times larger relative to the image (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty folder, replacing generated categories")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="draw and write in N processes (same files for any N; default 1)")


def run_synth(args) -> int:
    """Generate the dataset from parsed flags and print a per-category table."""
    summary = generate_dataset(args.out, categories=args.categories, n_normal=args.normal,
                               n_anomalous=args.anomalous, image_size=args.size, seed=args.seed,
                               overwrite=args.overwrite, n_train=getattr(args, "train_normal", 0),
                               defect_scale=getattr(args, "defect_scale", 1.0),
                               workers=getattr(args, "workers", 1))
    counts = summary["counts"]
    cols = [c for c in ("train_good", "good") + DEFECT_TYPES if any(c in t for t in counts.values())]
    width = max([len("category")] + [len(c) for c in counts])
    head = f"{'category':<{width}}  {'split':<7}  " + "  ".join(f"{c:>{max(len(c), 4)}}" for c in cols) + "  total"
    print(head)
    print("-" * len(head))
    for cat, tally in counts.items():
        split = "heldout" if cat in DEFAULT_HELDOUT_CATEGORIES else "train"
        applicable = ("train_good", "good") + defects_for(cat)
        cells = "  ".join(f"{tally.get(c, 0) if c in applicable else '-':>{max(len(c), 4)}}" for c in cols)
        print(f"{cat:<{width}}  {split:<7}  {cells}  {sum(tally.values()):>5}")
    print(f"wrote {summary['total_images']} images ({summary['image_size']} px, seed {summary['seed']}) "
          f"in {summary['seconds']:.1f} s to {summary['out_dir']}")
    return 0
