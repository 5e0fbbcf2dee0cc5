"""The MoE router: which LoRA experts each token goes to."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Routing(NamedTuple):
    probs: torch.Tensor    # (..., E) softmax probabilities, float32
    indices: torch.Tensor  # (..., k) chosen experts, most probable first
    weights: torch.Tensor  # (..., k) renormalised weights of the chosen experts (sum to 1)


class Router(nn.Module):
    """Bias-free linear gate, softmax in float32, top-k kept and renormalised.

    The gate starts at zero, so every token starts with uniform probabilities and the
    top-k tie is broken by expert index.
    """

    def __init__(self, width: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(width, num_experts, bias=False)
        nn.init.zeros_(self.gate.weight)

    def forward(self, x: torch.Tensor) -> Routing:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(probs, indices, weights)

    def dense_weights(self, routing: Routing) -> torch.Tensor:
        """(..., E) weights with zeros for experts outside the top-k."""
        dense = torch.zeros_like(routing.probs)
        return dense.scatter(-1, routing.indices, routing.weights)
