"""End to end on ShapesWorld for each architecture option: `lmmkit train` align then sft, reload, chat.

The shipped LM and shipped ResNet tower (an 8x8 grid, 64 tokens per image) with: the MLP bridge
after a 2x pixel shuffle (16 tokens), a Perceiver resampler (8 queries), a Q-Former (6 queries),
Flamingo cross-attention (1 marker token), Fuyu patches (72 tokens) and a fused tower (64 tokens).
Every step trains on the same small batch (batch_size = the whole tiny dataset), so the align loss
must fall; the sft checkpoint must reload into a model whose logits equal the trained one's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import lmmkit.train.run as run_module
from lmmkit.cli import main
from lmmkit.data.images import load_image
from lmmkit.data.shapes.generate import generate_shapes
from lmmkit.eval.generation import answer_questions, prompt_ids
from lmmkit.models.bridges import MLPBridge, PixelShuffleBridge, ResamplerBridge
from lmmkit.models.bridges.cross_attention import GatedCrossAttentionBridge
from lmmkit.models.bridges.fuyu import FuyuBridge
from lmmkit.train.checkpoint import load_model, read_config

N_IMAGES = 6
FAMILIES = {
    "shuffle": ({"bridge": "mlp", "pixel_shuffle": 2}, PixelShuffleBridge, 16),
    "resampler": ({"bridge": "resampler", "bridge_queries": 8, "bridge_depth": 2, "bridge_heads": 4}, ResamplerBridge,
                  8),
    "qformer": ({"bridge": "qformer", "bridge_queries": 6, "bridge_depth": 1, "bridge_heads": 4, "bridge_width": 64},
                ResamplerBridge, 6),
    # Flamingo: one <image> marker per image; gated blocks before layers 0 and 2 of the 4-layer LM.
    "cross-attention": ({"bridge": "cross-attention", "cross_attention_every": 2, "bridge_heads": 4},
                        GatedCrossAttentionBridge, 1),
    # Fuyu: raw 8x8 patches of the 64x64 image (8 rows of 8) plus a row break per row.
    "fuyu": ({"vision": "patch", "bridge": "fuyu", "patch_size": 8}, FuyuBridge, 8 * 9),
    # Prismatic-style fusion (here the shipped tower with itself: same grid, features concatenated).
    "fused": ({"vision_extra": "shipped:vision"}, MLPBridge, 64),
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, seed=0, n_train=N_IMAGES, n_test=1, n_pope_images=0, workers=1, progress=False)
    return root


def _write_config(path: Path, shapes: Path, bridge: dict) -> Path:
    config = {
        "model": {"llm": "shipped:lm", "vision": "shipped:vision", **bridge},
        "data": {"train": str(shapes / "train" / "captions.json"), "image_folder": str(shapes / "images"),
                 "max_length": 256, "bad_records": "stop"},
        "train": {"stage": "align", "max_steps": 6, "batch_size": N_IMAGES, "lr": 1e-3, "warmup_ratio": 0.0,
                  "precision": "fp32", "log_every": 1, "output_dir": "runs/align", "seed": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_align_sft_reload_chat_with_each_bridge(family, shapes, tmp_path, monkeypatch, capsys):
    bridge, bridge_cls, tokens = FAMILIES[family]
    monkeypatch.chdir(tmp_path)
    trained = []  # the in-memory model each `lmmkit train` trained, to compare with its reloaded checkpoint

    def capture(model, *args, **kwargs):
        trained.append(model)
        return real_run_stage(model, *args, **kwargs)

    real_run_stage = run_module.run_stage
    monkeypatch.setattr(run_module, "run_stage", capture)
    config = _write_config(tmp_path / "run.yaml", shapes, bridge)

    # ---- align: the bridge only, on captions ---------------------------------------------------
    assert main(["train", "--config", str(config)]) == 0
    assert "align: 6 steps" in capsys.readouterr().out
    align = tmp_path / "runs" / "align" / "checkpoint-6"
    assert {p.name for p in align.glob("*.safetensors")} == {"bridge.safetensors"}
    assert all(read_config(align)["model"][k] == v for k, v in bridge.items())
    losses = _losses(tmp_path / "runs" / "align")
    assert len(losses) == 6 and losses[-1] < losses[0], losses

    # ---- sft: bridge + LLM on conversations, from the align checkpoint ----------------------------
    conversations = shapes / "train" / "conversations.json"
    assert main(["train", "--config", str(config), "train.stage=sft", f"train.init_from={align}",
                 f"data.train={conversations}", "train.output_dir=runs/sft", "train.max_steps=3"]) == 0
    assert "sft: 3 steps" in capsys.readouterr().out
    sft = tmp_path / "runs" / "sft" / "checkpoint-3"
    assert {p.name for p in sft.glob("*.safetensors")} == {"bridge.safetensors", "llm.safetensors"}

    # ---- reload: same bridge, same token count, exactly the same logits ----------------------------
    model, reloaded = trained[-1].eval(), load_model(sft)
    assert type(reloaded.bridge) is bridge_cls and reloaded.tokens_per_image == tokens == model.tokens_per_image
    image = load_image(shapes / "images" / "train" / "000000.png", "test")
    ids = torch.tensor([prompt_ids(model, "What is in the image?")])
    pixels = model.vision.preprocess([image])
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels).logits
        theirs = reloaded(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(ours, theirs)
    aligned = load_model(align).bridge.state_dict()
    assert all(torch.equal(v, aligned[k]) for k, v in trained[0].bridge.state_dict().items())
    assert any(not torch.equal(v, aligned[k]) for k, v in model.bridge.state_dict().items()), \
        "sft should have trained the bridge further"

    # ---- lmmkit chat on one image ----------------------------------------------------------------
    path = shapes / "images" / "train" / "000000.png"
    assert main(["chat", str(sft), "--image", str(path), "--prompt", "What is in the image?", "--max-tokens", "6"]) == 0
    printed = capsys.readouterr().out.rstrip("\n").split("\n")[-1]
    expected = answer_questions(reloaded, [(image, "What is in the image?")], max_new_tokens=6, progress=False)[0]
    assert printed == expected


def test_fused_towers_that_do_not_fit_fail_before_any_data_is_read(shapes, tmp_path, monkeypatch, capsys,
                                                                   tiny_clip_dir):
    monkeypatch.chdir(tmp_path)
    config = _write_config(tmp_path / "run.yaml", shapes, {"vision_extra": str(tiny_clip_dir)})
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"model error ({config})" in err and "same size" in err, err
    assert not (tmp_path / "runs").exists()
