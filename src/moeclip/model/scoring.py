"""From patch features and text features to anomaly maps and image scores."""
from __future__ import annotations

import functools
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from .domain import Domain

#: CLIP's logit scale, fixed in MoECLIP.
LOGIT_SCALE = 100.0


def to_grid(x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    B, L, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *grid)


def patch_logits(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, L, D) x (D, 2) or (B, D, 2) -> (B, L, 2) logits [normal, abnormal]."""
    return LOGIT_SCALE * (features @ text)


def patch_anomaly(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Per-patch score ``(z_abnormal + 1 - z_normal) / 2`` on raw logits: (B, L).

    Computed as ``50 f.(t_abnormal - t_normal) + 1/2``, the same number from one
    matrix-vector product instead of a (L, D) x (D, 2) product (3x faster on CPU).
    """
    diff = (text[..., 1] - text[..., 0]).unsqueeze(-1)
    return (LOGIT_SCALE / 2) * (features @ diff).squeeze(-1) + 0.5


def anomaly_map(seg_features: Sequence[torch.Tensor], text: torch.Tensor, grid: Tuple[int, int],
                out_size: Tuple[int, int], domain: "Domain | str") -> torch.Tensor:
    """Sum over the maps of blur(upsample(per-map score)) -> (B, H, W).

    Blur and bilinear upsampling are linear, so the per-map scores are summed first and
    blurred and upsampled once: the same map as the reference up to float rounding, at
    a twelfth of the cost.
    """
    total = sum(patch_anomaly(f, text) for f in seg_features)  # (B, L)
    return smooth_patch_map(total, grid, out_size, domain)


def smooth_patch_map(values: torch.Tensor, grid: Tuple[int, int], out_size: Tuple[int, int],
                     domain: "Domain | str") -> torch.Tensor:
    """Per-patch values (B, H*W) -> the domain's Gaussian blur on the grid, bilinear upsampling: (B, H, W).

    The one smoothing every map goes through (zero-shot and few-shot alike), so maps built from
    different patch scores stay comparable pixel for pixel.
    """
    from kornia.filters import gaussian_blur2d

    k, s = Domain.parse(domain).blur
    g = values.reshape(values.shape[0], 1, *grid)
    g = gaussian_blur2d(g, (k, k), (s, s))
    g = F.interpolate(g, size=tuple(out_size), mode="bilinear", align_corners=True)
    return g[:, 0]


def image_score(det_feature: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Raw image score ``(c_abnormal + 1) / 2`` with ``c = det @ T`` (no temperature): (B,)."""
    c = det_feature.unsqueeze(1) @ text if text.dim() == 3 else det_feature @ text
    c = c.reshape(det_feature.shape[0], 2)
    return (c[:, 1] + 1) / 2


def segmentation_probs(features: torch.Tensor, text: torch.Tensor, grid: Tuple[int, int],
                       out_size: Tuple[int, int]) -> torch.Tensor:
    """Training path: softmax over [normal, abnormal] of the upsampled logits: (..., B, 2, H, W).

    ``features`` is (B, L, D) for one map or (M, B, L, D) for M maps, which then go through
    one product, one upsampling and one softmax together.
    """
    z = patch_logits(features, text)  # (..., B, L, 2)
    lead = z.shape[:-2]
    z = to_grid(z.reshape(-1, *z.shape[-2:]), grid)
    z = F.interpolate(z, size=tuple(out_size), mode="bilinear", align_corners=True)
    return z.softmax(dim=1).reshape(*lead, 2, *z.shape[-2:])


def segmentation_gap(features: torch.Tensor, text: torch.Tensor, grid: Tuple[int, int],
                     out_size: Tuple[int, int]) -> torch.Tensor:
    """Training path: the upsampled logit gap ``z_abnormal - z_normal`` of the maps: (..., B, H, W).

    A two-class softmax is ``sigmoid`` of this gap, and bilinear upsampling is linear, so one
    channel is upsampled instead of two, by two small matrix products instead of CPU
    ``interpolate`` (same values up to float rounding: :func:`segmentation_probs` is the
    reference). ``features`` is (B, L, D) or (M, B, L, D); ``text`` (D, 2) or (B, D, 2).
    """
    diff = (text[..., 1] - text[..., 0]).unsqueeze(-1)  # (D, 1) or (B, D, 1)
    g = (LOGIT_SCALE * (features @ diff)).reshape(*features.shape[:-2], *grid)
    rows = _bilinear_matrix(grid[0], out_size[0], g.device, g.dtype)
    cols = _bilinear_matrix(grid[1], out_size[1], g.device, g.dtype)
    return rows @ g @ cols.T


@functools.lru_cache(maxsize=32)
def _bilinear_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D bilinear interpolation with ``align_corners=True``."""
    with torch.inference_mode(False), torch.no_grad():
        pos = torch.arange(n_out, dtype=torch.float64) * ((n_in - 1) / max(n_out - 1, 1))
        lo = pos.floor().clamp(max=max(n_in - 2, 0)).long()
        w = pos - lo
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        m[torch.arange(n_out), lo] = 1 - w
        if n_in > 1:
            m[torch.arange(n_out), lo + 1] += w
        return m.to(device=device, dtype=dtype)
