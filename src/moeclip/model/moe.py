"""The MoE adapter inserted after a frozen vision block: router + LoRA experts + norm-matched mix."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .experts import LoRAExperts
from .losses import balance_loss, etf_loss_from_gram
from .router import Router, Routing


class MoEOutput(NamedTuple):
    x: torch.Tensor                       # (B, L, d) mixed token stream for the next block
    routing: Routing                      # per token, shapes (B, L, .)
    balance_loss: Optional[torch.Tensor]  # only when losses are requested
    etf_loss: Optional[torch.Tensor]


class MoEAdapter(nn.Module):
    """``x <- w * m * |x| / (|m| + eps) + (1 - w) * x`` with ``m`` the routed sum of experts.

    Rescaling ``m`` to the token's norm keeps the mixed stream on the scale the next frozen
    block expects, whatever the experts' output scale.
    """

    def __init__(self, width: int, num_experts: int, top_k: int, rank: int, alpha: float,
                 dropout: float, fofs: bool, mix_weight: float, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.mix_weight = mix_weight
        self.router = Router(width, num_experts, top_k)
        self.experts = LoRAExperts(width, num_experts, rank, alpha, dropout, fofs, generator)

    def forward(self, x: torch.Tensor, compute_losses: bool = False) -> MoEOutput:
        B, L, d = x.shape
        flat = x.reshape(B * L, d)
        routing = self.router(flat)
        dense = self.router.dense_weights(routing)
        h = self.experts.down(flat)
        bal = etf = None
        m = self.experts.mix(h, dense)
        if compute_losses:
            etf, bal = etf_loss_from_gram(self.experts.output_gram(h)), balance_loss(routing.probs)
        m = m * (flat.norm(dim=-1, keepdim=True) / (m.norm(dim=-1, keepdim=True) + 1e-6))
        out = self.mix_weight * m + (1.0 - self.mix_weight) * flat
        routing = Routing(*(t.view(B, L, -1) for t in routing))
        return MoEOutput(out.view(B, L, d), routing, bal, etf)
