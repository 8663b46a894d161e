"""Learned-query bridges: K query tokens read the image features, so the LLM sees K tokens per image.

Whatever the tower's token count N, the output is always (B, K, llm_dim): the cost in the LLM's
context is fixed by K, not by the tower's resolution. Two styles share the code here:

- ``perceiver`` (Flamingo's Perceiver Resampler): in each layer the queries attend to the
  concatenation [image features ; queries], so keys and values come from both, then a
  feed-forward block.
- ``qformer`` (BLIP-2's Q-Former, without its text half): in each layer the queries first attend
  to each other (self-attention), then to the image features (cross-attention), then a
  feed-forward block.

Both work at an internal `width`: the image features are projected to it once, the queries live
in it, and a final LayerNorm + Linear maps the queries to the LLM's width.

Stability. Every block is pre-norm with a residual, and the residual stream (the queries) starts
at unit scale: the queries are drawn from N(0, 1), while the linear layers start small (std 0.02)
and the residual branches' output projections smaller still (divided by sqrt(2 * depth), as in
GPT-2). So at init each block only nudges the queries, and Adam's first steps (which move every
weight by about the learning rate) change the stream by a small fraction of its size. With
0.02-scale queries instead, those first steps swamp the queries and the align loss jumps (measured
with the shipped parts on a 6-image ShapesWorld batch: 3.7 -> 5.4 after one AdamW step at lr 1e-3;
with unit queries it falls from the first step).
The projected image features are layer-normed once, so the position embedding's size relative to
them does not depend on the tower's feature scale (a ResNet's ReLU features are not normalised).

Position embedding. Attention over the image features is permutation invariant: without positions
the queries cannot tell where a feature came from. ViT features carry their own positions, but a
conv tower's flattened feature map (the shipped ResNet) mostly does not, so an optional learned
position embedding for the N image tokens (`num_input_tokens=N`) is added before the layers;
`lmmkit.models.build.build_vlm` always turns it on, for the tower's token count.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Style = Literal["perceiver", "qformer"]
STYLES: tuple[str, ...] = ("perceiver", "qformer")
INIT_STD = 0.02  # linear layers
POS_STD = 0.1  # position embedding, relative to the unit-scale (layer-normed) image features


class _Attention(nn.Module):
    """Multi-head attention of `x` (queries) over `context` (keys and values), via SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, n_q, width = x.shape
        head_dim = width // self.heads
        q = self.q(x).view(batch, n_q, self.heads, head_dim).transpose(1, 2)
        k, v = self.kv(context).view(batch, context.shape[1], 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # no mask: every query sees every key
        return self.out(attended.transpose(1, 2).reshape(batch, n_q, width))


class _FeedForward(nn.Module):
    def __init__(self, width: int, mult: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, mult * width)
        self.act = nn.GELU()
        self.out = nn.Linear(mult * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.up(self.norm(x))))


