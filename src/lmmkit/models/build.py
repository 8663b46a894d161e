"""Build a VisionLanguageModel from a model spec: HF folders, hub ids, or lmmkit's shipped parts."""

from __future__ import annotations

from pathlib import Path

import torch

from lmmkit.models.language import load_language_model
from lmmkit.models.parts import part_path
from lmmkit.models.vision import VisionTower
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


def build_vlm(llm: str = "shipped:lm", vision: str = "shipped:vision", vision_select_layer: int = -1,
              vision_drop_cls: bool = True, bridge_layers: int = 2, seed: int = 0) -> VisionLanguageModel:
    """LLM + vision tower + a freshly initialised MLP bridge (seeded)."""
    llm_model, tokenizer = load_language_model(resolve_part(llm))
    tower = VisionTower.from_pretrained(resolve_part(vision), select_layer=vision_select_layer,
                                        drop_cls=vision_drop_cls)
    torch.manual_seed(seed)
    return VisionLanguageModel(tower, llm_model, tokenizer, bridge_layers=bridge_layers)


def build_from_spec(spec, seed: int = 0) -> VisionLanguageModel:
    """From a config.ModelSpec."""
    return build_vlm(spec.llm, spec.vision, spec.vision_select_layer, spec.vision_drop_cls, spec.bridge_layers, seed)


def describe(model: VisionLanguageModel) -> str:
    n = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("vision", "bridge", "llm")}
    return ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in n.items())


__all__ = ["build_vlm", "build_from_spec", "resolve_part", "describe"]
