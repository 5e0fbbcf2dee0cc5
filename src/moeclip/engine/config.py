"""Training options as a plain dataclass (no torch import: the CLI reads its defaults)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass
class TrainConfig:
    """Defaults are the official protocol (released code's learning rate; the paper states 5e-4)."""

    epochs: int = 20
    batch_size: int = 2
    lr: float = 5e-5
    betas: Tuple[float, float] = (0.5, 0.999)
    milestones: Tuple[int, ...] = (16000, 32000)
    gamma: float = 0.5
    seed: int = 111
    precision: str = "fp32"
    grad_accum: int = 1
    workers: int = 0
    grad_checkpoint: bool = False
    max_steps: Optional[int] = None  # stop early (smoke tests, the demo's time budget)
    augment: bool = True
    include_backbone: bool = False   # store the CLIP in the checkpoint (random/custom backbones)
    val_metric: str = "pixel_auroc"
