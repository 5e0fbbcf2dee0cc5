"""Trainable projections from the vision tower's width into the joint text-image space."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class SegProjection(nn.Module):
    """Patch tokens -> joint space for the anomaly maps (bias-free linear, optional LeakyReLU)."""

    def __init__(self, width: int, embed_dim: int, relu: bool = False):
        super().__init__()
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.act = nn.LeakyReLU() if relu else nn.Identity()
        nn.init.xavier_uniform_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(x))


def project_stacked(x: torch.Tensor, projections: Sequence[SegProjection]) -> torch.Tensor:
    """(P, ..., width) through P projections at once (one batched matmul) -> (P, ..., embed_dim).

    The modules keep their own weights (the checkpoint format); they are stacked per call,
    which at the demo's size costs far less than one matmul and one autograd node per map.
    """
    w = torch.stack([p.proj.weight for p in projections])  # (P, embed_dim, width)
    P, lead = x.shape[0], x.shape[1:-1]
    y = torch.matmul(x.reshape(P, -1, x.shape[-1]), w.transpose(1, 2)).reshape(P, *lead, w.shape[1])
    return projections[0].act(y)


class DetProjection(nn.Module):
    """The depth-wise detection adapter: LayerNorm, depthwise Conv1d along the patch sequence,
    GELU, pointwise Conv1d to the joint space. The depthwise kernel lets each patch see its
    sequence neighbours before the image-level score is pooled."""

    def __init__(self, width: int, embed_dim: int, kernel_size: int = 3):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.dwconv = nn.Conv1d(width, width, kernel_size, padding="same", groups=width, bias=False)
        self.act = nn.GELU()
        self.pwconv = nn.Conv1d(width, embed_dim, 1, bias=False)
        nn.init.xavier_uniform_(self.dwconv.weight)
        nn.init.xavier_uniform_(self.pwconv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, width) patch tokens -> (B, N, embed_dim)."""
        y = self.norm(x).transpose(1, 2)
        y = self.pwconv(self.act(self.dwconv(y)))
        return y.transpose(1, 2)
