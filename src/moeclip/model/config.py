"""Plain dataclass configs: everything needed to rebuild a model, serialisable as JSON."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..errors import MoECLIPError


@dataclass
class BackboneConfig:
    """Which frozen CLIP to wrap.

    ``model`` is an open_clip architecture name (``ViT-L-14-336``) or the path of a
    JSON model config in open_clip's format. ``pretrained`` is an open_clip tag
    (``openai``, downloaded by open_clip), a local weight file (OpenAI ``.pt``,
    open_clip checkpoint, ``.safetensors``) or ``None`` for random weights.
    """

    model: str = "ViT-L-14-336"
    pretrained: Optional[str] = "openai"
    image_size: int = 518
    quick_gelu: bool = False  # the released checkpoints were trained with plain GELU


@dataclass
class AdapterConfig:
    """MoECLIP hyper-parameters; defaults are the paper's.

    ``moe_layers`` (0-based block indices) and ``levels`` (1-based block outputs)
    default to the quarter points of the vision tower's depth, which for the 24
    blocks of ViT-L gives the paper's [5, 11, 17, 23] and [6, 12, 18, 24].
    """

    num_experts: int = 4
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.05
    moe_layers: Optional[List[int]] = None
    levels: Optional[List[int]] = None
    image_adapt_weight: float = 0.1
    fofs: bool = True
    paa: bool = True
    paa_radii: List[int] = field(default_factory=lambda: [1, 3, 5])
    seg_proj: str = "shared"  # "shared": one projection per level; "separate": one per map
    relu: bool = False        # LeakyReLU after the seg projections
    etf_weight: float = 0.01
    balance_weight: float = 0.01
    released_training: bool = False  # reproduce the released train.py: no ETF/balance loss, no LoRA dropout

    def resolved(self, depth: int) -> "AdapterConfig":
        """Fill depth-dependent defaults and check the values against a tower of ``depth`` blocks."""
        cfg = dataclasses.replace(self)
        if cfg.moe_layers is None:
            cfg.moe_layers = [depth * q // 4 - 1 for q in (1, 2, 3, 4)]
        if cfg.levels is None:
            cfg.levels = [depth * q // 4 for q in (1, 2, 3, 4)]
        cfg.moe_layers = sorted(int(i) for i in cfg.moe_layers)
        cfg.levels = sorted(int(i) for i in cfg.levels)
        if not cfg.paa:
            cfg.paa_radii = [1]
        cfg.validate(depth)
        return cfg

    def validate(self, depth: Optional[int] = None) -> None:
        def bad(msg):
            raise MoECLIPError(f"invalid adapter config: {msg}")

        if self.num_experts < 1:
            bad(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            bad(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.rank < 1:
            bad(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.seg_proj not in ("shared", "separate"):
            bad(f"seg_proj must be 'shared' or 'separate', got {self.seg_proj!r}")
        if any(r < 1 or r % 2 == 0 for r in self.paa_radii):
            bad(f"PAA radii must be odd and >= 1, got {self.paa_radii}")
        if depth is not None:
            for i in self.moe_layers or []:
                if not 0 <= i < depth:
                    bad(f"MoE layer {i} outside the vision tower's blocks 0..{depth - 1}")
            for lv in self.levels or []:
                if not 1 <= lv <= depth:
                    bad(f"feature level {lv} outside 1..{depth}")
        if self.levels is not None and len(self.levels) == 0:
            bad("at least one feature level is needed")

    @property
    def num_maps(self) -> int:
        return len(self.levels) * len(self.paa_radii)


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "config") -> "ModelConfig":
        try:
            return cls(
                backbone=_build(BackboneConfig, d.get("backbone", {}), source),
                adapter=_build(AdapterConfig, d.get("adapter", {}), source),
            )
        except TypeError as exc:
            raise MoECLIPError(f"{source}: {exc}") from None


def _build(kind, values: Dict[str, Any], source: str):
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise MoECLIPError(f"{source}: unknown {kind.__name__} field(s) {unknown}")
    return kind(**values)
