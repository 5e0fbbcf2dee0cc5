"""The exportable scoring graph (torch): encoder outputs -> raw anomaly map and raw image score.

Written once for the ONNX/OpenVINO export (:mod:`moeclip.inference.onnx`) and the anomalib
model (:mod:`moeclip.integrations.anomalib`), few-shot included (the bank's map and the fusion
of :mod:`moeclip.model.fusion`, its statistics baked in as constants). kornia's Gaussian blur is the same separable
kernel applied as two fixed convolutions with reflect padding: identical numbers, and traceable
by every exporter (no dependence on how a kornia version traces).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from kornia.filters import get_gaussian_kernel1d
from torch import nn

from ..model.domain import Domain
from ..model.scoring import image_score, patch_anomaly


def map_probability(raw: torch.Tensor, num_maps: int) -> torch.Tensor:
    """The uncalibrated probability of a raw map value (torch twin of ``postprocess.map_probability``)."""
    return torch.sigmoid(2.0 * raw / num_maps - 1.0)


class ScoringGraph(nn.Module):
    """The domain's blur kernel as a buffer, and the raw map/score of one encoder output."""

    def __init__(self, domain: str | Domain):
        super().__init__()
        k, sigma = Domain.parse(domain).blur
        self.register_buffer("kernel", get_gaussian_kernel1d(k, sigma)[0].float())

    def blur(self, g: torch.Tensor) -> torch.Tensor:
        """kornia ``gaussian_blur2d`` (separable, reflect border) as two fixed convolutions."""
        p = self.kernel.numel() // 2
        g = F.conv2d(F.pad(g, (p, p, 0, 0), mode="reflect"), self.kernel.view(1, 1, 1, -1))
        return F.conv2d(F.pad(g, (0, 0, p, p), mode="reflect"), self.kernel.view(1, 1, -1, 1))

    def raw(self, out, text: torch.Tensor, size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``encode_image`` output -> (summed blurred map upsampled to ``size`` (B, H, W), raw score (B,))."""
        total = sum(patch_anomaly(f, text) for f in out.seg_features)
        g = total.reshape(total.shape[0], 1, *out.grid)
        if g.dtype != self.kernel.dtype:  # half-precision models: blur in the kernel's fp32
            g = g.to(self.kernel.dtype)
        g = F.interpolate(self.blur(g), size=size, mode="bilinear", align_corners=True)[:, 0]
        return g, image_score(out.det_feature, text)

    def few_shot(self, out, banks: Sequence[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        """The few-shot map (B, H, W) against one bank tensor per map, as ``MemoryBank.anomaly_map``.

        Each map's full (patches x bank) similarity matrix: exact, and one matrix product to export.
        """
        d = sum(((1.0 - (f.float() @ b.float().T).amax(-1)) * 0.5).clamp(0.0, 1.0)
                for f, b in zip(out.seg_features, banks)) / len(banks)
        g = self.blur(d.reshape(d.shape[0], 1, *out.grid))
        return F.interpolate(g, size=size, mode="bilinear", align_corners=True)[:, 0]


def fuse_reference_maps(zero_shot_raw: torch.Tensor, few_shot: torch.Tensor, stats, weight: float) -> torch.Tensor:
    """Torch twin of :func:`moeclip.model.fusion.fuse_maps` with a bank's statistics (Python constants)."""
    z, f = stats.zero_shot, stats.few_shot
    w = float(weight)
    fused = (1.0 - w) * (zero_shot_raw - z.center) / z.scale + w * (few_shot - f.center) / f.scale
    return z.center + z.scale * fused
