"""MoECLIP: a frozen CLIP whose vision tower gets MoE adapters, plus projections and a text adapter."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._imports import import_open_clip
from ..errors import MoECLIPError
from .backbone import create_clip, freeze, vision_dims
from .config import AdapterConfig, BackboneConfig, ModelConfig
from .losses import segmentation_losses_from_gap
from .moe import MoEAdapter
from .paa import patch_average_radii
from .projections import DetProjection, SegProjection, project_stacked
from .router import Routing
from .scoring import Domain, anomaly_map, image_score, segmentation_gap
from .text import TextAdapter, TextEncoder


@dataclass
class VisionOutput:
    seg_features: List[torch.Tensor]  # num_maps x (B, H*W, D), L2-normalised per patch, level-major
    det_feature: torch.Tensor         # (B, D) mean of L2-normalised detection tokens
    grid: Tuple[int, int]
    routing: List[Routing] = field(default_factory=list)  # one per MoE layer, shapes (B, 1 + H*W, .)
    balance_loss: Optional[torch.Tensor] = None
    etf_loss: Optional[torch.Tensor] = None
    moe_inputs: List[torch.Tensor] = field(default_factory=list)  # token streams entering each MoE adapter
    levels: List[torch.Tensor] = field(default_factory=list)  # (B, H*W, D) patch tokens per level (seg_head=False)
    seg_stacked: Optional[torch.Tensor] = None  # (num_maps, B, H*W, D): seg_features as one tensor


class MoECLIP(nn.Module):
    """The whole model. Only the adapters train; ``clip`` stays frozen and in eval mode."""

    def __init__(self, clip: nn.Module, adapter: Optional[AdapterConfig] = None, tokenizer=None,
                 backbone: Optional[BackboneConfig] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        dims = vision_dims(clip)
        cfg = (adapter if adapter is not None else AdapterConfig()).resolved(dims["depth"])
        self.config = ModelConfig(backbone=backbone or BackboneConfig(pretrained=None), adapter=cfg)
        self.grad_checkpoint = False
        self.frozen_dtype: Optional[torch.dtype] = None  # set by cast_frozen_weights
        freeze(clip)
        self.clip = clip
        self.sequence_first = use_sequence_first(clip.visual)
        width, embed_dim = dims["width"], dims["embed_dim"]
        dropout = 0.0 if cfg.released_training else cfg.lora_dropout
        self.moe = nn.ModuleList(
            MoEAdapter(width, cfg.num_experts, cfg.top_k, cfg.rank, cfg.alpha, dropout, cfg.fofs,
                       cfg.image_adapt_weight, generator)
            for _ in cfg.moe_layers
        )
        n_proj = len(cfg.levels) if cfg.seg_proj == "shared" else cfg.num_maps
        self.seg_proj = nn.ModuleList(SegProjection(width, embed_dim, cfg.relu) for _ in range(n_proj))
        self.det_proj = DetProjection(width, embed_dim)
        if tokenizer is None:
            open_clip = import_open_clip()

            tokenizer = open_clip.tokenize
        self.text = TextEncoder(clip, tokenizer, TextAdapter(dims["text_width"], embed_dim))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: ModelConfig, generator: Optional[torch.Generator] = None) -> "MoECLIP":
        clip = create_clip(config.backbone)
        return cls(clip, config.adapter, tokenizer_for(config.backbone.model), config.backbone, generator)

    @property
    def adapter_config(self) -> AdapterConfig:
        return self.config.adapter

    def train(self, mode: bool = True) -> "MoECLIP":
        super().train(mode)
        self.clip.eval()  # CLIP is always in eval mode (no dropout, no patch dropout)
        return self

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("clip.")]

    def adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        """Everything that is not CLIP: what a checkpoint stores (FOFS matrices included)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def load_adapter_state_dict(self, state: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            what = (f"missing {missing[:3]}" if missing else "") + ("; " if missing and unexpected else "") + \
                   (f"unexpected {unexpected[:3]}" if unexpected else "")
            raise MoECLIPError(f"{source}: adapter weights do not match the model ({what}); "
                               "check the hyper-parameters (experts, layers, levels, seg-proj, relu)")
        for k, v in expected.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise MoECLIPError(f"{source}: {k} has shape {tuple(state[k].shape)}, the model expects "
                                   f"{tuple(v.shape)}; check the hyper-parameters")
        self.load_state_dict({**self.clip_state_prefixed(), **state}, strict=True)

    def cast_frozen_weights(self, precision: str) -> "MoECLIP":
        """bf16/fp16 runs: keep the frozen vision tower's matmul weights in that dtype.

        Same results under autocast, bit for bit, without re-casting the frozen weights at
        every forward (see ``precision.cast_frozen_weights``). Afterwards the model must run
        under ``moeclip.precision.autocast(device, precision)``. The text tower is left
        alone: its output is cached per description.
        """
        from ..precision import PRECISIONS, cast_frozen_weights

        if precision == "fp32":
            return self
        if self.frozen_dtype not in (None, PRECISIONS.get(precision)):
            raise MoECLIPError(f"the frozen CLIP weights are already stored in {self.frozen_dtype}; "
                               f"reload the model to run in {precision}")
        cast_frozen_weights(self.clip.visual, precision)
        self.frozen_dtype = PRECISIONS[precision]
        return self

    def clip_state_prefixed(self) -> Dict[str, torch.Tensor]:
        return {f"clip.{k}": v for k, v in self.clip.state_dict().items()}

    # ------------------------------------------------------------------ vision
    def _losses_active(self) -> bool:
        cfg = self.adapter_config
        return self.training and not cfg.released_training and (cfg.etf_weight > 0 or cfg.balance_weight > 0)

    def encode_image(self, images: torch.Tensor, compute_losses: Optional[bool] = None,
                     keep_moe_inputs: bool = False, seg_head: bool = True) -> VisionOutput:
        """Run the tower with the MoE adapters; ``images`` are CLIP-normalised (B, 3, S, S).

        ``seg_head=False`` returns the levels' patch tokens instead of the seg features
        (``seg_features`` empty), for callers that run :meth:`seg_head` themselves.
        """
        cfg = self.adapter_config
        if compute_losses is None:
            compute_losses = self._losses_active()
        if self.frozen_dtype is not None and not (torch.is_autocast_enabled(images.device.type) and
                                                  torch.get_autocast_dtype(images.device.type) == self.frozen_dtype):
            raise MoECLIPError(f"the frozen CLIP weights are stored in {self.frozen_dtype} (cast_frozen_weights): "
                               "run the model under moeclip.precision.autocast with that precision")
        visual = self.clip.visual
        blocks = visual.transformer.resblocks
        moe_at = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        last = max(cfg.levels)
        first_moe = min(cfg.moe_layers, default=last)
        # blocks run on (L, B, D) when use_sequence_first() could switch them; results are (B, L, D)
        to_bld = (lambda t: t.transpose(0, 1)) if self.sequence_first else (lambda t: t)

        def run_block(i: int, x: torch.Tensor) -> torch.Tensor:
            if self.grad_checkpoint and torch.is_grad_enabled() and x.requires_grad:
                return checkpoint(blocks[i], x, use_reentrant=False)
            return blocks[i](x)

        def run_moe(k: int, x: torch.Tensor):
            # the adapters' saved tensors (LoRA dropout runs on E copies of the tokens) are
            # recomputed too; checkpoint restores the RNG, so the dropout masks are the same
            if self.grad_checkpoint and torch.is_grad_enabled():
                return checkpoint(self.moe[k], x, compute_losses, use_reentrant=False)
            return self.moe[k](x, compute_losses)

        levels, routing, bal, etf, inputs = [], [], [], [], []
        with torch.no_grad():
            x = visual._embeds(images.to(visual.conv1.weight.dtype))
            if self.sequence_first:
                x = x.transpose(0, 1).contiguous()
        for i in range(last):
            # Nothing up to the first MoE adapter depends on a trained weight: no autograd there.
            with torch.no_grad() if i <= first_moe else contextlib.nullcontext():
                x = run_block(i, x)
            if i in moe_at:
                if keep_moe_inputs:
                    inputs.append(to_bld(x))
                out = run_moe(moe_at[i], x)  # per token: any layout
                x = out.x
                routing.append(Routing(*(to_bld(t) for t in out.routing)))
                if compute_losses:
                    bal.append(out.balance_loss)
                    etf.append(out.etf_loss)
            if i + 1 in cfg.levels:
                levels.append(to_bld(x))

        grid = tuple(visual.grid_size)
        # ln_post is per token, so CLS can be dropped before PAA and the LayerNorm
        patches = [t[:, 1:] for t in levels]
        stacked = self.seg_stack(patches, grid) if seg_head else None
        det = F.normalize(self.det_proj(visual.ln_post(patches[-1])), dim=-1).mean(1)
        return VisionOutput(list(stacked.unbind(0)) if seg_head else [], det, grid, routing,
                            torch.stack(bal).sum() if bal else None,
                            torch.stack(etf).sum() if etf else None, inputs,
                            [] if seg_head else patches, stacked)

    def seg_head(self, patches: torch.Tensor, level: int, grid: Tuple[int, int]) -> List[torch.Tensor]:
        """One level's seg features: PAA per radius, ln_post, projection, L2 norm (level-major order)."""
        return list(self.seg_stack([patches], grid, [level]).unbind(0))

    def seg_stack(self, patches: Sequence[torch.Tensor], grid: Tuple[int, int],
                  levels: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Seg features of several levels as one (levels x radii, B, H*W, D) tensor, level-major.

        PAA, ln_post, the projections and the L2 norm each run once for all maps: at small
        sizes a training step is bound by the number of operations, not their size.
        """
        cfg = self.adapter_config
        levels = list(range(len(patches))) if levels is None else list(levels)
        n_r = len(cfg.paa_radii)
        x = self.clip.visual.ln_post(patch_average_radii(torch.stack(list(patches)), grid, cfg.paa_radii))
        x = x.transpose(1, 2)  # (levels, radii, B, L, width)
        if cfg.seg_proj == "shared":
            y = project_stacked(x, [self.seg_proj[v] for v in levels]).flatten(0, 1)
        else:
            y = project_stacked(x.flatten(0, 1), [self.seg_proj[v * n_r + k] for v in levels for k in range(n_r)])
        return F.normalize(y, dim=-1)

    # ------------------------------------------------------------------ text
    def text_features(self, description: str) -> torch.Tensor:
        """(D, 2) adapted text features [normal, abnormal] for an object description."""
        return self.text(description)

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def predict(self, images: torch.Tensor, text: "torch.Tensor | str", domain: "Domain | str" = "industrial",
                out_size: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
        """Raw anomaly maps (B, H, W) at ``out_size`` (default: the input size) and raw image scores (B,).

        Always without LoRA dropout, also on a model left in training mode (a fresh one is).
        """
        if isinstance(text, str):
            text = self.text_features(text)
        training = self.training
        if training:
            self.train(False)
        try:
            out = self.encode_image(images, compute_losses=False)
        finally:
            if training:
                self.train(True)
        text = text.to(out.det_feature.dtype)
        size = tuple(out_size) if out_size is not None else tuple(images.shape[-2:])
        maps = anomaly_map(out.seg_features, text, out.grid, size, domain)
        return {"anomaly_map": maps, "image_score": image_score(out.det_feature, text), "vision": out}

    # ------------------------------------------------------------------ training
    def compute_losses(self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                       text: torch.Tensor) -> Dict[str, torch.Tensor]:
        """All loss terms of one batch. ``text`` is (D, 2) for the whole batch or (B, D, 2) per image."""
        cfg = self.adapter_config
        low_memory = self.grad_checkpoint and torch.is_grad_enabled()
        out = self.encode_image(images, seg_head=not low_memory)
        if text.dim() == 2:
            text = text.unsqueeze(0).expand(images.shape[0], -1, -1)
        text = text.to(out.det_feature.dtype)
        logits = (out.det_feature.unsqueeze(1) @ text)[:, 0]
        ce = F.cross_entropy(logits.float(), labels.long())
        size = tuple(masks.shape[-2:])
        masks = masks.float()

        def maps_loss(f: torch.Tensor) -> torch.Tensor:  # (M, B, L, D) -> (M,)
            return segmentation_losses_from_gap(segmentation_gap(f, text, out.grid, size), masks)

        def level_losses(patches: torch.Tensor, level: int) -> torch.Tensor:
            return maps_loss(self.seg_stack([patches], out.grid, [level]))

        if low_memory:
            # At 518 px the seg head (PAA, LayerNorm, projection per map) and the 12 full-resolution
            # maps with their focal/Dice intermediates weigh more than the checkpointed blocks: keep
            # only each level's patch tokens and recompute one level's maps at a time in backward.
            seg = torch.cat([checkpoint(level_losses, t, i, use_reentrant=False) for i, t in enumerate(out.levels)])
        else:
            seg = maps_loss(out.seg_stacked)
        zero = ce.new_zeros(())
        bal = out.balance_loss if out.balance_loss is not None else zero
        etf = out.etf_loss if out.etf_loss is not None else zero
        total = ce + seg.sum() + cfg.balance_weight * bal + cfg.etf_weight * etf
        return {"total": total, "ce": ce, "seg": seg, "balance": bal, "etf": etf}


def use_sequence_first(visual: nn.Module) -> bool:
    """Switch the vision blocks to (L, B, D) inputs; True when every block could be switched.

    With ``batch_first=True`` (open_clip's default), ``nn.MultiheadAttention`` leaves its fused
    path whenever autograd records or the input is bf16, transposes to (L, B, D) and projects
    a non-contiguous view: on CPU a bf16 training step of ViT-L became 36x slower
    (benchmarks/README.md). Running the blocks sequence-first is the same computation. The
    tower's own ``Transformer.forward`` follows its ``batch_first`` flag, so ``encode_image``
    of the CLIP keeps working.
    """
    blocks = list(visual.transformer.resblocks)
    if not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks):
        return not getattr(visual.transformer, "batch_first", True)
    visual.transformer.batch_first = False
    for b in blocks:
        b.attn.batch_first = False
    return True


def tokenizer_for(model: str):
    """open_clip's tokenizer for a named architecture; the CLIP BPE tokenizer for JSON configs."""
    open_clip = import_open_clip()

    if model.endswith(".json"):
        return open_clip.tokenize
    return open_clip.get_tokenizer(model)
