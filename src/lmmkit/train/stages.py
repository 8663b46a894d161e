"""Which parts train in each stage: one explicit function, and it says what it did."""

from __future__ import annotations

from typing import Literal

from torch import nn

from lmmkit.models.lora import has_lora, restrict_to_lora

Stage = Literal["align", "sft", "dpo", "full"]
STAGES: tuple[str, ...] = ("align", "sft", "dpo", "full")


def trainable_parts(stage: str, train_vision_tower: bool = False) -> tuple[str, ...]:
    """align: the bridge only (LLaVA stage 1); sft and dpo: bridge + LLM, plus the tower if asked;
    full: all."""
    if stage == "align":
        return ("bridge",)
    if stage in ("sft", "dpo"):
        return ("bridge", "llm", "vision") if train_vision_tower else ("bridge", "llm")
    if stage == "full":
        return ("bridge", "llm", "vision")
    raise ValueError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")


def apply_stage(model: nn.Module, stage: str, train_vision_tower: bool = False, verbose: bool = True) -> dict[str, int]:
    """Freeze everything, then unfreeze the stage's parts. Returns trainable parameter counts per part.
    An LLM carrying LoRA adapters trains its adapters only."""
    parts = trainable_parts(stage, train_vision_tower)
    counts: dict[str, int] = {}
    for name in ("vision", "bridge", "llm"):
        module: nn.Module = getattr(model, name)
        train = name in parts
        module.requires_grad_(train)
        module.train(train)
        if train and name == "llm" and has_lora(module):
            counts[name] = restrict_to_lora(module)
        else:
            counts[name] = sum(p.numel() for p in module.parameters()) if train else 0
    if verbose:
        total = sum(p.numel() for p in model.parameters())
        lines = [f"stage {stage}: training {', '.join(parts)}"]
        for name in ("vision", "bridge", "llm"):
            size = sum(p.numel() for p in getattr(model, name).parameters())
            lora = name == "llm" and counts[name] and has_lora(model.llm)
            note = f" (LoRA adapters only: {counts[name]:,})" if lora else ""
            lines.append(f"  {name:<7} {'trains' if counts[name] else 'frozen':<7} {size:>12,} params{note}")
        lines.append(f"  trainable {sum(counts.values()):,} of {total:,}")
        print("\n".join(lines))
    return counts
