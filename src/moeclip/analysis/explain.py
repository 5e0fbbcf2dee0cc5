"""What the experts do: routing maps, router entropy, per-map contributions, expert similarity and load.

Everything here is computed from the model's public modules; nothing is hooked or patched.
:func:`trace_tower` runs :meth:`MoECLIP.encode_image` keeping the token stream that enters each
MoE adapter, because the outputs of *all* experts at a layer (needed for the similarity the paper
reports) are a function of that stream and are not returned by the adapter itself.

Shapes: ``B`` images, ``L = 1 + H*W`` tokens (token 0 is CLS), ``E`` experts, ``k`` top-k,
``M`` feature maps (levels x PAA radii, level-major).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..model.router import Routing
from ..model.scoring import Domain, anomaly_map, image_score, patch_anomaly

__all__ = [
    "TowerTrace",
    "trace_tower",
    "top1_selection",
    "selection_stats",
    "router_entropy",
    "map_contributions",
    "smooth_maps",
    "map_labels",
    "expert_outputs",
    "pairwise_cosine",
    "ExpertStatsAccumulator",
    "LayerExpertStats",
    "ImageExplanation",
    "explain_image",
]


# --------------------------------------------------------------------------- tower trace
@dataclass
class TowerTrace:
    """:class:`~moeclip.model.moeclip.VisionOutput` plus the token stream entering each MoE adapter."""

    vision: "object"               # VisionOutput
    moe_inputs: List[torch.Tensor]  # one (B, L, d) per MoE layer, in ``moe_layers`` order


@torch.no_grad()
def trace_tower(model, images: torch.Tensor) -> TowerTrace:
    """Run the vision tower (inference, no losses), keeping the MoE inputs."""
    if model.training:
        raise ValueError("trace_tower needs an eval-mode model (LoRA dropout would change the routing inputs)")
    out = model.encode_image(images, compute_losses=False, keep_moe_inputs=True)
    return TowerTrace(out, out.moe_inputs)


# --------------------------------------------------------------------------- routing maps
def _patches(t: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, 1 + H*W, ...) -> (B, H, W, ...): drop CLS, put patches on the grid."""
    return t[:, 1:].reshape(t.shape[0], *grid, *t.shape[2:])


def top1_selection(routing: Routing, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W) index of each patch's top-1 expert. Every patch has exactly one, so the
    per-expert masks ``top1 == e`` partition the grid."""
    return _patches(routing.indices[..., 0], grid)


def selection_stats(routing: Routing, grid: Tuple[int, int], num_experts: int) -> Dict[str, torch.Tensor]:
    """Per image and expert, over the patches where that expert is top-1:

    ``count`` (B, E) patches, ``fraction`` (B, E) of the grid, ``mean_weight`` (B, E) the mean
    renormalised top-k weight the router gives it there (NaN where it is never top-1): a
    weight near 1 means the expert dominates those patches, near 1/k that it barely wins.
    """
    top1 = top1_selection(routing, grid).flatten(1)             # (B, P)
    w1 = _patches(routing.weights[..., 0], grid).flatten(1).float()
    onehot = F.one_hot(top1, num_experts).float()                # (B, P, E)
    count = onehot.sum(1)
    wsum = (onehot * w1.unsqueeze(-1)).sum(1)
    mean_w = torch.where(count > 0, wsum / count.clamp_min(1), torch.full_like(wsum, float("nan")))
    return {"count": count, "fraction": count / top1.shape[1], "mean_weight": mean_w}


def router_entropy(routing: Routing, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W) entropy (nats) of the full router distribution per patch; ``log E`` is uniform
    (the untrained router), 0 a certain choice."""
    p = routing.probs.float()
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    return _patches(h, grid)


# --------------------------------------------------------------------------- map contributions
def map_labels(model) -> List[str]:
    """``"L6 r1"``-style name of each of the M feature maps, level-major like ``seg_features``."""
    cfg = model.adapter_config
    return [f"L{lv} r{r}" for lv in cfg.levels for r in cfg.paa_radii]


def map_contributions(seg_features: Sequence[torch.Tensor], text: torch.Tensor,
                      grid: Tuple[int, int]) -> torch.Tensor:
    """(B, M, H, W) per-map patch scores ``(z_abn + 1 - z_norm) / 2``; their sum over M is the
    anomaly map before blur and upsampling."""
    per = torch.stack([patch_anomaly(f, text) for f in seg_features], dim=1)  # (B, M, P)
    return per.reshape(per.shape[0], per.shape[1], *grid)


