"""Fused vision towers (Prismatic VLMs): several encoders look at the same image, features concatenated.

Prismatic's DINOv2 + SigLIP pairs spatial features (DINOv2) with semantic ones (SigLIP): both see the
image, and the feature of patch t is [dino_t ; siglip_t]. That only lines up if every tower cuts the
image into the same patch grid, so incompatible towers are refused when the fused tower is built.

To stay a drop-in for VisionTower (VisionLanguageModel, FeatureCache, the training loop and the data
path all pass one pixel tensor around, cast it, stack it and cache it), `preprocess` returns ONE
tensor: each tower's processor output concatenated on the channel axis, (B, 3 * n_towers, H, W).
`forward` splits the channels back per tower. This is why the processors must also agree on the
input size H x W, not only on the token grid.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from lmmkit.models.vision import VisionTower

MANIFEST = "fused_tower.json"


def _describe(index: int, tower: VisionTower, n_tokens: int | None = None) -> str:
    """One tower for an error message: which model, its input size, patch grid and token count."""
    model = tower.model
    name = getattr(model, "name_or_path", "") or "?"
    h, w = tower.input_size
    text = f"tower {index} ({model.config.model_type} from {name}): input {h}x{w}"
    patch = getattr(model.config, "patch_size", None)
    if isinstance(patch, int) and not tower.is_conv:
        text += f", patch {patch} -> {h // patch}x{w // patch} grid"
    if n_tokens is not None:
        cls = " incl. CLS" if tower.has_cls and not tower.drop_cls else ""
        text += f", {n_tokens} tokens{cls}"
    return text


class FusedVisionTower(nn.Module):
    """Several VisionTowers on one image; features concatenated per patch: (B, N, sum of hidden sizes)."""

    def __init__(self, towers: Sequence[VisionTower]) -> None:
        super().__init__()
        towers = list(towers)
        if len(towers) < 2:
            raise ValueError(f"a fused vision tower needs at least 2 towers, got {len(towers)}; "
                             "use VisionTower for a single one")
        self.towers = nn.ModuleList(towers)
        self.channels = [getattr(t.model.config, "num_channels", 3) for t in towers]
        self._check_input_sizes(towers)
        counts = [t.num_tokens() for t in towers]
        if len(set(counts)) > 1:
            raise ValueError(self._grid_message(towers, counts))
        self._num_tokens = counts[0]

    @staticmethod
    def _check_input_sizes(towers: list[VisionTower]) -> None:
        # The pixel tensors are stacked on the channel axis, so they must have the same height and width.
        sizes = [t.input_size for t in towers]
        if len(set(sizes)) > 1:
            listed = "; ".join(_describe(i, t) for i, t in enumerate(towers))
            raise ValueError(
                f"fused vision towers need the same processor input size (their pixels are stacked on the "
                f"channel axis), but {listed}. Set every processor to the same size (its size / crop_size in "
                f"preprocessor_config.json), e.g. {sizes[0][0]}x{sizes[0][1]}, keeping a multiple of each "
                "tower's patch size so the patch grids still agree")

    @staticmethod
    def _grid_message(towers: list[VisionTower], counts: list[int]) -> str:
        listed = "; ".join(_describe(i, t, n) for i, (t, n) in enumerate(zip(towers, counts, strict=True)))
        hint = "choose towers with the same patch grid (input size / patch size)"
        # A CLS token kept by one tower and not the other is the usual off-by-one.
        if max(counts) - min(counts) == 1 and any(t.has_cls for t in towers):
            hint = "drop the CLS token of every tower (drop_cls=True) so they give the same patch tokens, or " + hint
        return (f"fused vision towers must give the same number of tokens per image (features are "
                f"concatenated patch by patch), but {listed}. Fix: {hint}")

    # ---- loading / saving ------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, paths: str | Path | Sequence[str | Path], select_layers: int | Sequence[int] = -1,
                        drop_cls: bool | Sequence[bool] = True, dtype: torch.dtype | None = None) -> FusedVisionTower:
        """Load one tower per folder. A single folder written by `save_pretrained` works too: its
        manifest lists the tower folders and the select_layers / drop_cls they were saved with."""
        if isinstance(paths, (str, Path)):
            folder = Path(paths)
            manifest = json.loads((folder / MANIFEST).read_text())
            paths = [folder / sub for sub in manifest["towers"]]
            select_layers, drop_cls = manifest["select_layers"], manifest["drop_cls"]
        paths = list(paths)
        layers = [select_layers] * len(paths) if isinstance(select_layers, int) else list(select_layers)
        drops = [drop_cls] * len(paths) if isinstance(drop_cls, bool) else list(drop_cls)
        if not len(layers) == len(drops) == len(paths):
            raise ValueError(f"{len(paths)} tower folders but {len(layers)} select_layers and {len(drops)} drop_cls "
                             "values; give one per tower, or a single value for all")
        return cls([VisionTower.from_pretrained(p, select_layer=s, drop_cls=d, dtype=dtype)
                    for p, s, d in zip(paths, layers, drops, strict=True)])

    def save_pretrained(self, path: str | Path) -> list[Path]:
        """Each tower (model + processor) into `path/tower_<i>`, plus a manifest; returns the tower folders."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        subs = [f"tower_{i}" for i in range(len(self.towers))]
        for sub, tower in zip(subs, self.towers, strict=True):
            tower.save_pretrained(path / sub)
        manifest = {"towers": subs, "select_layers": [t.select_layer for t in self.towers],
                    "drop_cls": [t.drop_cls for t in self.towers]}
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return [path / sub for sub in subs]

    # ---- the VisionTower interface ---------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return sum(t.hidden_size for t in self.towers)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.towers[0].input_size

    @property
    def dtype(self) -> torch.dtype:
        """The first tower's dtype; features of every tower come out in it."""
        return self.towers[0].dtype

    def num_tokens(self, pixel_values: torch.Tensor | None = None) -> int:
        if pixel_values is None:
            return self._num_tokens  # checked equal for all towers at construction
        with torch.no_grad():
            return self.forward(pixel_values.to(self.dtype)).shape[1]

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, sum of channels, H, W): each tower's own normalisation, stacked on the channel axis."""
        pixels = [t.preprocess(images) for t in self.towers]
        shapes = {tuple(p.shape[2:]) for p in pixels}
        if len(shapes) > 1:  # a processor whose output size depends on the image (no fixed crop)
            raise ValueError(f"the fused towers' processors gave different pixel sizes {sorted(shapes)} for the "
                             "same images; set every processor to a fixed size (do_center_crop / height+width)")
        return torch.cat(pixels, dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != sum(self.channels):
            raise ValueError(f"fused tower expects {sum(self.channels)} channels ({' + '.join(map(str, self.channels))}"
                             f", one block per tower, from its preprocess), got {pixel_values.shape[1]}")
        chunks = pixel_values.split(self.channels, dim=1)
        out_dtype = self.dtype
        feats = [tower(chunk.to(tower.dtype)).to(out_dtype) for tower, chunk in zip(self.towers, chunks, strict=True)]
        return torch.cat(feats, dim=-1)


__all__ = ["MANIFEST", "FusedVisionTower"]
