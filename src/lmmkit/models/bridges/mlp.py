"""The LLaVA bridge: image features become word embeddings through a small MLP."""

from __future__ import annotations

import torch
from torch import nn


class MLPBridge(nn.Module):
    """1 layer = linear projection (LLaVA-1); 2 layers = Linear-GELU-Linear (LLaVA-1.5)."""

    def __init__(self, vision_dim: int, llm_dim: int, layers: int = 2) -> None:
        super().__init__()
        if layers not in (1, 2):
            raise ValueError(f"MLP bridge layers must be 1 or 2, got {layers}")
        mods: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
        if layers == 2:
            mods += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
        self.net = nn.Sequential(*mods)

    def num_output_tokens(self, n_in: int) -> int:
        """One LLM token per image feature: the MLP maps each token on its own."""
        return n_in

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)
