"""Fused transductive scoring: MoECLIP's zero-shot map + MuSc's mutual map (+ the few-shot map).

Every signal a user has, on one batch of images of one object:

- the text (MoECLIP's zero-shot raw map ``Z`` and raw image score ``s``);
- the unlabeled batch (MuSc's mutual scoring, :mod:`moeclip.model.musc`: each patch against the
  patches of the *other* images of the batch), map ``U``;
- normal references when a memory bank exists (:mod:`moeclip.model.fewshot`), map ``F``.

They are combined by the one fusion rule (:mod:`moeclip.model.fusion`): each map standardised by
its normal statistics, weighted mean, written back in zero-shot raw units, so the zero-shot
post-processing (image score ``Domain.combine(sigmoid(2 max / n - 1), s)``, colours, thresholds)
applies unchanged. Normal statistics: ``Z`` and ``F`` by the bank's leave-one-out statistics when
references exist, else by the batch's robust statistics; ``U`` always by the batch's (references
have no mutual score of their own; most patches of a batch are normal, which MuSc relies on too).
Weights: ``U`` gets ``mutual_weight``; ``Z`` and ``F`` share the rest as the few-shot rule shares
it (``1 - w`` and ``w``).

Which tokens feed the mutual score (``tokens``), measured on the demo (``benchmarks/transductive_tokens.py``):

- ``"adapted"`` (default): the MoE-adapted level tokens of the zero-shot pass itself, MuSc's LNAMD
  (r = 1, 3, 5) on them; no second tower pass;
- ``"frozen"``: MuSc's own tokens, the frozen tower at its quarter-point blocks (a second pass);
- ``"seg"``: the 12 segmentation features (PAA already aggregated their neighbourhoods: r = 1 only).

The mutual patch scores get the domain's smoothing, as the zero-shot and few-shot patch scores do
(:func:`moeclip.model.scoring.smooth_patch_map`), so the three maps are comparable pixel for pixel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import MoECLIPError
from .fusion import DEFAULT_REFERENCE_WEIGHT, ReferenceStats, check_weight, fuse, robust_stats, to_scale
from .musc import INTERVAL, MUSC_RADII, ONE_IMAGE_FIX, default_levels, mutual_patch_scores, sample_others
from .scoring import Domain, anomaly_map, image_score, smooth_patch_map

__all__ = ["MUTUAL_TOKENS", "DEFAULT_MUTUAL_TOKENS", "DEFAULT_MUTUAL_WEIGHT", "Signals", "MutualOptions",
           "forward_signals", "concat_signals", "mutual_map", "fuse_signals", "fuse_batch", "score_batch", "FusedBatch"]

#: Which tokens feed the mutual score (see the module docstring).
MUTUAL_TOKENS = ("adapted", "frozen", "seg")
DEFAULT_MUTUAL_TOKENS = "adapted"
#: Weight of the mutual map in the fused map (after standardisation).
DEFAULT_MUTUAL_WEIGHT = 0.5


@dataclass
class MutualOptions:
    """How the mutual map is made and weighed; picklable."""

    tokens: str = DEFAULT_MUTUAL_TOKENS
    mutual_images: Optional[int] = None   # compare each image with at most M others
    seed: int = 0                         # which M others
    weight: float = DEFAULT_MUTUAL_WEIGHT
    chunk_mb: int = 256

    def __post_init__(self):
        if self.tokens not in MUTUAL_TOKENS:
            raise MoECLIPError(f"--mutual-tokens must be one of {', '.join(MUTUAL_TOKENS)}, got {self.tokens!r}")
        if not 0.0 <= float(self.weight) <= 1.0:
            raise MoECLIPError(f"--mutual-weight must be in [0, 1], got {self.weight}")
        if self.mutual_images is not None and self.mutual_images < 1:
            raise MoECLIPError(f"--mutual-images must be at least 1, got {self.mutual_images}")


@dataclass
class Signals:
    """One batch's per-image signals (maps and scores on the CPU, float32), before the batch is complete."""

    zero_shot: torch.Tensor              # (B, S, S) raw zero-shot map
    image_score: torch.Tensor            # (B,) raw zero-shot image score
    tokens: List[torch.Tensor]           # per level (B, L, C) float32, model device: what the mutual score reads
    grid: Tuple[int, int]
    few_shot: Optional[torch.Tensor] = None  # (B, S, S) with a bank

    @property
    def size(self) -> int:
        return int(self.zero_shot.shape[0])


def forward_signals(model, images: torch.Tensor, text: torch.Tensor, domain, bank=None,
                    tokens: str = DEFAULT_MUTUAL_TOKENS) -> Signals:
    """One tower pass (two with ``tokens="frozen"``): the zero-shot (and few-shot) maps and the mutual tokens.

    The maps are the ones :meth:`MoECLIP.predict` and :func:`moeclip.model.fewshot.predict_with_bank`
    return. Run under the model's autocast and ``inference_mode``.
    """
    out = model.encode_image(images, compute_losses=False, seg_head=False)
    seg = list(model.seg_stack(out.levels, out.grid).unbind(0))
    text = text.to(out.det_feature.dtype)
    size = tuple(images.shape[-2:])
    zs = anomaly_map(seg, text, out.grid, size, domain).float().cpu()
    s = image_score(out.det_feature, text).float().cpu()
    few = None
    if bank is not None:
        few = bank.anomaly_map([f.float() for f in seg], out.grid, size, domain).float().cpu()
    if tokens == "adapted":
        toks = [t.float() for t in out.levels]
    elif tokens == "seg":
        toks = [f.float() for f in seg]
    elif tokens == "frozen":
        from .backbone import extract_tokens

        depth = len(model.clip.visual.transformer.resblocks)
        toks, _ = extract_tokens(model.clip, images, default_levels(depth))
        toks = [t.float() for t in toks]
    else:
        raise MoECLIPError(f"unknown mutual tokens {tokens!r} (one of {', '.join(MUTUAL_TOKENS)})")
    return Signals(zs, s, toks, tuple(out.grid), few)


