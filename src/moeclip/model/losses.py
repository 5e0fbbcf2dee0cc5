"""Training losses: focal + Dice on the maps, CE on the image score, ETF and load balance on the MoE."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def etf_loss(expert_outputs: torch.Tensor) -> torch.Tensor:
    """Pull the E experts' outputs for each token towards a simplex equiangular tight frame.

    ``expert_outputs`` is (N, E, d). The Gram matrix of the L2-normalised outputs is
    compared (mean squared error, averaged over tokens) with the ETF target: 1 on the
    diagonal, -1/(E-1) off it, i.e. experts as far apart as E unit vectors can be.
    """
    z = expert_outputs.float()
    return etf_loss_from_gram(z @ z.transpose(1, 2))


def etf_loss_from_gram(gram: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """:func:`etf_loss` from the (N, E, E) Gram matrices of the raw outputs.

    Normalising the Gram matrix (``G_ef / (max(|o_e|, eps) max(|o_f|, eps))``) instead of the
    (N, E, d) outputs gives the same cosines with E x E divisions per token instead of E x d.
    """
    N, E, _ = gram.shape
    if E < 2:
        return gram.new_zeros(())
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(eps * eps).sqrt()  # max(|o|, eps), no sqrt at 0
    cos = gram / (norms.unsqueeze(2) * norms.unsqueeze(1))
    target = torch.full((E, E), -1.0 / (E - 1), device=gram.device, dtype=gram.dtype)
    target.fill_diagonal_(1.0)
    return ((cos - target) ** 2).mean()


def balance_loss(router_probs: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of the per-expert total router probability over all tokens."""
    load = router_probs.reshape(-1, router_probs.shape[-1]).float().sum(0)
    return (load.std() / (load.mean() + 1e-6)) ** 2


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on class probabilities (B, C, H, W) against an index map (B, 1, H, W).

    Follows the focal-loss code the reference uses: the one-hot target is clamped to
    [smooth/(C-1), 1-smooth], ``pt`` gets ``+smooth`` before the log, no class weights.
    """
    return focal_losses(probs.unsqueeze(0), target, gamma, smooth)[0]


def focal_losses(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """:func:`focal_loss` of M maps (M, B, C, H, W) against one target (B, 1, H, W): (M,).

    The clamped one-hot target is built once for all maps.
    """
    C = probs.shape[2]
    one_hot = F.one_hot(target[:, 0].long(), C).permute(0, 3, 1, 2).to(probs.dtype)
    one_hot = one_hot.clamp(smooth / (C - 1), 1.0 - smooth)  # (B, C, H, W)
    pt = (one_hot * probs).sum(2) + smooth  # (M, B, H, W)
    return (-((1 - pt) ** gamma) * pt.log()).flatten(1).mean(1)


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - Dice, computed per image and averaged over the batch."""
    return dice_losses(pred.unsqueeze(0), target, smooth)[0]


def dice_losses(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """:func:`dice_loss` of M maps (M, B, ...) against one target (B, ...): (M,)."""
    M, B = pred.shape[:2]
    p, t = pred.reshape(M, B, -1), target.reshape(B, -1)
    dice = (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)
    return 1 - dice.mean(-1)


def segmentation_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Focal + Dice(normal channel, 1 - mask) + Dice(abnormal channel, mask) for one map."""
    return segmentation_losses(probs.unsqueeze(0), mask)[0]


def segmentation_losses(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`segmentation_loss` of M maps (M, B, 2, H, W) at once: (M,), one set of operations for all."""
    m = mask[:, 0]
    return focal_losses(probs, mask) + dice_losses(probs[:, :, 0], 1 - m) + dice_losses(probs[:, :, 1], m)


def segmentation_losses_from_gap(gap: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0,
                                 smooth: float = 1e-5) -> torch.Tensor:
    """:func:`segmentation_losses` of M maps given as logit gaps (M, B, H, W) (``scoring.segmentation_gap``).

    The same three terms on the two-class softmax written as sigmoids of the gap: the clamped
    one-hot focal term is affine in the target class's probability ``sigmoid(+-gap)`` (taken
    directly, not as ``1 - p``, which would lose the small ``pt`` to cancellation in float32),
    and both Dice terms come from two sums per map and image (one matrix product). The
    full-resolution work is a few operations on one channel instead of two through softmax.
    """
    M, B = gap.shape[:2]
    target = mask.reshape(B, -1).long().float()  # the focal term's class index, as one_hot(mask.long())
    sign = 2 * target - 1
    q = torch.sigmoid(gap.float().reshape(M, B, -1) * sign)  # probability of the target class
    lo, hi = smooth, 1.0 - smooth  # the one-hot target clamped for two classes
    pt = (hi - lo) * q + (lo + smooth)
    focal = -((1 - pt) ** gamma * pt.log()).reshape(M, -1).mean(1)
    p = torch.addcmul(1 - target, sign, q)  # abnormal probability
    m = mask.reshape(B, -1).float()
    sums = torch.matmul(p.transpose(0, 1), torch.stack([torch.ones_like(m), m], -1)).transpose(0, 1)  # (M, B, 2)
    s_p, s_pm = sums[..., 0], sums[..., 1]
    s_m, s_n, n = m.sum(-1), (1 - m).sum(-1), float(m.shape[-1])
    dice_abnormal = (2 * s_pm + 1.0) / (s_p + s_m + 1.0)
    dice_normal = (2 * (s_n - s_p + s_pm) + 1.0) / ((n - s_p) + s_n + 1.0)
    return focal + (1 - dice_normal.mean(-1)) + (1 - dice_abnormal.mean(-1))