class _PerceiverLayer(nn.Module):
    """Queries attend to [image ; queries], then feed-forward; pre-norm residuals."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_media = nn.LayerNorm(width)
        self.norm_queries = nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.ff = _FeedForward(width)

    def forward(self, queries: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        q = self.norm_queries(queries)
        context = torch.cat([self.norm_media(media), q], dim=1)
        queries = queries + self.attn(q, context)
        return queries + self.ff(queries)


class _QFormerLayer(nn.Module):
    """Self-attention among the queries, cross-attention to the image, then feed-forward; pre-norm residuals."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = _Attention(width, heads)
        self.norm_cross = nn.LayerNorm(width)
        self.norm_media = nn.LayerNorm(width)
        self.cross_attn = _Attention(width, heads)
        self.ff = _FeedForward(width)

    def forward(self, queries: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        q = self.norm_self(queries)
        queries = queries + self.self_attn(q, q)
        queries = queries + self.cross_attn(self.norm_cross(queries), self.norm_media(media))
        return queries + self.ff(queries)


class ResamplerBridge(nn.Module):
    """K learned queries read the image features: (B, N, vision_dim) -> (B, K, llm_dim), any N.

    style "perceiver" = Flamingo's Perceiver Resampler, "qformer" = BLIP-2's Q-Former (see module doc).
    `width` is the internal width (default: llm_dim); `heads` must divide it. `num_input_tokens`
    turns on a learned position embedding for exactly that many image tokens.
    """

    def __init__(self, vision_dim: int, llm_dim: int, num_queries: int = 32, depth: int = 2, heads: int = 4,
                 width: int | None = None, style: Style = "perceiver", num_input_tokens: int | None = None) -> None:
        super().__init__()
        width = width or llm_dim
        if style not in STYLES:
            raise ValueError(f"resampler style must be one of {', '.join(STYLES)}, got {style!r}")
        for name, value in (("num_queries", num_queries), ("depth", depth), ("heads", heads), ("width", width)):
            if value < 1:
                raise ValueError(f"resampler {name} must be >= 1, got {value}")
        if width % heads:
            ok = ", ".join(str(h) for h in range(1, width + 1) if width % h == 0 and h <= 64)
            raise ValueError(f"resampler heads={heads} does not divide its width {width}; "
                             f"heads that divide it: {ok}")
        if num_input_tokens is not None and num_input_tokens < 1:
            raise ValueError(f"num_input_tokens must be >= 1 (or None for no position embedding), "
                             f"got {num_input_tokens}")
        self.style = style
        self.num_queries = num_queries
        self.num_input_tokens = num_input_tokens
        self.queries = nn.Parameter(torch.empty(num_queries, width))
        if num_input_tokens:
            self.pos_embed = nn.Parameter(torch.empty(num_input_tokens, width))
        else:
            self.register_parameter("pos_embed", None)
        self.in_proj = nn.Linear(vision_dim, width)
        self.in_norm = nn.LayerNorm(width)
        layer = _PerceiverLayer if style == "perceiver" else _QFormerLayer
        self.layers = nn.ModuleList(layer(width, heads) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, llm_dim)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        nn.init.normal_(self.queries, std=1.0)  # the residual stream starts at unit scale (see module doc)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=POS_STD)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                # Residual branch outputs start small so each block begins near the identity.
                residual_out = name.startswith("layers.") and name.endswith(".out")
                std = INIT_STD / math.sqrt(2 * depth) if residual_out else INIT_STD
                nn.init.trunc_normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
        # The output is read by the LLM as word embeddings: keep the usual Linear scale there so the
        # image tokens start at a magnitude comparable to the MLP bridge's, not 50x smaller.
        nn.init.normal_(self.out_proj.weight, std=1 / math.sqrt(3 * self.out_proj.in_features))

    def num_output_tokens(self, n_in: int) -> int:
        """Always K; with a position embedding, only for the N image tokens it was built for."""
        self._check_input(n_in)
        return self.num_queries

    def _check_input(self, n_in: int) -> None:
        if self.num_input_tokens is not None and n_in != self.num_input_tokens:
            raise ValueError(f"this resampler's position embedding covers {self.num_input_tokens} image tokens, "
                             f"but got {n_in}; rebuild it with num_input_tokens={n_in} (or None for no positions)")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self._check_input(features.shape[1])
        media = self.in_norm(self.in_proj(features))
        if self.pos_embed is not None:
            media = media + self.pos_embed
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, media)
        return self.out_proj(self.out_norm(queries))


class PerceiverResampler(ResamplerBridge):
    """Flamingo-style resampler: ResamplerBridge(style="perceiver")."""

    def __init__(self, vision_dim: int, llm_dim: int, num_queries: int = 32, depth: int = 2, heads: int = 4,
                 width: int | None = None, num_input_tokens: int | None = None) -> None:
        super().__init__(vision_dim, llm_dim, num_queries, depth, heads, width, "perceiver", num_input_tokens)


class QFormerBridge(ResamplerBridge):
    """BLIP-2-style Q-Former (query half only): ResamplerBridge(style="qformer")."""

    def __init__(self, vision_dim: int, llm_dim: int, num_queries: int = 32, depth: int = 2, heads: int = 4,
                 width: int | None = None, num_input_tokens: int | None = None) -> None:
        super().__init__(vision_dim, llm_dim, num_queries, depth, heads, width, "qformer", num_input_tokens)


__all__ = ["STYLES", "PerceiverResampler", "QFormerBridge", "ResamplerBridge"]