def concat_signals(parts: Sequence[Signals]) -> Signals:
    """The chunks of one batch as one :class:`Signals` (input order)."""
    if not parts:
        raise MoECLIPError("no images to score")
    few = None if parts[0].few_shot is None else torch.cat([p.few_shot for p in parts])
    return Signals(torch.cat([p.zero_shot for p in parts]), torch.cat([p.image_score for p in parts]),
                   [torch.cat([p.tokens[i] for p in parts]) for i in range(len(parts[0].tokens))],
                   parts[0].grid, few)


def mutual_map(signals: Signals, domain, opts: MutualOptions = MutualOptions()) -> torch.Tensor:
    """MuSc's mutual patch scores of the batch (MSM of LNAMD features), smoothed like the zero-shot map: (N, S, S)."""
    n = signals.size
    if n < 2:
        raise MoECLIPError(ONE_IMAGE_FIX)
    radii = (1,) if opts.tokens == "seg" else MUSC_RADII
    others = sample_others(n, opts.mutual_images, opts.seed)
    patch = mutual_patch_scores(signals.tokens, signals.grid, radii, INTERVAL, others, opts.chunk_mb)
    size = tuple(signals.zero_shot.shape[-2:])
    return smooth_patch_map(patch.float(), signals.grid, size, domain).float().cpu()


def fuse_signals(zero_shot, mutual, few_shot=None, stats: Optional[ReferenceStats] = None,
                 reference_weight: float = DEFAULT_REFERENCE_WEIGHT,
                 mutual_weight: float = DEFAULT_MUTUAL_WEIGHT) -> np.ndarray:
    """The fused maps (N, S, S) in zero-shot raw units, float32 (see the module docstring).

    ``stats``: the bank's leave-one-out statistics (``Z`` and ``F``); None: the batch's own.
    """
    u = float(mutual_weight)
    if not 0.0 <= u <= 1.0:
        raise MoECLIPError(f"--mutual-weight must be in [0, 1], got {mutual_weight}")
    zs = np.asarray(zero_shot, dtype=np.float64)
    zs_stats = robust_stats(zs) if stats is None else stats.zero_shot
    if few_shot is None:
        parts = [(zs, zs_stats, 1.0 - u)]
    else:
        w = check_weight(reference_weight)
        fs_stats = robust_stats(few_shot) if stats is None else stats.few_shot
        parts = [(zs, zs_stats, (1.0 - u) * (1.0 - w)), (np.asarray(few_shot, np.float64), fs_stats, (1.0 - u) * w)]
    mu = np.asarray(mutual, dtype=np.float64)
    parts.append((mu, robust_stats(mu), u))
    return to_scale(fuse(parts), zs_stats).astype(np.float32)


@dataclass
class FusedBatch:
    """One batch scored in the fused mode (numpy, input order)."""

    maps: np.ndarray          # (N, S, S) fused, zero-shot raw units
    raw_scores: np.ndarray    # (N,) the text's raw image score
    zero_shot: np.ndarray     # (N, S, S)
    mutual: np.ndarray        # (N, S, S) smoothed mutual map
    few_shot: Optional[np.ndarray] = None

    @property
    def batch_size(self) -> int:
        return int(self.maps.shape[0])


def fuse_batch(signals: Signals, domain, stats: Optional[ReferenceStats] = None,
               reference_weight: float = DEFAULT_REFERENCE_WEIGHT,
               opts: MutualOptions = MutualOptions()) -> FusedBatch:
    """A complete batch's signals -> :class:`FusedBatch` (mutual map, then the fusion rule).

    ``stats``: the bank's leave-one-out statistics when the signals hold a few-shot map; None: the batch's.
    """
    mu = mutual_map(signals, domain, opts).numpy()
    zs = signals.zero_shot.numpy()
    few = None if signals.few_shot is None else signals.few_shot.numpy()
    maps = fuse_signals(zs, mu, few, stats, reference_weight, opts.weight)
    return FusedBatch(maps, signals.image_score.numpy().astype(np.float32), zs, mu, few)


def score_batch(model, images: torch.Tensor, text: torch.Tensor, domain="industrial", bank=None,
                reference_weight: float = DEFAULT_REFERENCE_WEIGHT, opts: MutualOptions = MutualOptions(),
                batch_size: int = 8, autocast=None) -> FusedBatch:
    """CLIP-normalised images (N, 3, S, S) of one object, N >= 2 -> :class:`FusedBatch`.

    The tower runs ``batch_size`` images at a time; the mutual score and the fusion see all N.
    ``autocast``: a context-manager factory for the tower passes (the caller's precision).
    """
    import contextlib

    if images.shape[0] < 2:
        raise MoECLIPError(ONE_IMAGE_FIX)
    domain = Domain.parse(domain)
    device = next(model.parameters()).device
    parts = []
    with torch.inference_mode():
        for s in range(0, images.shape[0], batch_size):
            with (autocast() if autocast is not None else contextlib.nullcontext()):
                parts.append(forward_signals(model, images[s:s + batch_size].to(device), text, domain, bank,
                                             opts.tokens))
        stats = None if bank is None else bank.normal_stats(model, text, domain)
        return fuse_batch(concat_signals(parts), domain, stats, reference_weight, opts)
