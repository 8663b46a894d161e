"""Build a VisionLanguageModel from a model spec: HF folders, hub ids, or lmmkit's shipped parts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmmkit.models.anyres_tower import make_anyres
from lmmkit.models.bridges import MLPBridge, PixelShuffleBridge, ResamplerBridge
from lmmkit.models.bridges.fuyu import FuyuBridge
from lmmkit.models.cross_attention_vlm import CrossAttentionVLM
from lmmkit.models.fused_tower import FusedVisionTower
from lmmkit.models.highres import parse_pinpoints
from lmmkit.models.language import load_language_model
from lmmkit.models.parts import part_path
from lmmkit.models.patch_tower import PatchEmbedTower
from lmmkit.models.vision import VisionEncoder, VisionTower
from lmmkit.models.vlm import VisionLanguageModel

SHIPPED = "shipped:"


def resolve_part(ref: str) -> str | Path:
    """`shipped:lm` / `shipped:vision` -> the folder inside the package; `models:NAME` -> a fetched real
    model (`lmmkit models fetch`, downloaded and converted on first use); anything else unchanged."""
    if ref.startswith(SHIPPED):
        return part_path(ref[len(SHIPPED):])
    if ref.startswith("models:"):
        from lmmkit.models.fetch import resolve_model_ref

        return resolve_model_ref(ref)
    return ref


# Bridges make_bridge builds; build_vlm also takes "cross-attention" (Flamingo) and "fuyu" (patch embedding).
BRIDGES: tuple[str, ...] = ("mlp", "resampler", "qformer")
# ModelSpec's bridge name -> ResamplerBridge style.
RESAMPLER_STYLES = {"resampler": "perceiver", "qformer": "qformer"}


def make_bridge(kind: str, vision_dim: int, llm_dim: int, n_tokens: int | None = None, *, layers: int = 2,
                queries: int = 32, depth: int = 2, heads: int = 4, width: int = 0,
                pixel_shuffle: int = 1) -> nn.Module:
    """A freshly initialised bridge for `kind` (a ModelSpec.bridge value), from the tower's `n_tokens` per image.

    Errors name the config keys (model.bridge, model.pixel_shuffle, ...) and what would work, because
    they come from config choices that only meet the tower here, before any training starts.
    `n_tokens` is needed for pixel shuffle (grid check) and the resamplers (position embedding).
    """
    if kind not in BRIDGES:
        raise ValueError(f"model.bridge: unknown bridge {kind!r}; choose one of: {', '.join(BRIDGES)}")
    if pixel_shuffle < 1:
        raise ValueError(f"model.pixel_shuffle must be >= 1 (1 = off), got {pixel_shuffle}")
    if kind == "mlp":
        if pixel_shuffle == 1:
            return MLPBridge(vision_dim, llm_dim, layers)
        bridge = PixelShuffleBridge(vision_dim, llm_dim, layers, factor=pixel_shuffle)
        if n_tokens is not None:
            try:
                bridge.num_output_tokens(n_tokens)
            except ValueError as err:
                raise ValueError(f"model.pixel_shuffle={pixel_shuffle} does not fit the vision tower: {err}; "
                                 "set model.pixel_shuffle accordingly") from None
        return bridge
    if pixel_shuffle > 1:
        raise ValueError(f"model.pixel_shuffle={pixel_shuffle} works only with model.bridge=mlp, not {kind!r} "
                         f"(its model.bridge_queries={queries} queries already fix the tokens per image); "
                         "set model.pixel_shuffle=1, or model.bridge=mlp")
    width = width or llm_dim
    if width % heads:
        which = (f"model.bridge_width={width}" if width != llm_dim
                 else f"the LLM's hidden size {width} (model.bridge_width=0)")
        ok = ", ".join(str(h) for h in range(1, min(width, 64) + 1) if width % h == 0)
        raise ValueError(f"model.bridge_heads={heads} does not divide {which}; choose heads among {ok}, "
                         "or set model.bridge_width to a multiple of the heads")
    return ResamplerBridge(vision_dim, llm_dim, num_queries=queries, depth=depth, heads=heads, width=width,
                           style=RESAMPLER_STYLES[kind], num_input_tokens=n_tokens)


PATCH_TOWER = "patch"  # model.vision value for the encoder-free (Fuyu) patch embedding


def make_tower(vision: str, vision_select_layer: int = -1, vision_drop_cls: bool = True, *,
               vision_extra: str | None = None, patch_size: int = 8,
               patch_canvas: tuple[int, int] = (64, 64)) -> VisionEncoder:
    """The vision side a spec names: an HF tower, two fused HF towers, or the weightless patch embedding."""
    if vision == PATCH_TOWER:
        if vision_extra:
            raise ValueError("model.vision_extra: the patch embedding (model.vision=patch) cannot be fused with "
                             "another tower; unset model.vision_extra")
        return PatchEmbedTower(canvas=patch_canvas, patch_size=patch_size)
    if vision_extra:
        return FusedVisionTower.from_pretrained([resolve_part(vision), resolve_part(vision_extra)],
                                                select_layers=vision_select_layer, drop_cls=vision_drop_cls)
    return VisionTower.from_pretrained(resolve_part(vision), select_layer=vision_select_layer,
                                       drop_cls=vision_drop_cls)


def build_vlm(llm: str = "shipped:lm", vision: str = "shipped:vision", vision_select_layer: int = -1,
              vision_drop_cls: bool = True, bridge_layers: int = 2, seed: int = 0, *, bridge: str = "mlp",
              bridge_queries: int = 32, bridge_depth: int = 2, bridge_heads: int = 4, bridge_width: int = 0,
              pixel_shuffle: int = 1, cross_attention_every: int = 1, vision_extra: str | None = None,
              patch_size: int = 8, patch_canvas_height: int = 64, patch_canvas_width: int = 64,
              patch_native_size: bool = False, anyres: bool = False, anyres_grid_pinpoints: str | None = None, anyres_max: int = 0
              ) -> VisionLanguageModel:
    """LLM + vision side + a freshly initialised bridge (seeded); the keyword arguments mirror ModelSpec.

    Options that do not fit the parts (a grid pixel shuffle cannot regroup, heads that do not divide the
    width, fused towers with different grids, AnyRes pinpoints that are not multiples of the tower's input
    size) raise ValueError here, before any data is read or training starts. bridge "cross-attention" gives
    a CrossAttentionVLM (Flamingo); "fuyu" needs vision "patch"; anyres needs a ViT tower and the mlp bridge.
    """
    if (bridge == "fuyu") != (vision == PATCH_TOWER):
        raise ValueError(f"model.bridge={bridge!r} with model.vision={vision!r}: the Fuyu bridge projects raw "
                         "patches, so it goes with model.vision=patch and only with it")
    if anyres:
        _check_anyres_choices(bridge, pixel_shuffle, vision, vision_extra)
    llm_model, tokenizer = load_language_model(resolve_part(llm))
    tower = make_tower(vision, vision_select_layer, vision_drop_cls, vision_extra=vision_extra,
                       patch_size=patch_size, patch_canvas=(patch_canvas_height, patch_canvas_width))
    llm_dim = llm_model.config.hidden_size
    if bridge == "cross-attention":
        torch.manual_seed(seed)
        return CrossAttentionVLM(tower, llm_model, tokenizer, every=cross_attention_every, heads=bridge_heads)
    if bridge == "fuyu":
        torch.manual_seed(seed)
        fuyu = FuyuBridge(tower.hidden_size, llm_dim, *tower.grid,
                          patch_grid=tower.patch_grid if patch_native_size else None)
        return VisionLanguageModel(tower, llm_model, tokenizer, bridge=fuyu)
    # Only bridges that depend on the token count pay for the tower's probe forward pass; it runs before
    # seeding, so the bridge's initial weights depend on `seed` alone (the MLP's are as they always were).
    plain_mlp = bridge == "mlp" and pixel_shuffle == 1
    n_tokens = None if plain_mlp else tower.num_tokens()
    torch.manual_seed(seed)
    module = make_bridge(bridge, tower.hidden_size, llm_dim, n_tokens, layers=bridge_layers,
                         queries=bridge_queries, depth=bridge_depth, heads=bridge_heads, width=bridge_width,
                         pixel_shuffle=pixel_shuffle)
    if anyres:
        # After the projector's initialisation, so its weights are those of the same seed without AnyRes.
        try:
            points = parse_pinpoints(anyres_grid_pinpoints) if anyres_grid_pinpoints else None
        except ValueError as err:
            raise ValueError(f"model.anyres_grid_pinpoints: {err}") from None
        tower, module = make_anyres(tower, module, llm_dim, points, anyres_max or None)
    return VisionLanguageModel(tower, llm_model, tokenizer, bridge=module)


def _check_anyres_choices(bridge: str, pixel_shuffle: int, vision: str, vision_extra: str | None) -> None:
    """AnyRes packs one bridged feature per patch of each tile: only a per-token projector on one ViT tower."""
    if bridge != "mlp" or pixel_shuffle != 1:
        raise ValueError(f"model.anyres works with model.bridge=mlp and model.pixel_shuffle=1 (LLaVA-NeXT's projector "
                         f"maps each patch feature to one token), not model.bridge={bridge!r} with "
                         f"model.pixel_shuffle={pixel_shuffle}")
    if vision == PATCH_TOWER or vision_extra:
        which = "model.vision=patch (no encoder)" if vision == PATCH_TOWER else "model.vision_extra (fused towers)"
        raise ValueError(f"model.anyres tiles images for one ViT tower (CLIP, SigLIP), not {which}; "
                         "set model.anyres=false or use a single CLIP / SigLIP tower")


# ModelSpec / saved-config keys beyond build_vlm's positional ones; configs written before they existed lack
# them, and the defaults (one HF tower, a plain MLP) are what those checkpoints were trained with.
BRIDGE_KEYS = ("bridge", "bridge_queries", "bridge_depth", "bridge_heads", "bridge_width", "pixel_shuffle",
               "cross_attention_every", "vision_extra", "patch_size", "patch_canvas_height", "patch_canvas_width",
               "patch_native_size",
               "anyres", "anyres_grid_pinpoints", "anyres_max")


def bridge_kwargs(model_section: Mapping[str, Any]) -> dict[str, Any]:
    """build_vlm's keyword arguments from a ModelSpec as a dict (a saved config's "model")."""
    return {key: model_section[key] for key in BRIDGE_KEYS if key in model_section}


def build_from_spec(spec, seed: int = 0) -> VisionLanguageModel:
    """From a config.ModelSpec."""
    return build_vlm(spec.llm, spec.vision, spec.vision_select_layer, spec.vision_drop_cls, spec.bridge_layers, seed,
                     **bridge_kwargs(dataclasses.asdict(spec)))


def describe(model: VisionLanguageModel) -> str:
    n = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("vision", "bridge", "llm")}
    return ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in n.items())


__all__ = ["BRIDGES", "BRIDGE_KEYS", "PATCH_TOWER", "bridge_kwargs", "build_from_spec", "build_vlm", "describe",
           "make_bridge", "make_tower", "resolve_part"]
