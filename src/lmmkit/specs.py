"""The typed specs a run config is made of: model, data and train sections.

`lmmkit.config` reads them from YAML + overrides and validates them (types from these annotations,
ranges from each field's metadata); this module only says what the keys are, their defaults, and
what each one means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

SHIPPED_LM = "shipped:lm"
SHIPPED_VISION = "shipped:vision"


def _bound(text: str, ok: Callable[[Any], bool], expect: str | None = None) -> dict[str, Any]:
    """Field metadata: a range check, described as `text` after the type ("> 0"), or as `expect`."""
    return {"bound": text, "ok": ok, "expect": expect}


_GT0 = _bound("> 0", lambda v: v > 0)
_GE0 = _bound(">= 0", lambda v: v >= 0)


@dataclass
class ModelSpec:
    """Which parts make the model: a causal LM, a vision tower, and the bridge between them."""

    llm: str = SHIPPED_LM  # HF folder (any AutoModelForCausalLM), hub id, or "shipped:lm"
    # HF folder of a CLIP/SigLIP/DINOv2/ResNet/ConvNeXt model, "shipped:vision", or "patch" (no encoder: Fuyu)
    vision: str = SHIPPED_VISION
    vision_extra: str | None = None  # a second HF tower fused with `vision` (Prismatic: features concatenated)
    vision_select_layer: int = -1  # hidden layer of the tower that feeds the bridge (LLaVA uses -2)
    vision_drop_cls: bool = True
    # mlp: one LLM token per tower token (LLaVA); resampler (Flamingo Perceiver) / qformer (BLIP-2):
    # bridge_queries learned queries read the image, so every image costs exactly that many tokens;
    # cross-attention (Flamingo): gated cross-attention layers in the LLM, one <image> token per image;
    # fuyu: raw patches (vision "patch") projected linearly, with a row-break token after each patch row.
    bridge: Literal["mlp", "resampler", "qformer", "cross-attention", "fuyu"] = "mlp"
    bridge_layers: int = field(default=2, metadata=_bound("", lambda v: v in (1, 2), expect="1 or 2"))  # mlp only
    bridge_queries: int = field(default=32, metadata=_GT0)  # resampler / qformer: tokens per image (K)
    bridge_depth: int = field(default=2, metadata=_GT0)  # resampler / qformer: attention layers
    bridge_heads: int = field(default=4, metadata=_GT0)  # resampler / qformer: must divide the width
    bridge_width: int = field(default=0, metadata=_bound(">= 0 (0 = the LLM's hidden size)", lambda v: v >= 0))
    # mlp only: regroup each r x r block of the tower's square token grid into one token (SmolVLM).
    pixel_shuffle: int = field(default=1, metadata=_bound(">= 1 (1 = off)", lambda v: v >= 1))
    cross_attention_every: int = field(default=1, metadata=_GT0)  # cross-attention: a block before every N-th layer
    patch_size: int = field(default=8, metadata=_GT0)  # vision "patch": pixels per patch side
    patch_canvas_height: int = field(default=64, metadata=_GT0)  # vision "patch": images are fitted onto this canvas
    patch_canvas_width: int = field(default=64, metadata=_GT0)
    # vision "patch": true = each image keeps the patches that cover it (Fuyu: a small image costs fewer tokens);
    # false = every image fills the whole canvas grid (a fixed token count).
    patch_native_size: bool = False
    # LLaVA-NeXT AnyRes (a CLIP / SigLIP tower, the mlp bridge): each image is seen as a base view plus the tiles
    # of the grid pinpoint that fits it best, so its visual tokens grow with its size (base + unpadded tile
    # features + one learned image_newline per feature row).
    anyres: bool = False
    # "HxW,HxW,...", each a multiple of the tower's input size; null = LLaVA-1.6's 1x2, 2x1, 2x2, 3x1, 1x3 tiles
    anyres_grid_pinpoints: str | None = None
    # LLaVA-OneVision's anyres_max_N: tile features beyond about N tiles' worth are downsampled (bilinear)
    anyres_max: int = field(default=0, metadata=_bound(">= 0 (0 = no cap)", lambda v: v >= 0))


@dataclass
class DataSpec:
    """Which conversation files (LLaVA JSON / JSON lines) and images to read; or, instead of `train`, a
    weighted mixture of sources streamed by `workers` processes (stages align / sft / full; train.max_steps)."""

    train: str | None = None
    # a mixture file (.yaml/.json) or inline "0.7*wds:shards/{0..9}.tar;0.3*llava:x.json@images"
    # (lmmkit.data.mixture_spec); seeded by train.seed; resumes exactly from a checkpoint
    mixture: str | None = None
    workers: int = field(default=2, metadata=_GE0)  # mixture only: data worker processes (0 = this process)
    image_folder: str | None = None
    eval: str | None = None
    max_length: int = field(default=512, metadata=_GT0)  # tokens per sample, image tokens included
    bad_records: Literal["skip", "stop"] = "skip"
    # dpo stage: chosen/rejected pairs (TRL / RLHF-V style) or VLFeedback; auto decides per record
    preference_format: Literal["auto", "pairs", "vlfeedback"] = "auto"


@dataclass
class TrainSpec:
    """How to train. Stages: align = bridge only; sft = bridge + LLM (+ tower if
    train_vision_tower); dpo = as sft, on preference pairs (data.train is a preference file);
    full = everything. Feature caching is turned off automatically when the tower trains and the
    key is not set; setting it true then is an error. lora_rank > 0 trains LoRA adapters on the
    LLM's attention projections instead of all its weights (sft and dpo)."""

    stage: Literal["align", "sft", "dpo", "full"] = "sft"
    train_vision_tower: bool = False
    init_from: str | None = None  # checkpoint folder to start from (e.g. the align stage's output)
    max_steps: int = field(default=0, metadata=_GE0)  # > 0 wins over epochs
    epochs: float = field(default=1.0, metadata=_GT0)
    batch_size: int = field(default=16, metadata=_GT0)
    grad_accum: int = field(default=1, metadata=_bound(">= 1", lambda v: v >= 1))
    lr: float = field(default=1e-3, metadata=_GT0)
    warmup_ratio: float = field(default=0.03, metadata=_bound("in [0, 1)", lambda v: 0 <= v < 1))
    weight_decay: float = field(default=0.0, metadata=_GE0)
    max_grad_norm: float = field(default=1.0, metadata=_bound("> 0 (or 0 to disable clipping)", lambda v: v >= 0))
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = field(default=0, metadata=_GE0)
    output_dir: str = "runs/train"  # relative to the working directory, never to the YAML file
    save_every: int = field(default=0, metadata=_GE0)  # steps between checkpoints; 0 = only at the end
    log_every: int = field(default=10, metadata=_GT0)
    cache_vision_features: bool = True  # only with a frozen tower
    # Several samples per row up to data.max_length, attention confined to each sample (block-diagonal causal
    # mask, positions restarting per sample): align / sft / full on an LLM that takes both (train/packing.py).
    packing: bool = False
    # torch.compile each LLM decoder layer (train/compiled.py): fuses the glue between matmuls; pays on a GPU
    # (LLaVA-7B shape: 41% -> 51% MFU, docs/performance.md), costs a compile of seconds to a minute at start.
    compile: bool = False
    lora_rank: int = field(default=0, metadata=_bound(">= 0 (0 = off: train all LLM weights)", lambda v: v >= 0))
    lora_alpha: float = field(default=16.0, metadata=_GT0)
    # dpo stage: the loss (sigmoid = DPO, ipo, hinge = SLiC), its beta, an optional SFT term on the chosen
    # answers, and the reference: a frozen copy, or the same model with its LoRA adapters off.
    dpo_loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    dpo_beta: float = field(default=0.1, metadata=_GT0)
    dpo_sft_weight: float = field(default=0.0, metadata=_GE0)
    dpo_reference: Literal["copy", "adapters-off"] = "copy"

    @property
    def trains_vision_tower(self) -> bool:
        return self.stage == "full" or (self.stage in ("sft", "dpo") and self.train_vision_tower)

    @property
    def trains_llm(self) -> bool:
        return self.stage != "align"

    @property
    def uses_feature_cache(self) -> bool:
        return self.cache_vision_features and not self.trains_vision_tower


@dataclass
class Config:
    """A whole run: model, data and training specs."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