def smooth_maps(maps: torch.Tensor, out_size: Tuple[int, int], domain: "Domain | str") -> torch.Tensor:
    """Blur and upsample each (B, M, H, W) map as the test path does. Both steps are linear, so
    the smoothed contributions still sum to the final anomaly map."""
    from kornia.filters import gaussian_blur2d

    B, M, H, W = maps.shape
    k, s = Domain.parse(domain).blur
    g = gaussian_blur2d(maps.reshape(B * M, 1, H, W).float(), (k, k), (s, s))
    g = F.interpolate(g, size=tuple(out_size), mode="bilinear", align_corners=True)
    return g.reshape(B, M, *out_size)


# --------------------------------------------------------------------------- expert similarity / load
def expert_outputs(moe, x: torch.Tensor) -> torch.Tensor:
    """(N, E, d) output of every expert of an MoE adapter (eval mode: no LoRA dropout) for
    the tokens ``x`` (..., d) entering it."""
    flat = x.reshape(-1, x.shape[-1])
    return moe.experts.all_outputs(moe.experts.down(flat))


def pairwise_cosine(outs: torch.Tensor, eps: float = 1e-12) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum over tokens of the E x E cosine similarities between expert outputs, and how many
    tokens each pair was defined on (an expert whose output is exactly zero, e.g. an untrained
    ``lora_B``, has no direction and is left out rather than counted as 0)."""
    outs = outs.float()
    norms = outs.norm(dim=-1)                                   # (N, E)
    valid = norms > eps
    unit = outs / norms.clamp_min(eps).unsqueeze(-1) * valid.unsqueeze(-1)
    total = torch.einsum("ned,nfd->nef", unit, unit).double().sum(0)  # float64 sum over many tokens
    v = valid.double()
    count = torch.einsum("ne,nf->ef", v, v)
    return total, count


@dataclass
class LayerExpertStats:
    """Dataset-level expert statistics of one MoE layer."""

    block: int                      # 0-based vision block the adapter follows
    similarity: np.ndarray          # (E, E) mean cosine similarity, NaN where undefined
    mean_off_diagonal: Optional[float]
    top1_fraction: np.ndarray       # (E,) share of tokens whose top-1 is e; sums to 1
    topk_fraction: np.ndarray       # (E,) share of tokens that route to e at all; sums to k
    mean_probability: np.ndarray    # (E,) mean router probability; sums to 1
    tokens: int

    def to_dict(self) -> dict:
        def clean(a):
            return [[None if math.isnan(v) else float(v) for v in row] for row in a]

        return {
            "block": self.block,
            "tokens": self.tokens,
            "similarity": clean(self.similarity),
            "mean_off_diagonal_similarity": self.mean_off_diagonal,
            "load": {
                "top1": [float(v) for v in self.top1_fraction],
                "topk": [float(v) for v in self.topk_fraction],
                "mean_probability": [float(v) for v in self.mean_probability],
            },
        }


class ExpertStatsAccumulator:
    """Accumulates expert similarity and load over batches of images.

    ``tokens="all"`` uses every token entering the adapter (CLS + patches, what the ETF loss
    sees); ``"patches"`` drops CLS.
    """

    def __init__(self, model, tokens: str = "all"):
        if tokens not in ("all", "patches"):
            raise ValueError(f"tokens must be 'all' or 'patches', got {tokens!r}")
        self.model, self.tokens = model, tokens
        E = model.adapter_config.num_experts
        n_layers = len(model.moe)
        z = lambda *s: [torch.zeros(*s, dtype=torch.float64) for _ in range(n_layers)]  # noqa: E731
        self._sim, self._cnt = z(E, E), z(E, E)
        self._top1, self._topk, self._prob = z(E), z(E), z(E)
        self._n = [0] * n_layers

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> TowerTrace:
        """Add a batch of pre-processed images (B, 3, S, S); returns the trace for reuse."""
        trace = trace_tower(self.model, images)
        E = self.model.adapter_config.num_experts
        start = 1 if self.tokens == "patches" else 0
        for i, (moe, x, r) in enumerate(zip(self.model.moe, trace.moe_inputs, trace.vision.routing)):
            x = x[:, start:]
            total, count = pairwise_cosine(expert_outputs(moe, x))
            self._sim[i] += total.cpu()
            self._cnt[i] += count.cpu()
            idx = r.indices[:, start:].reshape(-1, r.indices.shape[-1])
            self._top1[i] += torch.bincount(idx[:, 0], minlength=E).double().cpu()
            self._topk[i] += torch.bincount(idx.reshape(-1), minlength=E).double().cpu()
            self._prob[i] += r.probs[:, start:].reshape(-1, E).double().sum(0).cpu()
            self._n[i] += idx.shape[0]
        return trace

    def result(self) -> List[LayerExpertStats]:
        out = []
        for i, block in enumerate(self.model.adapter_config.moe_layers):
            n = max(self._n[i], 1)
            cnt = self._cnt[i]
            sim = torch.where(cnt > 0, self._sim[i] / cnt.clamp_min(1), torch.full_like(cnt, float("nan")))
            sim = 0.5 * (sim + sim.T)  # exact already; removes float asymmetry
            E = sim.shape[0]
            off = sim[~torch.eye(E, dtype=torch.bool)]
            off = off[~torch.isnan(off)]
            out.append(LayerExpertStats(
                block=int(block), similarity=sim.numpy(),
                mean_off_diagonal=float(off.mean()) if off.numel() else None,
                top1_fraction=(self._top1[i] / n).numpy(), topk_fraction=(self._topk[i] / n).numpy(),
                mean_probability=(self._prob[i] / n).numpy(), tokens=int(self._n[i])))
        return out


# --------------------------------------------------------------------------- one image
@dataclass
class ImageExplanation:
    """Everything ``moeclip explain`` shows for one image (numpy, batch dimension dropped)."""

    grid: Tuple[int, int]
    blocks: List[int]                 # 0-based vision block of each MoE layer
    top1: List[np.ndarray]            # per layer (H, W) int, top-1 expert per patch
    top1_count: List[np.ndarray]      # per layer (E,)
    top1_mean_weight: List[np.ndarray]  # per layer (E,), NaN where never top-1
    entropy: List[np.ndarray]         # per layer (H, W) nats
    max_entropy: float                # log E
    contributions: np.ndarray         # (M, H, W) per-map patch scores (pre-blur)
    smoothed: np.ndarray              # (M, S, S) blurred + upsampled contributions
    anomaly_map: np.ndarray           # (S, S) the model's map, == smoothed.sum(0)
    raw_score: float                  # (c_abnormal + 1) / 2
    labels: List[str]                 # map names

    def to_dict(self) -> dict:
        """The numbers of ``explain.json`` (no full-size arrays)."""
        E = len(self.top1_count[0]) if self.top1_count else 0
        P = self.grid[0] * self.grid[1]
        peak = np.unravel_index(int(np.argmax(self.anomaly_map)), self.anomaly_map.shape)
        layers = []
        for b, cnt, mw, ent in zip(self.blocks, self.top1_count, self.top1_mean_weight, self.entropy):
            layers.append({
                "block": b,
                "experts": [{"expert": e, "top1_patches": int(cnt[e]), "top1_fraction": float(cnt[e]) / P,
                             "mean_weight": None if np.isnan(mw[e]) else float(mw[e])} for e in range(E)],
                "entropy": {"mean": float(ent.mean()), "min": float(ent.min()), "max": float(ent.max()),
                            "uniform": self.max_entropy},
            })
        maps = []
        for j, name in enumerate(self.labels):
            c = self.contributions[j]
            maps.append({"index": j, "name": name, "patch_mean": float(c.mean()), "patch_min": float(c.min()),
                         "patch_max": float(c.max()), "at_peak": float(self.smoothed[j][peak])})
        return {
            "grid": list(self.grid),
            "num_experts": E,
            "layers": layers,
            "anomaly": {"map_max": float(self.anomaly_map.max()), "map_min": float(self.anomaly_map.min()),
                        "map_mean": float(self.anomaly_map.mean()), "peak": [int(peak[0]), int(peak[1])],
                        "raw_image_score": self.raw_score, "maps": maps},
        }


@torch.no_grad()
def explain_image(model, image: torch.Tensor, text: torch.Tensor,
                  domain: "Domain | str" = "industrial") -> ImageExplanation:
    """Routing maps, entropy and map contributions of one pre-processed image (1, 3, S, S)."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    cfg = model.adapter_config
    E = cfg.num_experts
    trace = trace_tower(model, image)
    v = trace.vision
    text = text.to(image.device, v.det_feature.dtype)
    size = tuple(image.shape[-2:])
    top1, cnt, mw, ent = [], [], [], []
    for r in v.routing:
        st = selection_stats(r, v.grid, E)
        top1.append(top1_selection(r, v.grid)[0].cpu().numpy())
        cnt.append(st["count"][0].cpu().numpy().astype(np.int64))
        mw.append(st["mean_weight"][0].cpu().numpy())
        ent.append(router_entropy(r, v.grid)[0].cpu().numpy())
    contrib = map_contributions(v.seg_features, text, v.grid)
    smoothed = smooth_maps(contrib, size, domain)
    amap = anomaly_map(v.seg_features, text, v.grid, size, domain)
    return ImageExplanation(
        grid=tuple(v.grid), blocks=list(cfg.moe_layers), top1=top1, top1_count=cnt, top1_mean_weight=mw,
        entropy=ent, max_entropy=math.log(E), contributions=contrib[0].float().cpu().numpy(),
        smoothed=smoothed[0].float().cpu().numpy(), anomaly_map=amap[0].float().cpu().numpy(),
        raw_score=float(image_score(v.det_feature, text)[0]), labels=map_labels(model))
