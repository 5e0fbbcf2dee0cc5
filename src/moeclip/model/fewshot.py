"""Few-shot anomaly maps from a memory bank of normal reference images (no retraining).

Memory bank: for K normal reference images of one product, the 12 segmentation features the
zero-shot map already uses (4 levels x 3 PAA radii, after the MoE adapters, PAA, ``ln_post``, the
projection and the L2 norm; :meth:`MoECLIP.encode_image` ``seg_features``), one bank per map::

    bank_m = { r : r a patch feature of map m of one of the K references }     |bank_m| = K H W

Few-shot map of a test image with patch features f_m (per map m, per patch)::

    d_m(f) = min over r in bank_m of (1 - cos(f, r)) / 2        in [0, 1]
    M_fs   = blur(upsample(mean over the maps of d_m))         the zero-shot map's smoothing

The nearest neighbour is exact, found by chunked matrix products (never a K x HW x HW tensor).
A large bank can be subsampled per map with PatchCore's greedy k-center coreset
(:func:`greedy_coreset`) and stored in fp16. Fusion with the zero-shot map is
:mod:`moeclip.model.fusion`; the normal statistics it standardises by are measured here, once,
when the bank is built (:func:`reference_stats`: leave-one-out over the K >= 2 references).

Banks are saved as safetensors with metadata (object, K, image size, the model's fingerprint,
the normal statistics); loading one into a different model (another checkpoint, backbone or image
size) is refused. Files written before the statistics existed (version 1) get them recomputed
from their features when the bank holds every reference patch (no coreset), else a clear error.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import MoECLIPError
from .domain import Domain
from .fusion import ReferenceStats, robust_stats
from .scoring import anomaly_map, image_score, smooth_patch_map

BANK_FORMAT = "moeclip-bank"
BANK_VERSION = "2"

#: Elements of one (queries x bank entries) similarity block: 32 MiB in float32 (ViT-L at 518 px:
#: one block per map up to K = 6; smaller blocks cost up to ~15 % more on CPU, larger ones nothing).
CHUNK_ELEMENTS = 1 << 23


# ---------------------------------------------------------------------------- the model's identity
def model_fingerprint(model) -> str:
    """A short hash of what the seg features depend on: adapters, config, the CLIP's own vectors.

    Hashes every adapter tensor, the adapter config and image size, and the vision tower's
    tensors that :func:`moeclip.precision.cast_frozen_weights` never casts (embeddings,
    LayerNorms, ``proj``), so the same checkpoint gives the same fingerprint in fp32 and bf16
    while another checkpoint or backbone does not. Cheap: no pass over the big matrices.
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    h.update(json.dumps({"adapter": cfg["adapter"], "image_size": cfg["backbone"]["image_size"]},
                        sort_keys=True).encode())
    tensors = dict(model.adapter_state_dict())
    cast = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention)
    visual = model.clip.visual
    for mod_name, mod in visual.named_modules():
        if isinstance(mod, cast):
            continue
        for name, p in mod.named_parameters(recurse=False):
            tensors[f"clip.visual.{mod_name}.{name}"] = p
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu", torch.float32).contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- nearest neighbours
def nearest_distance(query: torch.Tensor, bank: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """``min over r of (1 - cos(q, r)) / 2`` for each row q of ``query`` (..., D) against ``bank`` (N, D).

    Both sides are L2-normalised features, so the cosine is a dot product; the (queries x
    bank) similarity matrix is built block by block, at most ``chunk_elements`` at a time, in
    float32 (an fp16 bank is cast per block).
    """
    lead = query.shape[:-1]
    q = query.reshape(-1, query.shape[-1]).to(torch.float32)
    n_q, n_b = q.shape[0], bank.shape[0]
    if n_b == 0:
        raise MoECLIPError("the memory bank is empty")
    q_step = max(1, min(n_q, chunk_elements))
    b_step = max(1, chunk_elements // q_step)
    best = torch.full((n_q,), -float("inf"), dtype=torch.float32, device=q.device)
    for qs in range(0, n_q, q_step):
        qq = q[qs:qs + q_step]
        top = best[qs:qs + q_step]
        for bs in range(0, n_b, b_step):
            block = bank[bs:bs + b_step].to(device=q.device, dtype=torch.float32)
            torch.maximum(top, (qq @ block.T).amax(dim=1), out=top)
    return ((1.0 - best) * 0.5).clamp_(0.0, 1.0).reshape(lead)


def greedy_coreset(features: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """PatchCore's greedy k-center subsampling: ``n`` row indices of ``features`` (N, D).

    Starts from row ``start``; each step adds the row farthest (Euclidean) from everything
    chosen so far, so the chosen rows cover the set with the smallest radius greedy can find.
    """
    x = features.to(torch.float32)
    N = x.shape[0]
    if n >= N:
        return torch.arange(N)
    if n < 1:
        raise MoECLIPError(f"bank size must be at least 1, got {n}")
    sq = (x * x).sum(1)

    def dist_to(i: int) -> torch.Tensor:
        return (sq - 2.0 * (x @ x[i]) + sq[i]).clamp_(min=0.0)

    chosen = [int(start)]
    min_d = dist_to(chosen[0])
    for _ in range(n - 1):
        i = int(torch.argmax(min_d))
        chosen.append(i)
        torch.minimum(min_d, dist_to(i), out=min_d)
    return torch.tensor(chosen, dtype=torch.long)


# ---------------------------------------------------------------------------- the bank
@dataclass
class MemoryBank:
    """Reference patch features of one object, one (N_m, D) tensor per seg map (level-major)."""

    features: List[torch.Tensor]
    object: str
    num_references: int
    image_size: int
    grid: Tuple[int, int]
    fingerprint: str
    references: List[str] = field(default_factory=list)
    bank_size: Optional[int] = None
    stats: Optional[ReferenceStats] = None  # leave-one-out normal statistics (None: fewer than 2 references)

    @property
    def num_maps(self) -> int:
        return len(self.features)

    @property
    def dtype(self) -> torch.dtype:
        return self.features[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.features)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "MemoryBank":
        feats = [t.to(device=device, dtype=dtype or t.dtype) for t in self.features]
        return MemoryBank(feats, self.object, self.num_references, self.image_size, self.grid, self.fingerprint,
                          list(self.references), self.bank_size, self.stats)

    @property
    def complete(self) -> bool:
        """Whether the bank still holds every patch of every reference (no coreset)."""
        return int(self.features[0].shape[0]) == self.num_references * self.grid[0] * self.grid[1]

    def normal_stats(self, model, text: torch.Tensor, domain: "Domain | str" = "industrial",
                     source: str = "memory bank") -> Optional[ReferenceStats]:
        """The leave-one-out statistics for ``domain``: stored, else measured on the bank's own features.

        None with a single reference (the fusion then standardises by the scored batch). A
        coreset bank without stored statistics for ``domain`` cannot be measured again: refused.
        """
        dom = Domain.parse(domain).value
        if self.stats is not None and self.stats.domain == dom:
            return self.stats
        if self.num_references < 2:
            return None
        if not self.complete:
            raise MoECLIPError(f"{source}: the bank has no normal statistics for the {dom} domain and keeps only "
                               "a coreset of its references; rebuild it from the reference images")
        L = self.grid[0] * self.grid[1]
        feats = [f.float().reshape(self.num_references, L, -1) for f in self.features]
        self.stats = reference_stats(feats, text.to(feats[0].device, torch.float32), self.grid, self.image_size, dom)
        return self.stats

    def check_model(self, model, source: str = "memory bank") -> None:
        """Refuse a bank built with another model or image size, with the reason."""
        cfg = model.adapter_config
        size = model.config.backbone.image_size
        if self.num_maps != cfg.num_maps:
            raise MoECLIPError(f"{source}: the bank has {self.num_maps} maps, the model makes {cfg.num_maps}")
        if int(self.image_size) != int(size):
            raise MoECLIPError(f"{source}: the bank was built at {self.image_size} px, the model runs at {size} px; "
                               "rebuild it from the reference images")
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            raise MoECLIPError(f"{source}: the bank was built with another model (fingerprint {self.fingerprint}, "
                               f"this model {fp}); rebuild it from the reference images with this checkpoint")

    # -------------------------------------------------------------- scoring
    def patch_distances(self, seg_features: Sequence[torch.Tensor],
                        chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
        """Mean over the maps of ``d_m``: (B, H*W), on the patch grid."""
        if len(seg_features) != self.num_maps:
            raise MoECLIPError(f"{len(seg_features)} feature maps given, the bank has {self.num_maps}")
        total = sum(nearest_distance(f, b, chunk_elements) for f, b in zip(seg_features, self.features))
        return total / self.num_maps

    def anomaly_map(self, seg_features: Sequence[torch.Tensor], grid: Tuple[int, int], out_size: Tuple[int, int],
                    domain: "Domain | str" = "industrial", chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
        """The few-shot map ``M_fs`` (B, H, W): patch distances, blurred and upsampled like the zero-shot map."""
        if tuple(grid) != tuple(self.grid):
            raise MoECLIPError(f"the bank's patch grid is {tuple(self.grid)}, the image's is {tuple(grid)}")
        return smooth_patch_map(self.patch_distances(seg_features, chunk_elements), grid, out_size, domain)

    # -------------------------------------------------------------- files
    def save(self, path: Union[str, Path], overwrite: bool = False) -> Path:
        """One safetensors file: ``map.NN`` tensors plus the metadata :meth:`load` checks."""
        from safetensors.torch import save_file

        from ..fileio import atomic_write

        path = Path(path)
        tensors = {f"map.{i:02d}": t.detach().to("cpu").contiguous() for i, t in enumerate(self.features)}
        meta = {"format": BANK_FORMAT, "version": BANK_VERSION, "object": self.object,
                "num_references": str(self.num_references), "image_size": str(self.image_size),
                "grid": json.dumps(list(self.grid)), "fingerprint": self.fingerprint,
                "references": json.dumps(self.references),
                "bank_size": "" if self.bank_size is None else str(self.bank_size),
                "normal_stats": "" if self.stats is None else self.stats.to_json()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite=overwrite)
        return path

    @classmethod
    def load(cls, path: Union[str, Path], model=None, device=None) -> "MemoryBank":
        """Read a bank file; with ``model``, refuse it unless it was built with that model."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MoECLIPError(f"{path}: memory bank file not found")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                keys = sorted(k for k in fh.keys() if k.startswith("map."))
                feats = [fh.get_tensor(k) for k in keys]
        except Exception as exc:  # safetensors raises its own types for corrupt files
            raise MoECLIPError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
        if meta.get("format") != BANK_FORMAT or not feats:
            raise MoECLIPError(f"{path}: not a moeclip memory bank (format={meta.get('format')!r})")
        try:
            bank = cls(feats, meta["object"], int(meta["num_references"]), int(meta["image_size"]),
                       tuple(json.loads(meta["grid"])), meta["fingerprint"], json.loads(meta.get("references", "[]")),
                       int(meta["bank_size"]) if meta.get("bank_size") else None,
                       ReferenceStats.from_json(meta["normal_stats"]) if meta.get("normal_stats") else None)
        except (KeyError, ValueError, TypeError) as exc:
            raise MoECLIPError(f"{path}: memory bank metadata is incomplete ({exc})") from None
        if model is not None:
            bank.check_model(model, str(path))
        return bank.to(device) if device is not None else bank


# ---------------------------------------------------------------------------- building
def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        for s in range(0, images.shape[0], batch_size):
            yield images[s:s + batch_size]
    else:
        for batch in images:
            yield batch


@torch.inference_mode()
def extract_features(model, images, batch_size: int = 8,
                     precision: str = "fp32") -> Tuple[List[torch.Tensor], Tuple[int, int], int]:
    """Seg features of preprocessed images ((K, 3, S, S) or an iterable of batches), stacked per map.

    Returns (per map a (K H W, D) float32 tensor on the model's device, the patch grid, K).
    """
    from ..precision import autocast

    device = _device_of(model)
    per_map: List[List[torch.Tensor]] = []
    grid, count = None, 0
    for batch in _batches(images, batch_size):
        with autocast(device, precision):
            out = model.encode_image(batch.to(device), compute_losses=False)
        if not per_map:
            per_map = [[] for _ in out.seg_features]
        for acc, f in zip(per_map, out.seg_features):
            acc.append(f.reshape(-1, f.shape[-1]).float())
        grid, count = tuple(out.grid), count + batch.shape[0]
    if count == 0:
        raise MoECLIPError("no reference images given")
    return [torch.cat(a) for a in per_map], grid, count


@torch.inference_mode()
def reference_stats(features: Sequence[torch.Tensor], text: torch.Tensor, grid: Tuple[int, int], image_size: int,
                    domain: "Domain | str" = "industrial",
                    chunk_elements: int = CHUNK_ELEMENTS) -> Optional[ReferenceStats]:
    """Leave-one-out normal statistics of K >= 2 references (None for one reference).

    ``features``: per map the references' seg features (K, H*W, D). Each reference's few-shot map
    is its distance to the bank of the *other* K - 1 (so it is never compared with itself), and
    its zero-shot map is the text's; both at ``image_size`` with the domain's smoothing, exactly
    as a test image's maps are, and :func:`moeclip.model.fusion.robust_stats` of all their pixels.
    """
    K = int(features[0].shape[0])
    if K < 2:
        return None
    size = (int(image_size), int(image_size))
    feats = [f.float() for f in features]
    text = text.to(feats[0].device, torch.float32)
    zs = anomaly_map(feats, text, grid, size, domain).float()
    loo = []
    for k in range(K):  # the nearest of the others = the min over each other reference's nearest (no copy)
        per_map = [torch.stack([nearest_distance(f[k], f[j], chunk_elements) for j in range(K) if j != k]).amin(0)
                   for f in feats]
        loo.append(sum(per_map) / len(feats))
    fs = smooth_patch_map(torch.stack(loo), grid, size, domain).float()
    return ReferenceStats(robust_stats(zs.cpu().numpy()), robust_stats(fs.cpu().numpy()), Domain.parse(domain).value)


def build_bank(model, images, object: str = "", *, references: Sequence[str] = (), bank_size: Optional[int] = None,
               fp16: bool = False, batch_size: int = 8, precision: str = "fp32", text: Optional[torch.Tensor] = None,
               domain: "Domain | str" = "industrial") -> MemoryBank:
    """The memory bank of preprocessed normal reference images for ``object``, with its normal statistics.

    ``bank_size`` keeps at most that many entries per map (greedy coreset); ``fp16`` stores
    the bank in half precision (half the memory; similarities are still float32). The
    statistics (:func:`reference_stats`, from every reference patch, before any coreset) use
    ``text`` (default: the model's features of ``object``) and ``domain``'s smoothing.
    """
    from .prompts import GENERIC_OBJECT

    feats, grid, count = extract_features(model, images, batch_size, precision)
    if text is None:
        with torch.inference_mode():
            text = model.text_features(object or GENERIC_OBJECT)
    L = grid[0] * grid[1]
    stats = reference_stats([f.reshape(count, L, -1) for f in feats], text, grid,
                            int(model.config.backbone.image_size), domain)
    if bank_size is not None:
        feats = [f[greedy_coreset(f, int(bank_size)).to(f.device)] for f in feats]
    if fp16:
        feats = [f.half() for f in feats]
    return MemoryBank(feats, object, count, int(model.config.backbone.image_size), grid, model_fingerprint(model),
                      [str(r) for r in references], bank_size, stats)


# ---------------------------------------------------------------------------- one forward, both maps
@torch.inference_mode()
def predict_with_bank(model, images: torch.Tensor, text: torch.Tensor, bank: Optional[MemoryBank],
                      domain: "Domain | str" = "industrial", out_size: Optional[Sequence[int]] = None,
                      chunk_elements: int = CHUNK_ELEMENTS) -> Dict[str, torch.Tensor]:
    """Zero-shot raw maps and scores plus the few-shot map, from one pass through the tower.

    Returns ``anomaly_map`` (raw zero-shot, B x H x W), ``image_score`` (raw, B) and, with a
    bank, ``few_shot_map`` (B x H x W in [0, 1]); all float32. Run under the model's autocast.
    """
    out = model.encode_image(images, compute_losses=False)
    text = text.to(out.det_feature.dtype)
    size = tuple(out_size) if out_size is not None else tuple(images.shape[-2:])
    res = {"anomaly_map": anomaly_map(out.seg_features, text, out.grid, size, domain).float(),
           "image_score": image_score(out.det_feature, text).float()}
    if bank is not None:
        res["few_shot_map"] = bank.anomaly_map([f.float() for f in out.seg_features], out.grid, size, domain,
                                               chunk_elements).float()
    return res


def bank_summary(bank: MemoryBank) -> Dict[str, object]:
    """What ``GET /references`` and logs show of a bank."""
    return {"object": bank.object, "references": bank.num_references, "entries_per_map": int(bank.features[0].shape[0]),
            "dtype": str(bank.dtype).replace("torch.", ""), "bytes": bank.nbytes, "fingerprint": bank.fingerprint,
            "normal_stats": None if bank.stats is None else json.loads(bank.stats.to_json())}
