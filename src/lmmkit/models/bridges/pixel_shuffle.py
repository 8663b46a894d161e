"""Pixel-shuffle token compression in front of the MLP bridge (the SmolVLM / nanoVLM recipe).

A ViT (or a flattened conv feature map) gives an s x s grid of tokens. Grouping each r x r block
of neighbours into one token of r^2 times the width keeps every feature value but divides the
token count by r^2, so the LLM reads (s/r)^2 tokens per image: a cheap way to fit more or larger
images into the context. The MLP then learns to mix the r^2 neighbours.

Layout, for grid side s and factor r: token t = row * s + col (row-major, as the towers flatten).
Output token I * (s/r) + J concatenates the block's tokens (I*r + di, J*r + dj) in row-major order
of (di, dj), each contributing its full feature vector.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmmkit.models.bridges.mlp import MLPBridge


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def grid_side(n_tokens: int, factor: int) -> int:
    """The side s of a square grid of `n_tokens` tokens that `factor` divides; ValueError otherwise.

    The message names the grid and the factor and says what would work, since the usual cause is a
    config choice (a kept CLS token, or a factor that does not divide the tower's grid).
    """
    if factor < 1:
        raise ValueError(f"pixel shuffle factor must be >= 1, got {factor}")
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        near = f"{side}x{side}={side * side}" if side else "1x1=1"
        hint = (" (a ViT that keeps its CLS token gives s*s+1 tokens: drop it with model.vision_drop_cls=true)"
                if side and n_tokens == side * side + 1 else "")
        raise ValueError(f"pixel shuffle needs a square token grid, but the vision tower gives {n_tokens} tokens "
                         f"per image (not a square; nearest {near}){hint}; or turn pixel shuffle off (factor 1)")
    if side % factor:
        ok = ", ".join(str(d) for d in _divisors(side))
        raise ValueError(f"pixel shuffle factor r={factor} does not divide the token grid side s={side} "
                         f"({side}x{side}={n_tokens} tokens per image); factors that work for this grid: {ok}")
    return side


def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, s*s, D) -> (B, (s/r)^2, D*r*r): each r x r block of tokens becomes one token (see module doc)."""
    batch, n_tokens, dim = features.shape
    side = grid_side(n_tokens, factor)
    if factor == 1:
        return features
    out_side = side // factor
    # (B, I, di, J, dj, D) -> (B, I, J, di, dj, D): the block index leads, the in-block offsets follow.
    blocks = features.reshape(batch, out_side, factor, out_side, factor, dim).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(batch, out_side * out_side, factor * factor * dim)


class PixelShuffleBridge(nn.Module):
    """Pixel shuffle by `factor`, then the LLaVA MLP (1 or 2 layers) from vision_dim*factor^2 to llm_dim."""

    def __init__(self, vision_dim: int, llm_dim: int, layers: int = 2, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"pixel shuffle factor must be >= 1, got {factor}")
        self.factor = factor
        self.mlp = MLPBridge(vision_dim * factor * factor, llm_dim, layers)

    def num_output_tokens(self, n_in: int) -> int:
        """(s/r)^2 for an s x s grid; raises ValueError for a grid the factor cannot regroup."""
        side = grid_side(n_in, self.factor)
        return (side // self.factor) ** 2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(features, self.factor))


__all__ = ["PixelShuffleBridge", "grid_side", "pixel_shuffle"]
