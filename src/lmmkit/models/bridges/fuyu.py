"""Fuyu's bridge: one linear layer from raw pixel patches to word embeddings, plus row breaks.

Pairs with `lmmkit.models.patch_tower.PatchEmbedTower`, which has no weights: this linear layer is
the whole "vision encoder". The LLM reads the patches as a flat sequence, so (like Fuyu's |NEWLINE|
token) a row-break embedding after every patch row tells it where the image's rows end. Fuyu uses a
text token's embedding there; here it is a learned vector of the bridge, so it trains with it.

Output layout for a rows x cols grid: token r*(cols+1) + c is patch (r, c) projected, and token
r*(cols+1) + cols is the row break; rows*(cols+1) tokens in all (`highres.fuyu_token_count`). With
`native=True` each image keeps only the rows x cols patches that cover it (`PatchEmbedTower.patch_grid`),
so its token count follows its size, as in Fuyu; otherwise every image has the canvas's grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class FuyuBridge(nn.Module):
    """(B, rows*cols, patch_dim) patches -> (B, rows*(cols+1), llm_dim), a row break after each row."""

    def __init__(self, patch_dim: int, llm_dim: int, rows: int, cols: int, init_std: float = 0.02,
                 patch_grid: Callable[[tuple[int, int]], tuple[int, int]] | None = None) -> None:
        """`patch_grid` (the tower's: image size -> the rows x cols covering it) switches native sizes on."""
        super().__init__()
        if rows < 1 or cols < 1:
            raise ValueError(f"FuyuBridge needs a patch grid of at least 1x1, got {rows}x{cols}")
        self.rows, self.cols = rows, cols
        self.patch_grid = patch_grid
        self.variable_tokens = patch_grid is not None  # VisionLanguageModel: counts depend on each image's size
        self.proj = nn.Linear(patch_dim, llm_dim)
        # Small like an embedding table's rows, so it starts on the LLM's input scale.
        self.row_break = nn.Parameter(torch.randn(llm_dim) * init_std)

    def num_output_tokens(self, n_in: int) -> int:
        """rows*(cols+1); n_in must be the rows*cols patches of the grid the bridge was built for."""
        if n_in != self.rows * self.cols:
            raise ValueError(f"FuyuBridge was built for a {self.rows}x{self.cols} patch grid ({self.rows * self.cols} "
                             f"patches) but the tower gives {n_in}; build it with the tower's grid "
                             "(PatchEmbedTower.grid)")
        return self.rows * (self.cols + 1)

    def token_count(self, image_size: tuple[int, int]) -> int:
        """Native sizes: rows*(cols+1) for the patches covering an image of `image_size` (height, width)."""
        rows, cols = self.patch_grid(image_size) if self.patch_grid else (self.rows, self.cols)
        return rows * (cols + 1)

    def forward(self, patches: torch.Tensor, image_sizes: Sequence[tuple[int, int]] | None = None
                ) -> torch.Tensor | list[torch.Tensor]:
        batch, n_in, _ = patches.shape
        self.num_output_tokens(n_in)
        tokens = self.proj(patches).reshape(batch, self.rows, self.cols, -1)
        breaks = self.row_break.to(tokens.dtype).expand(batch, self.rows, 1, -1)
        grid = torch.cat((tokens, breaks), dim=2)  # (B, rows, cols+1, D)
        if not self.variable_tokens:
            return grid.reshape(batch, self.rows * (self.cols + 1), -1)
        if image_sizes is None or len(image_sizes) != batch:
            raise ValueError("a native-size Fuyu bridge needs each image's (height, width): pass image_sizes")
        out = []
        for i, size in enumerate(image_sizes):
            rows, cols = self.patch_grid(tuple(int(v) for v in size))
            # The image's own patches (top-left of the canvas), each row closed by the row break.
            kept = torch.cat((grid[i, :rows, :cols], grid[i, :rows, self.cols:]), dim=1)
            out.append(kept.reshape(rows * (cols + 1), -1))
        return out


__all__ = ["FuyuBridge"]
