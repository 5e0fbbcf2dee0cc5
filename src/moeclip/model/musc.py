"""MuSc: zero-shot anomaly scores from the unlabeled batch itself (Li et al., ICLR 2024).

A normal patch finds close matches in many other images of the same object; an anomalous one
does not. MuSc needs no training and no text, only a frozen ViT and a batch:

- :func:`lnamd` (Local Neighbourhood Aggregation with Multiple Degrees): each level's token map is
  LayerNorm-ed over its whole (C, H, W) volume, averaged over r x r neighbourhoods (zero padding,
  divisor r*r) and L2-normalised per patch;
- :func:`mutual_scoring` (Mutual Scoring Mechanism, MSM): for each patch of image i, the distance
  to the nearest patch of every other image j, then the mean of the smallest 30 % of those values
  (the interval average that ignores the other images' own anomalies);
- :func:`mutual_patch_scores`: MSM of every level and degree r, averaged over levels then degrees;
- :func:`upsample`: bilinear with ``align_corners=True`` to the input size, no smoothing;
- :func:`rscin` (Re-scoring with Constrained Image-level Neighbourhood): each image's map maximum,
  min-max normalised over the batch, replaced by the similarity-weighted mean over its k nearest
  images by class embedding, averaged over the windows k.

Numbers follow the official code (xrli-U/MuSc @ b76b93d), checked by ``tests/test_golden_musc.py``.
Details of the official code that the paper leaves open, followed here, and what this module does where
the official code fails:

- the patch distance is the Euclidean distance between L2-normalised features (the official
  ``torch.cdist``; here ``|x|^2 + |y|^2 - 2 x.y`` by one matrix product, as cdist computes it);
- the class embedding is the CLS token of the *last* block, ``ln_post`` and ``proj`` (CLIP's image
  embedding), L2-normalised, whatever levels are read;
- the map maximum is taken on the upsampled map;
- activation: at 518 px the official factory rebuilds ViT-L-14-336 from its config, i.e. with plain
  GELU, and loads the OpenAI weights into it (positional embedding resized bicubically), which is
  what :mod:`moeclip.model.backbone` does by default; at the native 336 px it would load OpenAI's
  QuickGELU model (``quick_gelu=True``, ``--quick-gelu``);
- pre-processing is the official one and moeclip's: bicubic resize of the whole image to S x S, CLIP
  mean/std (its vendored open_clip squashes, then centre-crops a no-op);
- precision: on a GPU the official code runs the tower under fp16 autocast; this module computes in
  fp32 everywhere (the golden fixture is the official code's fp32 CPU run);
- the official RsCIN windows depend on the dataset: 1, 2, 3 (MVTec AD, BTAD), 1, 8, 9 (VisA);
- small batches: the official ``int(0.3 * (N - 1))`` is 0 below 5 images (mean of nothing: NaN,
  MuSc issue #41); here at least one other image is averaged. RsCIN windows larger than the batch
  are clamped to it (the official code raises), and a batch whose map maxima are all equal gets
  RsCIN scores 0 (the official min-max divides by zero).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MoECLIPError
from ..precision import resolve_device
from .backbone import extract_tokens

__all__ = ["MUSC_LEVELS", "MUSC_RADII", "RSCIN_WINDOWS", "INTERVAL", "default_levels", "check_levels",
           "extract_tokens", "lnamd", "mutual_scoring", "sample_others", "mutual_patch_scores", "upsample",
           "rscin", "MuScResult", "MuSc", "ONE_IMAGE_FIX", "flops_per_image"]

#: MuSc's 1-based block outputs for the 24 blocks of ViT-L (its ``feature_layers`` 5, 11, 17, 23 + 1).
MUSC_LEVELS = (6, 12, 18, 24)
#: LNAMD aggregation degrees.
MUSC_RADII = (1, 3, 5)
#: RsCIN windows (MuSc's MVTec setting; it uses 1, 8, 9 on VisA).
RSCIN_WINDOWS = (1, 2, 3)
#: MSM averages the nearest distances to the closest 30 % of the other images.
INTERVAL = 0.3
#: What a user with a single image can do.
ONE_IMAGE_FIX = ("mutual scoring (MuSc) compares each image with the other images of the same object: "
                 "give at least 2 images of it, or drop --transductive")


# ---------------------------------------------------------------------------- levels and tokens
def default_levels(depth: int) -> List[int]:
    """Quarter points of the tower's depth: MuSc's 6, 12, 18, 24 for the 24 blocks of ViT-L."""
    return sorted({max(1, depth * q // 4) for q in (1, 2, 3, 4)})


def check_levels(levels: Optional[Sequence[int]], depth: int) -> List[int]:
    """Sorted, unique 1-based block outputs within 1..depth (default :func:`default_levels`)."""
    if levels is None:
        return default_levels(depth)
    out = sorted({int(v) for v in levels})
    if not out:
        raise MoECLIPError("--levels: at least one block output is needed")
    bad = [v for v in out if not 1 <= v <= depth]
    if bad:
        raise MoECLIPError(f"--levels {','.join(map(str, levels))}: block output(s) {bad} outside 1..{depth} "
                           f"(this vision tower has {depth} blocks)")
    return out


def _visual(clip: nn.Module) -> nn.Module:
    return clip.visual if hasattr(clip, "visual") else clip


# ---------------------------------------------------------------------------- LNAMD
def lnamd(tokens: torch.Tensor, grid: Tuple[int, int], r: int) -> torch.Tensor:
    """One level's patch tokens (B, L, C) -> LNAMD features (B, L, C), unit length per patch."""
    if r < 1 or r % 2 == 0:
        raise MoECLIPError(f"LNAMD degree r must be odd and >= 1, got {r}")
    b, n, c = tokens.shape
    h, w = grid
    if n != h * w:
        raise MoECLIPError(f"{n} patch tokens do not fill a {h}x{w} grid")
    fmap = tokens.float().transpose(1, 2).reshape(b, c, h, w)
    fmap = F.layer_norm(fmap, (c, h, w))  # one LayerNorm over each image's whole map, no affine
    if r > 1:  # zeros outside the map count in the mean, as unfold with padding does
        fmap = F.avg_pool2d(fmap, r, stride=1, padding=r // 2, count_include_pad=True)
    feats = fmap.reshape(b, c, n).transpose(1, 2)
    return feats / feats.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------- MSM
def sample_others(n: int, m: Optional[int], seed: int = 0) -> Optional[torch.Tensor]:
    """Each image's comparison images for ``--mutual-images M``: (n, min(M, n-1)) indices, or None for all.

    Drawn without replacement from the other images by a generator seeded with ``seed``, so the
    same batch gives the same pairs on every run and machine.
    """
    if m is None or m >= n - 1:
        return None
    if m < 1:
        raise MoECLIPError(f"--mutual-images must be at least 1, got {m}")
    gen = torch.Generator().manual_seed(int(seed))
    rows = []
    for i in range(n):
        perm = torch.randperm(n - 1, generator=gen)[:m]
        rows.append(perm + (perm >= i).long())  # skip image i itself
    return torch.stack(rows)


def _interval_mean(nearest: torch.Tensor, interval: float, compared: Optional[int] = None) -> torch.Tensor:
    """(L, K) nearest distances -> (L,) mean of the smallest ``max(1, int(interval * compared))``
    (``compared``: the number of other images, default K)."""
    k = max(1, int((nearest.shape[1] if compared is None else compared) * interval))
    return torch.topk(nearest, k, dim=1, largest=False, sorted=True).values.mean(dim=1)


def _nearest(a: torch.Tensor, a_sq: torch.Tensor, block: torch.Tensor, block_sq: torch.Tensor, both: bool):
    """Euclidean nearest-patch distances between image ``a`` (L, C) and ``m`` images ``block`` (m, L', C).

    Returns (L, m): each patch of ``a`` to its nearest patch in each image, and with ``both`` also
    (m, L'): each patch of the block to its nearest patch of ``a``. ``|x - y|^2 = |x|^2 + |y|^2 - 2 x.y``
    with one matrix product, as ``torch.cdist`` computes it for many points, but the square root is taken
    after the minimum (it is monotonic) and no padded copies of the inputs are made.
    """
    m, lb, c = block.shape
    g = torch.addmm(block_sq.reshape(1, -1), a, block.reshape(-1, c).T, beta=1.0, alpha=-2.0).view(-1, m, lb)
    rows = (g.amin(dim=-1) + a_sq[:, None]).clamp_min_(0).sqrt_()
    if not both:
        return rows, None
    cols = g.add_(a_sq[:, None, None]).amin(dim=0).clamp_min_(0).sqrt_()
    return rows, cols


def mutual_scoring(Z: torch.Tensor, interval: float = INTERVAL, others: Optional[torch.Tensor] = None,
                   chunk_mb: int = 256) -> torch.Tensor:
    """MSM: LNAMD features of one level and degree (N, L, C) -> patch anomaly scores (N, L) float32.

    ``others`` (N, K) restricts image i to the images ``others[i]`` (see :func:`sample_others`).
    The distance blocks are at most ``chunk_mb`` MiB (L x m x L floats for m other images at a time).
    A full batch whose (N, L, N) table of nearest distances fits in ``8 * chunk_mb`` computes each pair
    of images once for both directions; otherwise each image is compared with its others in turn.
    """
    n, npatch, c = Z.shape
    if n < 2:
        raise MoECLIPError(ONE_IMAGE_FIX)
    if not 0.0 < interval <= 1.0:
        raise MoECLIPError(f"MSM interval must be in (0, 1], got {interval}")
    Z = Z.float()
    sq = (Z * Z).sum(-1)  # (N, L)
    step = max(1, int(chunk_mb * 2**20 // (4 * npatch * npatch)))
    out = torch.empty(n, npatch, dtype=torch.float32, device=Z.device)
    if others is None and 4 * n * n * npatch <= 8 * chunk_mb * 2**20:
        nearest = torch.full((n, npatch, n), float("inf"), dtype=torch.float32, device=Z.device)
        for i in range(n - 1):
            for s in range(i + 1, n, step):
                e = min(s + step, n)
                rows, cols = _nearest(Z[i], sq[i], Z[s:e], sq[s:e], both=True)
                nearest[i, :, s:e] = rows
                nearest[s:e, :, i] = cols
        for i in range(n):  # the diagonal stays +inf: never among the n - 1 smallest
            out[i] = _interval_mean(nearest[i], interval, compared=n - 1)
        return out
    for i in range(n):
        refs = torch.cat([torch.arange(i, device=Z.device), torch.arange(i + 1, n, device=Z.device)]) \
            if others is None else others[i].to(Z.device)
        nearest = torch.empty(npatch, len(refs), dtype=torch.float32, device=Z.device)
        for s in range(0, len(refs), step):
            idx = refs[s:s + step]
            nearest[:, s:s + len(idx)], _ = _nearest(Z[i], sq[i], Z[idx], sq[idx], both=False)
        out[i] = _interval_mean(nearest, interval)
    return out


def mutual_patch_scores(level_tokens: Sequence[torch.Tensor], grid: Tuple[int, int],
                        radii: Sequence[int] = MUSC_RADII, interval: float = INTERVAL,
                        others: Optional[torch.Tensor] = None, chunk_mb: int = 256) -> torch.Tensor:
    """Per-level patch tokens (N, L, C) -> MuSc patch scores (N, L) float64: MSM(LNAMD) averaged over
    levels, then over degrees r (the official order, in float64 as it accumulates)."""
    per_r = []
    for r in radii:
        per_level = [mutual_scoring(_lnamd_batch(t, grid, r, chunk_mb), interval, others, chunk_mb).double()
                     for t in level_tokens]
        per_r.append(torch.stack(per_level).mean(0))
    return torch.stack(per_r).mean(0)


def _lnamd_batch(tokens: torch.Tensor, grid: Tuple[int, int], r: int, chunk_mb: int) -> torch.Tensor:
    """:func:`lnamd` of a whole batch, a few images at a time (its temporaries stay within ``chunk_mb``)."""
    n, npatch, c = tokens.shape
    step = max(1, int(chunk_mb * 2**20 // (4 * 4 * npatch * c)))
    if step >= n:
        return lnamd(tokens, grid, r)
    out = torch.empty(n, npatch, c, dtype=torch.float32, device=tokens.device)
    for s in range(0, n, step):
        out[s:s + step] = lnamd(tokens[s:s + step], grid, r)
    return out


def upsample(patch_scores: torch.Tensor, grid: Tuple[int, int], size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """(N, L) patch scores -> (N, H, W) maps, bilinear with ``align_corners=True`` as the official code."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    maps = patch_scores.reshape(patch_scores.shape[0], 1, *grid)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=True)[:, 0]


# ---------------------------------------------------------------------------- RsCIN
def rscin(scores, class_embeddings, windows: Optional[Sequence[int]] = RSCIN_WINDOWS) -> torch.Tensor:
    """Re-score images by their neighbours in class-embedding space: (N,) scores -> (N,) float32.

    Scores are min-max normalised over the batch; for each window k, an image's new score is the
    mean of the normalised scores of its k most similar images (itself included), weighted by
    the dot product of the class embeddings; the windows' results are averaged. ``windows`` None
    or containing 0 returns the scores unchanged, as the official code.
    """
    scores = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if windows is None or 0 in windows:
        return scores.float()
    if any(int(k) < 0 for k in windows):
        raise MoECLIPError(f"--rscin windows must be >= 1 (0: no re-scoring), got {list(windows)}")
    n = scores.shape[0]
    span = scores.max() - scores.min()
    norm = (scores - scores.min()) / span if span > 0 else torch.zeros_like(scores)
    cls = torch.as_tensor(np.asarray(class_embeddings, dtype=np.float32))
    sim = cls @ cls.T
    norm = norm.float()
    out = []
    for k in windows:
        k = min(int(k), n)
        keep = torch.topk(sim, k, dim=1, largest=True).indices
        w = torch.zeros_like(sim).scatter_(1, keep, sim.gather(1, keep))
        out.append((w / w.sum(dim=1, keepdim=True)) @ norm)
    return torch.stack(out, -1).mean(-1)


# ---------------------------------------------------------------------------- the whole method
@dataclass
class MuScResult:
    """One batch scored by MuSc (every tensor on the CPU, images in input order)."""

    maps: torch.Tensor             # (N, S, S) float32: mean of the interval-averaged distances, upsampled
    scores: torch.Tensor           # (N,) float32: RsCIN image scores
    map_max: torch.Tensor          # (N,) float64: maximum of each upsampled map (before RsCIN)
    patch_scores: torch.Tensor     # (N, L) float64
    class_embeddings: torch.Tensor  # (N, E)
    batch_size: int                # N, the batch that scored each image


class MuSc:
    """Training-free mutual scoring of a batch of images of one object with a frozen CLIP tower.

    ``mutual_images`` M compares each image with at most M others (sampled with ``seed``);
    ``chunk_mb`` bounds the distance blocks. ``batch_size`` is the forward-pass batch only:
    every image of a call is scored against the others of the same call.
    """

    def __init__(self, clip: nn.Module, image_size: Optional[int] = None, levels: Optional[Sequence[int]] = None,
                 radii: Sequence[int] = MUSC_RADII, windows: Optional[Sequence[int]] = RSCIN_WINDOWS,
                 interval: float = INTERVAL, mutual_images: Optional[int] = None, seed: int = 0,
                 batch_size: int = 8, device: str = "auto", chunk_mb: int = 256):
        visual = _visual(clip)
        self.clip = clip
        self.depth = len(visual.transformer.resblocks)
        self.levels = check_levels(levels, self.depth)
        native = visual.image_size
        self.image_size = int(image_size or (native[0] if isinstance(native, (tuple, list)) else native))
        self.grid = tuple(int(g) for g in visual.grid_size)
        if any(r < 1 or r % 2 == 0 for r in radii):
            raise MoECLIPError(f"LNAMD degrees must be odd and >= 1, got {list(radii)}")
        if mutual_images is not None and mutual_images < 1:
            raise MoECLIPError(f"--mutual-images must be at least 1, got {mutual_images}")
        if windows is not None and any(int(k) < 0 for k in windows):
            raise MoECLIPError(f"--rscin windows must be >= 1 (0: no re-scoring), got {list(windows)}")
        if batch_size < 1:
            raise MoECLIPError("--batch-size must be at least 1")
        self.radii, self.windows, self.interval = tuple(radii), windows, interval
        self.mutual_images, self.seed, self.batch_size = mutual_images, seed, batch_size
        self.device, self.chunk_mb = resolve_device(device), chunk_mb
        self.clip = clip.to(self.device)

    @classmethod
    def from_options(cls, clip_model: str = "ViT-L-14-336", clip_weights: Optional[str] = "openai",
                     image_size: int = 518, quick_gelu: bool = False, device: str = "auto", **kwargs) -> "MuSc":
        """Build the frozen CLIP (name or JSON config; tag, weight file or None) and wrap it.

        A weight file may hold the vision tower only (``visual.*`` keys): MuSc needs nothing else.
        """
        from .backbone import create_vision_clip
        from .config import BackboneConfig

        clip = create_vision_clip(BackboneConfig(clip_model, clip_weights, int(image_size), bool(quick_gelu)))
        return cls(clip, image_size=image_size, device=device, **kwargs)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """CLIP-normalised images (N, 3, S, S) -> (per level (N, L, C) tokens, (N, E) class embeddings), on the CPU."""
        levels: List[List[torch.Tensor]] = [[] for _ in self.levels]
        cls = []
        for s in range(0, images.shape[0], self.batch_size):
            toks, c = extract_tokens(self.clip, images[s:s + self.batch_size].to(self.device), self.levels)
            for store, t in zip(levels, toks):
                store.append(t)
            cls.append(c)
        return [torch.cat(t) for t in levels], torch.cat(cls)

    @torch.no_grad()
    def from_tokens(self, level_tokens: Sequence[torch.Tensor], class_embeddings: torch.Tensor,
                    grid: Optional[Tuple[int, int]] = None, size: Optional[int] = None) -> MuScResult:
        """MuSc from any per-level patch tokens (N, L, C): the fused mode may pass adapted ones."""
        n = level_tokens[0].shape[0]
        if n < 2:
            raise MoECLIPError(ONE_IMAGE_FIX)
        grid = grid or self.grid
        others = sample_others(n, self.mutual_images, self.seed)
        patch = mutual_patch_scores(level_tokens, grid, self.radii, self.interval, others, self.chunk_mb)
        maps = upsample(patch, grid, size or self.image_size)
        map_max = maps.reshape(n, -1).amax(1)
        scores = rscin(map_max.cpu().numpy(), class_embeddings.cpu().numpy(), self.windows)
        return MuScResult(maps.float().cpu(), scores.cpu(), map_max.cpu(), patch.cpu(), class_embeddings.cpu(), n)

    def score_tensors(self, images: torch.Tensor) -> MuScResult:
        """CLIP-normalised images (N, 3, S, S), N >= 2, of one object -> :class:`MuScResult`."""
        if images.shape[0] < 2:
            raise MoECLIPError(ONE_IMAGE_FIX)
        toks, cls = self.tokens(images)
        return self.from_tokens([t.to(self.device) for t in toks], cls)

    def score(self, images: Sequence) -> MuScResult:
        """RGB images (PIL or arrays) of one object -> :class:`MuScResult` (maps at the model's size)."""
        from ..data.transforms import preprocess_image

        if len(images) < 2:
            raise MoECLIPError(ONE_IMAGE_FIX)
        return self.score_tensors(torch.stack([preprocess_image(img, self.image_size) for img in images]))


def flops_per_image(n: int, m: Optional[int], tokens: int, width: int, levels: int, radii: int) -> float:
    """FLOPs of MSM per image as :func:`mutual_scoring` runs it: ``2 K L^2 C`` per level and degree.

    K = M with ``mutual_images``; for a full batch each pair of images is computed once for both,
    so K = (N - 1) / 2 (as long as its (N, L, N) table fits, see :func:`mutual_scoring`).
    """
    k = (n - 1) / 2 if m is None or m >= n - 1 else m
    return 2.0 * k * tokens * tokens * width * levels * radii
