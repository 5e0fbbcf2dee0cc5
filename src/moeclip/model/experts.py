"""LoRA experts, stored stacked so that all experts of a layer run as batched matmuls."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .fofs import fofs_down_projections


class LoRAExperts(nn.Module):
    """E low-rank maps ``x -> B_e A_e x * alpha / r``.

    ``lora_A`` is (E, r, d), ``lora_B`` is (E, d, r). With FOFS, ``lora_A`` is the frozen
    orthogonal split of the input features; otherwise it is Kaiming-uniform and trains.
    ``lora_B`` starts at zero, so an untrained expert outputs zero.
    """

    def __init__(self, width: int, num_experts: int, rank: int, alpha: float, dropout: float = 0.0,
                 fofs: bool = True, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.num_experts, self.rank, self.scaling = num_experts, rank, alpha / rank
        self.dropout = dropout
        if fofs:
            A = fofs_down_projections(width, num_experts, rank, generator)
        else:
            A = torch.empty(num_experts, rank, width)
            for e in range(num_experts):  # nn.Linear's default init, as the reference LoRA
                nn.init.kaiming_uniform_(A[e], a=math.sqrt(5))
        self.lora_A = nn.Parameter(A, requires_grad=not fofs)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, width, rank))

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, E, r). LoRA dropout is drawn independently for each expert."""
        if self.training and self.dropout > 0:
            blocks = self._diagonal_blocks()
            if blocks is not None:
                # FOFS: expert e reads only its own feature chunk, so only the chunk needs a
                # dropout mask (an E-th of the random draws, which dominate this op on CPU)
                N, d = x.shape
                xs = nn.functional.dropout(x.view(N, self.num_experts, -1), self.dropout, True)
                return torch.einsum("nec,erc->ner", xs, blocks.to(x.dtype))
            xs = nn.functional.dropout(x.unsqueeze(0).expand(self.num_experts, *x.shape), self.dropout, True)
            return torch.einsum("end,erd->ner", xs, self.lora_A.to(x.dtype))
        N, d = x.shape
        return (x @ self.lora_A.to(x.dtype).reshape(-1, d).T).view(N, self.num_experts, self.rank)

    def _diagonal_blocks(self) -> Optional[torch.Tensor]:
        """(E, r, d/E): the experts' chunks of ``lora_A`` when it is frozen and block-diagonal
        over equal contiguous chunks (FOFS with E dividing d), else None.

        Checked again whenever the weights change (a loaded checkpoint may hold anything).
        """
        A = self.lora_A
        E, r, d = A.shape
        if A.requires_grad or d % E:
            return None
        key = (A.data_ptr(), A._version, A.device, A.dtype)
        if getattr(self, "_blocks_key", None) != key:
            # an ordinary tensor even when first built under inference mode: training reuses it
            with torch.inference_mode(False), torch.no_grad():
                grid = A.view(E, r, E, d // E)
                blocks = grid.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()  # (E, r, d/E)
                off = grid.abs().sum((1, 3)).fill_diagonal_(0).max().item() > 0
            self._blocks = None if off else blocks
            self._blocks_key = key
        return self._blocks

    def mix(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_e w_e B_e h_e for dense weights (N, E) (zero outside the top-k): one matmul."""
        hw = (h * weights.unsqueeze(-1).to(h.dtype)).reshape(h.shape[0], -1)  # (N, E*r)
        B = self.lora_B.to(h.dtype).permute(1, 0, 2).reshape(self.lora_B.shape[1], -1)  # (d, E*r)
        return (hw @ B.T) * self.scaling

    def output_gram(self, h: torch.Tensor) -> torch.Tensor:
        """(N, E, E) Gram matrices of the experts' outputs per token, in float32, for the ETF loss.

        ``<o_e, o_f> = s^2 h_e^T (B_e^T B_f) h_f``: the (E r x E r) matrix ``B^T B`` is formed once,
        so the (N, E, d) outputs are never materialised (4x faster at the demo's size, more at d = 1024).
        """
        E, d, r = self.lora_B.shape
        with torch.autocast(h.device.type, enabled=False):
            Bf = self.lora_B.float().permute(0, 2, 1).reshape(E * r, d)
            C = (Bf @ Bf.T).view(E, r, E, r)  # C[e, r, f, s] = <B_e[:, r], B_f[:, s]>
            h = h.float()
            Y = torch.einsum("erfs,nfs->nerf", C, h)
            return torch.einsum("ner,nerf->nef", h, Y) * (self.scaling ** 2)

    def all_outputs(self, h: torch.Tensor) -> torch.Tensor:
        """(N, E, d): every expert's output for every token (the ETF loss needs them all)."""
        return torch.einsum("ner,edr->ned", h, self.lora_B.to(h.dtype)) * self.scaling
