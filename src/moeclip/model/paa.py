"""PAA: Patch Average Aggregation, the r x r neighbourhood mean of each patch token."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F


def patch_average(patches: torch.Tensor, grid: Tuple[int, int], radius: int) -> torch.Tensor:
    """Mean over the ``radius x radius`` neighbourhood of every patch token (B, H*W, C).

    Zero padding counts in the mean (border patches are averaged with zeros), which is
    exactly ``avg_pool2d(count_include_pad=True)`` and what the reference computes. On CPU
    the same mean is taken as a depthwise convolution with a constant kernel, about 20x
    faster than CPU ``avg_pool2d`` (benchmarks/README.md).
    """
    if radius == 1:
        return patches
    B, L, C = patches.shape
    g = patches.transpose(1, 2).reshape(B, C, *grid)
    if g.device.type == "cpu" and not torch.onnx.is_in_onnx_export():
        kernel = g.new_full((C, 1, radius, radius), 1.0 / (radius * radius))
        g = F.conv2d(g, kernel, padding=radius // 2, groups=C)
    else:
        g = F.avg_pool2d(g, radius, stride=1, padding=radius // 2, count_include_pad=True)
    return g.reshape(B, C, L).transpose(1, 2)


def aggregate_levels(levels: Sequence[torch.Tensor], grid: Tuple[int, int], radii: Sequence[int]) -> List[torch.Tensor]:
    """The level-major list of maps: for each level (patch tokens), one map per radius."""
    return [patch_average(t, grid, r) for t in levels for r in radii]
