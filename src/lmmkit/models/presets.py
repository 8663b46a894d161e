"""Named model presets: the model section of a config for known model shapes, on the parts a user gives.

`preset_model_section("llava-1.5", llm=..., vision=...)` returns the ModelSpec keys of that recipe;
`preset_config` adds data and train sections suited to it, and `lmmkit preset NAME --llm X --vision Y
--out config.yaml` writes the whole thing as a YAML file that `lmmkit train --config` reads. Each preset
says plainly where lmmkit's version differs from the published model (`notes`).

The presets that have a ShapesWorld form (tiny, flamingo-style, fuyu-style) default to the shipped parts;
the others name real towers (CLIP-L/336, DINOv2 + SigLIP), so their folders must be given.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmmkit.specs import SHIPPED_LM, SHIPPED_VISION


class PresetError(ValueError):
    """An unknown preset, or parts that the preset cannot use (the message says which and why)."""


@dataclass(frozen=True)
class Preset:
    summary: str
    model: dict[str, Any]  # ModelSpec keys beyond llm / vision / vision_extra
    vision: str | None = None  # what --vision should be (for the help text); None = required
    needs_extra: bool = False  # a second tower (vision_extra) is part of the recipe
    default_llm: str | None = None  # what --llm defaults to (None: required)
    default_vision: str | None = None  # what --vision defaults to (None: required)
    single_stage: bool = False  # the recipe skips the align stage (Prismatic)
    first_stage: dict[str, Any] | None = None  # train keys of a recipe measured with this preset's own parts
    next_stage: str | None = None  # the sft stage's overrides for that recipe (in the YAML's comment)
    notes: tuple[str, ...] = field(default_factory=tuple)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "the ShapesWorld default: shipped LM + shipped ResNet tower, 2-layer MLP (64 tokens per image)",
        {"vision_select_layer": -1, "vision_drop_cls": True, "bridge": "mlp", "bridge_layers": 2},
        vision="shipped:vision", default_llm=SHIPPED_LM, default_vision=SHIPPED_VISION),
    "smollm2-shapes": Preset(
        "SmolLM2-135M-Instruct (a real pretrained LLM, fetched from PyPI) + the shipped ResNet tower, 2-layer MLP: "
        "the ShapesWorld recipe of docs/smollm2.md",
        {"vision_select_layer": -1, "vision_drop_cls": True, "bridge": "mlp", "bridge_layers": 2},
        vision="shipped:vision", default_llm="models:smollm2-135m", default_vision=SHIPPED_VISION,
        first_stage={"stage": "align", "max_steps": 300, "batch_size": 16, "grad_accum": 1, "lr": 2e-3},
        next_stage="train.max_steps=400 train.lr=1e-3 train.lora_rank=16 train.lora_alpha=32",
        notes=("The LLM is fetched on first use (`lmmkit models fetch smollm2-135m`: a 93 MB wheel from PyPI).",
               "Measured on 2,000 ShapesWorld images (docs/smollm2.md): POPE accuracy 0.86 / 0.84 / 0.81 after "
               "400 LoRA SFT steps (0.79 / 0.76 / 0.71 after 200), blank-image control 0.50. 100 align steps at "
               "lr 1e-3 left the model blind, and SFT at lr 3e-4 learned little.")),
    "llava-1.5": Preset(
        "LLaVA-1.5: CLIP ViT-L/14-336 (second-to-last layer, CLS dropped, 576 tokens), MLP 2x GELU",
        {"vision_select_layer": -2, "vision_drop_cls": True, "bridge": "mlp", "bridge_layers": 2},
        vision="a CLIP ViT-L/14-336 folder (openai/clip-vit-large-patch14-336)"),
    "llava-next": Preset(
        "LLaVA-NeXT: LLaVA-1.5's tower and bridge plus AnyRes (base view + tiles of the best grid pinpoint)",
        {"vision_select_layer": -2, "vision_drop_cls": True, "bridge": "mlp", "bridge_layers": 2, "anyres": True,
         "anyres_grid_pinpoints": None},
        vision="a CLIP ViT-L/14-336 folder (openai/clip-vit-large-patch14-336)",
        notes=("AnyRes is on with LLaVA-1.6's grid pinpoints (anyres_grid_pinpoints: null = 1x2, 2x1, 2x2, 3x1, 1x3 "
               "tiles of 336): visual tokens grow with the image, up to 2,928 per image (2,340 for 640x480); `lmmkit tokens IMAGE` "
               "counts them before you train.",
               "LLaVA-NeXT also unfreezes the tower in SFT at a 10x lower learning rate; lmmkit has one learning "
               "rate, so train.train_vision_tower stays false here.")),
    "prismatic-dinosiglip": Preset(
        "Prismatic DINOv2 + SigLIP: two towers on the same patch grid, features concatenated, MLP",
        {"vision_select_layer": -2, "vision_drop_cls": True, "bridge": "mlp", "bridge_layers": 2},
        vision="a DINOv2 folder (with --vision-extra a SigLIP folder; same input size and patch grid)",
        needs_extra=True, single_stage=True,
        notes=("Prismatic's fused projector has 3 layers; lmmkit's MLP bridge has at most 2.",
               "Prismatic skips the align stage (single-stage training), so this config starts at sft.",
               "Both towers must cut the image into the same grid (e.g. DINOv2 ViT-L/14 and SigLIP at 224 px "
               "with patch 14); lmmkit refuses mismatched towers when the model is built.")),
    "flamingo-style": Preset(
        "Flamingo-style: gated cross-attention blocks before every 4th LLM layer, one <image> marker per image",
        {"vision_select_layer": -1, "vision_drop_cls": True, "bridge": "cross-attention", "cross_attention_every": 4,
         "bridge_heads": 4},
        vision="shipped:vision, or a CLIP / SigLIP / DINOv2 folder", default_llm=SHIPPED_LM,
        default_vision=SHIPPED_VISION,
        notes=("Flamingo keeps the LLM frozen and trains the cross-attention blocks (tanh gates start at 0): "
               "that is the align stage here; sft additionally unfreezes the LLM.",
               "No Perceiver resampler in front of the blocks: they attend to the tower's tokens directly.")),
    "fuyu-style": Preset(
        "Fuyu-style: no vision encoder; raw patches projected into the LLM, a row-break token after each row",
        {"vision": "patch", "bridge": "fuyu", "patch_size": 30, "patch_canvas_height": 1080,
         "patch_canvas_width": 1920, "patch_native_size": True},
        vision="patch (no encoder; --vision is not used)", default_llm=SHIPPED_LM, default_vision=SHIPPED_VISION,
        notes=("Fuyu-8B: 30x30 patches, each image at its own size up to 1080x1920 (a full canvas: 36 rows x 64 "
               "patches + 36 row breaks = 2,340 tokens; a smaller image costs fewer). On the shipped "
               "ShapesWorld LM the preset uses 8x8 patches of the 64x64 images on a 64x64 canvas "
               "(72 tokens per image, all images the same size, so patch_native_size is off).",)),
}

_SHAPES_PATCH = {"patch_size": 8, "patch_canvas_height": 64, "patch_canvas_width": 64, "patch_native_size": False}


def _get(name: str) -> Preset:
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_model_section(name: str, llm: str | None = None, vision: str | None = None,
                         vision_extra: str | None = None) -> dict[str, Any]:
    """The config's `model` section (ModelSpec keys) of preset `name` on the given parts.

    tiny, flamingo-style and fuyu-style default to the shipped parts, smollm2-shapes to the fetched SmolLM2
    and the shipped tower; llava-1.5, llava-next and prismatic-dinosiglip need the folders (or hub ids)
    named in their help. Raises PresetError."""
    p = _get(name)
    if name == "fuyu-style" and vision not in (None, "patch"):
        raise PresetError(f"preset fuyu-style has no vision encoder (model.vision: patch), so --vision {vision!r} "
                          "would be ignored; leave it out")
    if vision_extra and not p.needs_extra:
        raise PresetError(f"preset {name!r} uses one tower; --vision-extra is for prismatic-dinosiglip")
    llm = llm or p.default_llm
    vision = vision or p.default_vision
    missing = [flag for flag, v in (("--llm", llm), ("--vision", vision)) if not v]
    if p.needs_extra and not vision_extra:
        missing.append("--vision-extra")
    if missing:
        raise PresetError(f"preset {name!r} needs {', '.join(missing)}: vision = {p.vision}; llm = an HF causal-LM "
                          "folder or hub id")
    section: dict[str, Any] = {"llm": llm, "vision": vision}
    if vision_extra:
        section["vision_extra"] = vision_extra
    section.update(p.model)
    if name == "fuyu-style" and llm == SHIPPED_LM:
        section.update(_SHAPES_PATCH)  # ShapesWorld images are 64x64
    return section


def _train_section(name: str, shapes: bool, output_dir: str) -> dict[str, Any]:
    """The first stage's train section: the preset's own measured recipe (smollm2-shapes), ShapesWorld scale
    on the shipped LM (the demo's numbers), else LLaVA-1.5's align recipe (batch 256 = 16 x 16 accumulation,
    lr 1e-3), or its SFT one for single-stage."""
    p = _get(name)
    stage = "sft" if p.single_stage else "align"
    if p.first_stage is not None:
        t = dict(p.first_stage)
    elif shapes:
        t = {"stage": stage, "max_steps": 100 if stage == "align" else 400, "batch_size": 64, "grad_accum": 1,
             "lr": 2e-3}
    elif stage == "align":
        t = {"stage": stage, "epochs": 1.0, "batch_size": 16, "grad_accum": 16, "lr": 1e-3, "save_every": 500}
    else:
        t = {"stage": stage, "epochs": 2.0, "batch_size": 16, "grad_accum": 8, "lr": 2e-5, "save_every": 500}
    return {**t, "warmup_ratio": 0.03, "precision": "bf16", "seed": 0, "output_dir": output_dir,
            "cache_vision_features": True}


def preset_config(name: str, llm: str | None = None, vision: str | None = None, vision_extra: str | None = None,
                  train_file: str | None = None, image_folder: str | None = None,
                  output_dir: str | None = None) -> dict[str, Any]:
    """A whole config dict (model, data, train) for the preset's first stage; `config_from_dict` accepts it."""
    model = preset_model_section(name, llm, vision, vision_extra)
    shapes = model["llm"] == SHIPPED_LM or _get(name).first_stage is not None  # the measured recipes are ShapesWorld's
    data = {"train": train_file, "image_folder": image_folder, "max_length": 512 if shapes else 2048,
            "bad_records": "skip" if shapes else "stop"}
    return {"model": model, "data": data, "train": _train_section(name, shapes, output_dir or f"runs/{name}")}


def _absolute_if_local(value: str | None) -> str | None:
    """Local paths made absolute: YAML paths resolve against the config's folder, not the working directory."""
    if value is None or value.startswith("shipped:") or value == "patch" or not Path(value).expanduser().exists():
        return value
    return str(Path(value).expanduser().resolve())


def preset_yaml(name: str, **kwargs: str | None) -> str:
    """`preset_config` as commented YAML: what the preset is, its notes, and how to run the next stage."""
    for key in ("llm", "vision", "vision_extra"):
        kwargs[key] = _absolute_if_local(kwargs.get(key))
    for key in ("train_file", "image_folder"):  # data paths are meant from the working directory, like overrides
        if kwargs.get(key):
            kwargs[key] = str(Path(str(kwargs[key])).expanduser().absolute())
    cfg = preset_config(name, **kwargs)
    p = _get(name)
    out_dir = cfg["train"]["output_dir"]
    lines = [f"# lmmkit preset {name}: {p.summary}", "#"]
    lines += [f"# NOTE: {note}" for note in p.notes]
    if cfg["data"]["train"] is None:
        lines.append("# data.train / data.image_folder are not set: fill them in, or pass data.train=FILE "
                     "data.image_folder=DIR on the command line.")
    lines += ["#", "#   lmmkit train --config THIS.yaml"]
    if cfg["train"]["stage"] == "align":
        sft = p.next_stage or f"train.lr={'2e-3' if cfg['model']['llm'] == SHIPPED_LM else '2e-5'}"
        lines.append(f"#   lmmkit train --config THIS.yaml train.stage=sft train.init_from={out_dir} "
                     f"data.train=SFT_FILE train.output_dir={out_dir}-sft {sft}")
    return "\n".join(lines) + "\n\n" + yaml.safe_dump(cfg, sort_keys=False)


def _cli(args: argparse.Namespace) -> int:
    if args.name == "list":
        width = max(map(len, PRESETS))
        for name, p in PRESETS.items():
            print(f"{name:<{width}}  {p.summary}")
        return 0
    try:
        text = preset_yaml(args.name, llm=args.llm, vision=args.vision, vision_extra=args.vision_extra,
                           train_file=args.train, image_folder=args.image_folder, output_dir=args.output_dir)
    except PresetError as err:
        print(f"preset error: {err}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def add_preset_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`lmmkit preset NAME --llm X --vision Y [--vision-extra Z] [--out config.yaml]`; `lmmkit preset list`."""
    p = subparsers.add_parser("preset", help="write a training config for a named model shape (llava-1.5, ...)")
    p.add_argument("name", help=f"one of: {', '.join(PRESETS)} (or 'list')")
    p.add_argument("--llm", help="HF causal-LM folder or hub id (tiny / flamingo-style / fuyu-style: shipped:lm)")
    p.add_argument("--vision", help="vision tower folder or hub id (see `lmmkit preset list`)")
    p.add_argument("--vision-extra", help="the second tower of a fused preset (prismatic-dinosiglip: SigLIP)")
    p.add_argument("--train", help="training data: LLaVA JSON / JSONL file")
    p.add_argument("--image-folder", help="folder the data's image paths resolve against")
    p.add_argument("--output-dir", help="train.output_dir (default runs/NAME)")
    p.add_argument("--out", help="write the YAML here (default: print it)")
    p.set_defaults(func=_cli)
    return p
