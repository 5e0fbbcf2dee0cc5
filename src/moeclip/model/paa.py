"""PAA: Patch Average Aggregation, the r x r neighbourhood mean of each patch token."""
from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

#: Up to this many patches (16 x 16) all radii are one matmul with a dense averaging matrix;
#: beyond it the matrix grows as L^2 and per-radius pooling is cheaper.
MATMUL_MAX_PATCHES = 256


def patch_average(patches: torch.Tensor, grid: Tuple[int, int], radius: int) -> torch.Tensor:
    """Mean over the ``radius x radius`` neighbourhood of every patch token (B, H*W, C).

    Zero padding counts in the mean (border patches are averaged with zeros), which is
    exactly ``avg_pool2d(count_include_pad=True)`` and what the reference computes.
    """
    return patch_average_radii(patches, grid, [radius])[..., 0, :, :]


def patch_average_radii(patches: torch.Tensor, grid: Tuple[int, int], radii: Sequence[int]) -> torch.Tensor:
    """All radii at once: (..., H*W, C) -> (..., R, H*W, C); radius 1 gives the tokens themselves.

    Small grids (the demo's 8 x 8, ViT-B-16 at 224): one matmul with the stacked (R*L, L)
    averaging matrices, one operation instead of a pooling, reshapes and transposes per
    radius (3x faster than depthwise convolutions with backward at 8 x 8). Larger grids: per
    radius a depthwise convolution with a constant kernel on CPU (about 20x faster than CPU
    ``avg_pool2d``, benchmarks/README.md), ``avg_pool2d`` elsewhere and in ONNX export.
    The same means up to float rounding on every path.
    """
    *lead, L, C = patches.shape
    onnx = torch.onnx.is_in_onnx_export()
    if L <= MATMUL_MAX_PATCHES and not onnx:
        A = _average_matrix(tuple(grid), tuple(radii), patches.device, patches.dtype)
        return torch.matmul(A, patches.reshape(-1, L, C)).reshape(*lead, len(radii), L, C)
    g = patches.reshape(-1, L, C).transpose(1, 2).reshape(-1, C, *grid)
    out = []
    for r in radii:
        if r == 1:
            out.append(patches.reshape(-1, L, C))
            continue
        if g.device.type == "cpu" and not onnx:
            kernel = g.new_full((C, 1, r, r), 1.0 / (r * r))
            p = F.conv2d(g, kernel, padding=r // 2, groups=C)
        else:
            p = F.avg_pool2d(g, r, stride=1, padding=r // 2, count_include_pad=True)
        out.append(p.reshape(-1, C, L).transpose(1, 2))
    return torch.stack(out, 1).reshape(*lead, len(radii), L, C)


@functools.lru_cache(maxsize=32)
def _average_matrix(grid: Tuple[int, int], radii: Tuple[int, ...], device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """(R*L, L): row ``k*L + l`` holds ``1/r_k^2`` on the patches of the window around patch ``l``.

    Built outside inference mode: the cached matrix also serves training steps.
    """
    h, w = grid

    def band(n: int, r: int) -> torch.Tensor:
        i = torch.arange(n)
        return ((i[:, None] - i[None, :]).abs() <= r // 2).to(torch.float64)

    with torch.inference_mode(False), torch.no_grad():
        mats = [torch.kron(band(h, r), band(w, r)) / (r * r) for r in radii]
        return torch.cat(mats).to(device=device, dtype=dtype)


def aggregate_levels(levels: Sequence[torch.Tensor], grid: Tuple[int, int], radii: Sequence[int]) -> List[torch.Tensor]:
    """The level-major list of maps: for each level (patch tokens), one map per radius."""
    return list(patch_average_radii(torch.stack(list(levels)), grid, radii).flatten(0, 1).unbind(0))
