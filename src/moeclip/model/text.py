"""Text side: frozen CLIP text tower (cached per description) + the trainable text adapter."""
from __future__ import annotations

import threading
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._imports import import_open_clip
from .prompts import state_prompts


class TextAdapter(nn.Module):
    """Bias-free linear + LeakyReLU on the EOT token of ``ln_final`` (CLIP's text_projection is skipped)."""

    def __init__(self, text_width: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(text_width, embed_dim, bias=False)
        self.act = nn.LeakyReLU()
        nn.init.xavier_uniform_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(x))


def _pool_states(embeddings: torch.Tensor, n_normal: int) -> torch.Tensor:
    """Normalise each sentence, average within each state, normalise again -> (D, 2)."""
    e = F.normalize(embeddings, dim=-1)
    normal = F.normalize(e[:n_normal].mean(0), dim=-1)
    abnormal = F.normalize(e[n_normal:].mean(0), dim=-1)
    return torch.stack([normal, abnormal], dim=1)


class TextEncoder(nn.Module):
    """Turns an object description into the (D, 2) matrix T = [t_normal, t_abnormal].

    The frozen part (tokens -> transformer -> ln_final -> EOT token) does not depend on any
    trained weight, so it is computed once per description and cached; a training step only
    re-applies the adapter. The cache is guarded for concurrent use (the web service).
    """

    def __init__(self, clip: nn.Module, tokenizer: Callable, adapter: TextAdapter):
        super().__init__()
        self.adapter = adapter
        # kept out of the module tree: the CLIP belongs to the parent model
        self._clip = [clip]
        self.tokenizer = tokenizer
        self._cache: Dict[Tuple[str, str], Tuple[torch.Tensor, int]] = {}
        self._lock = threading.Lock()

    @property
    def clip(self) -> nn.Module:
        return self._clip[0]

    def tokenize(self, description: str) -> Tuple[torch.Tensor, int]:
        normal, abnormal = state_prompts(description)
        return self.tokenizer(normal + abnormal), len(normal)

    @torch.no_grad()
    def frozen_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """EOT token after ``ln_final`` for each prompt: (n, text_width), float32."""
        text_global_pool = import_open_clip().transformer.text_global_pool

        clip = self.clip
        device = clip.token_embedding.weight.device
        tokens = tokens.to(device)
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding.to(cast)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        return x.float()

    def _cached(self, description: str, kind: str) -> Tuple[torch.Tensor, int]:
        key = (description, kind)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        tokens, n_normal = self.tokenize(description)
        # ordinary (not inference-mode) tensors, so a cache filled by predict() also serves training
        with torch.inference_mode(False), torch.no_grad():
            if kind == "frozen":
                feats = self.frozen_features(tokens)
            else:  # plain CLIP text embedding (with text_projection)
                feats = self.clip.encode_text(tokens.to(self.clip.token_embedding.weight.device)).float()
        with self._lock:
            self._cache[key] = (feats, n_normal)
        return feats, n_normal

    def forward(self, description: str) -> torch.Tensor:
        """Adapted text features (D, 2); differentiable w.r.t. the adapter only."""
        feats, n_normal = self._cached(description, "frozen")
        feats = feats.to(self.adapter.proj.weight.device)
        return _pool_states(self.adapter(feats.to(self.adapter.proj.weight.dtype)), n_normal)

    def unadapted(self, description: str) -> torch.Tensor:
        """Plain CLIP text features (D, 2), what a vanilla CLIP zero-shot detector would use."""
        feats, n_normal = self._cached(description, "clip")
        return _pool_states(feats, n_normal)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
