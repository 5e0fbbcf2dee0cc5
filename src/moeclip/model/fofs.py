"""FOFS: Frozen Orthogonal Feature Separation of the LoRA down-projections."""
from __future__ import annotations

from typing import List, Optional

import torch

from ..errors import MoECLIPError


def feature_chunks(width: int, num_experts: int) -> List[slice]:
    """Contiguous input-feature chunks, one per expert; the first ``width % E`` are one larger."""
    base, extra = divmod(width, num_experts)
    chunks, start = [], 0
    for e in range(num_experts):
        size = base + (1 if e < extra else 0)
        chunks.append(slice(start, start + size))
        start += size
    return chunks


def fofs_down_projections(width: int, num_experts: int, rank: int,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(E, r, d) down-projections: expert e reads only its feature chunk, through orthonormal rows.

    Disjoint supports make the experts see different features by construction, so they
    cannot collapse onto the same subspace; the matrices stay frozen during training.
    """
    A = torch.zeros(num_experts, rank, width)
    for e, chunk in enumerate(feature_chunks(width, num_experts)):
        size = chunk.stop - chunk.start
        if size < rank:
            raise MoECLIPError(f"FOFS needs at least rank={rank} features per expert, chunk {e} has {size}")
        q, _ = torch.linalg.qr(torch.randn(size, rank, generator=generator))
        A[e, :, chunk] = q.T
    return A
