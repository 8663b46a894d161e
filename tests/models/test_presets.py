"""Model presets: every preset's YAML is a valid config; the ShapesWorld-capable ones build and train."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from lmmkit.config import load_config
from lmmkit.models.build import build_from_spec
from lmmkit.models.presets import PRESETS, PresetError, add_preset_parser, preset_model_section, preset_yaml

# Parts for presets that name real towers: config loading never opens them, so made-up absolute paths do.
PARTS = {"llm": "/models/vicuna-7b", "vision": "/models/clip-vit-large-patch14-336"}
EXTRA = {"vision": "/models/dinov2-large", "vision_extra": "/models/siglip-so400m"}
REPO = Path(__file__).resolve().parents[2]


def _parts(name: str) -> dict[str, str]:
    if PRESETS[name].default_llm:
        return {}
    return {**PARTS, **EXTRA} if PRESETS[name].needs_extra else dict(PARTS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_writes_a_config_that_loads(name, tmp_path):
    path = tmp_path / f"{name}.yaml"
    path.write_text(preset_yaml(name, train_file=str(tmp_path / "train.json"), image_folder=str(tmp_path),
                                **_parts(name)))
    cfg = load_config(path)
    assert cfg.model.__dict__.items() >= preset_model_section(name, **_parts(name)).items()
    assert cfg.data.train == str(tmp_path / "train.json") and cfg.data.image_folder == str(tmp_path)
    assert cfg.train.stage == ("sft" if PRESETS[name].single_stage else "align")
    assert cfg.train.output_dir == f"runs/{name}"
    if PRESETS[name].default_llm:  # ShapesWorld scale on the preset's own parts
        assert cfg.train.max_steps > 0 and cfg.data.max_length == 512
    else:
        assert cfg.train.batch_size * cfg.train.grad_accum >= 128 and cfg.data.max_length == 2048


def test_recipes_say_what_they_are():
    llava = preset_model_section("llava-1.5", **PARTS)
    assert (llava["vision_select_layer"], llava["vision_drop_cls"], llava["bridge"], llava["bridge_layers"]) == \
        (-2, True, "mlp", 2)
    assert preset_model_section("llava-next", **PARTS) == {**llava, "anyres": True, "anyres_grid_pinpoints": None}
    assert "LLaVA-1.6's grid pinpoints" in preset_yaml("llava-next", **PARTS)
    fused = preset_model_section("prismatic-dinosiglip", llm=PARTS["llm"], **EXTRA)
    assert fused["vision_extra"] == EXTRA["vision_extra"] and fused["bridge"] == "mlp"
    assert preset_model_section("flamingo-style")["cross_attention_every"] == 4
    real_fuyu = preset_model_section("fuyu-style", llm=PARTS["llm"])
    assert (real_fuyu["patch_size"], real_fuyu["patch_canvas_height"], real_fuyu["patch_canvas_width"]) == \
        (30, 1080, 1920)
    shapes_fuyu = preset_model_section("fuyu-style")
    assert (shapes_fuyu["vision"], shapes_fuyu["patch_size"], shapes_fuyu["patch_canvas_height"]) == ("patch", 8, 64)


def test_smollm2_preset_is_the_docs_recipe(tmp_path):
    """The preset, the example config and docs/smollm2.md describe one recipe: the fetched SmolLM2 (named, not
    fetched, by writing the config), the shipped tower, align 300 steps at lr 2e-3, then LoRA SFT at 1e-3."""
    path = tmp_path / "c.yaml"
    text = preset_yaml("smollm2-shapes", train_file=str(tmp_path / "captions.json"), image_folder=str(tmp_path))
    path.write_text(text)
    cfg = load_config(path)
    example = load_config(REPO / "configs" / "smollm2-shapes.yaml")
    assert cfg.model == example.model and cfg.model.llm == "models:smollm2-135m"
    for key in ("stage", "max_steps", "batch_size", "grad_accum", "lr", "precision", "cache_vision_features"):
        assert getattr(cfg.train, key) == getattr(example.train, key), key
    assert "train.max_steps=400 train.lr=1e-3 train.lora_rank=16 train.lora_alpha=32" in text
    assert "train.max_steps=400 train.lr=1e-3" in (REPO / "configs" / "smollm2-shapes.yaml").read_text()


@pytest.mark.parametrize(("name", "tokens", "bridge"), [("tiny", 64, "MLPBridge"),
                                                        ("flamingo-style", 1, "GatedCrossAttentionBridge"),
                                                        ("fuyu-style", 72, "FuyuBridge")])
def test_shapesworld_presets_build_on_the_shipped_parts(name, tokens, bridge, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(preset_yaml(name))
    model = build_from_spec(load_config(path).model)
    assert model.tokens_per_image == tokens and type(model.bridge).__name__ == bridge
    if name == "flamingo-style":  # a block before every 4th of the shipped LM's 4 layers: exactly one
        assert len(model.bridge.blocks) == 1


def test_tiny_preset_trains_with_lmmkit_train(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    from lmmkit.data.shapes.generate import generate_shapes
    from lmmkit.train.run import train_from_config

    ds = generate_shapes(tmp_path / "shapes", n_train=4, n_test=1, n_pope_images=0, workers=1, progress=False)
    monkeypatch.chdir(tmp_path)
    text = preset_yaml("tiny", train_file=str(ds.train_captions), image_folder=str(ds.image_folder))
    Path("tiny.yaml").write_text(text)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        result = train_from_config(load_config("tiny.yaml", ["train.max_steps=2", "train.batch_size=4"]))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert result.steps == 2 and (tmp_path / "runs" / "tiny" / "checkpoint-2" / "bridge.safetensors").is_file()
    assert "train.stage=sft train.init_from=runs/tiny" in text  # how to run the next stage


def test_unknown_and_incomplete_presets_are_refused(capsys, tmp_path):
    with pytest.raises(PresetError, match="unknown preset 'llava-2'; known presets: " + ", ".join(PRESETS)):
        preset_model_section("llava-2")
    with pytest.raises(PresetError, match="needs --vision"):
        preset_model_section("llava-1.5", llm=PARTS["llm"])
    with pytest.raises(PresetError, match="needs --vision-extra"):
        preset_model_section("prismatic-dinosiglip", **PARTS)
    with pytest.raises(PresetError, match="no vision encoder"):
        preset_model_section("fuyu-style", vision=PARTS["vision"])
    parser = argparse.ArgumentParser()
    add_preset_parser(parser.add_subparsers())
    args = parser.parse_args(["preset", "qwen-vl", "--out", str(tmp_path / "c.yaml")])
    assert args.func(args) == 2
    assert "known presets: tiny, smollm2-shapes, llava-1.5" in capsys.readouterr().err and not (tmp_path / "c.yaml").exists()
    args = parser.parse_args(["preset", "llava-1.5", "--llm", "lmsys/vicuna-7b-v1.5", "--vision",
                              "openai/clip-vit-large-patch14-336", "--out", str(tmp_path / "c.yaml")])
    assert args.func(args) == 0
    written = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert written["model"]["llm"] == "lmsys/vicuna-7b-v1.5"  # a hub id stays a hub id
    assert load_config(tmp_path / "c.yaml").model.vision == "openai/clip-vit-large-patch14-336"
