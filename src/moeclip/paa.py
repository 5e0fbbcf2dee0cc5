"""PAA: Patch Average Aggregation, the r x r neighbourhood mean of each patch token."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F


def patch_average(tokens: torch.Tensor, grid: Tuple[int, int], radius: int) -> torch.Tensor:
    """Mean over the ``radius x radius`` neighbourhood of every patch; CLS kept as is.

    Zero padding counts in the mean (border patches are averaged with zeros), which is
    exactly ``avg_pool2d(count_include_pad=True)`` and what the reference computes.
    ``tokens`` is (B, 1 + H*W, C).
    """
    if radius == 1:
        return tokens
    B, L, C = tokens.shape
    H, W = grid
    cls, patches = tokens[:, :1], tokens[:, 1:]
    g = patches.transpose(1, 2).reshape(B, C, H, W)
    g = F.avg_pool2d(g, radius, stride=1, padding=radius // 2, count_include_pad=True)
    return torch.cat([cls, g.reshape(B, C, H * W).transpose(1, 2)], dim=1)


def aggregate_levels(levels: Sequence[torch.Tensor], grid: Tuple[int, int], radii: Sequence[int]) -> List[torch.Tensor]:
    """The level-major list of maps: for each level, one map per radius."""
    return [patch_average(t, grid, r) for t in levels for r in radii]
