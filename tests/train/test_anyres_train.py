"""LLaVA-NeXT AnyRes trained end to end: `lmmkit train` align then sft on ShapesWorld, reload, chat; images of
several sizes (so several token counts) in one batch; and the config / build errors that guard the option.

The tower is a tiny CLIP (32 px input, patch 8: 16 features per view) with pinpoints 32x64, 64x32, 64x64, so
a 64x64 ShapesWorld image is the base view plus a 2x2 grid: 16 + 8 x 8 tile features + 8 newlines = 88 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import lmmkit.train.run as run_module
from lmmkit import IMAGE_TOKEN
from lmmkit.cli import main
from lmmkit.data.images import load_image
from lmmkit.data.shapes.generate import generate_shapes
from lmmkit.eval.generation import answer_questions, prompt_ids
from lmmkit.models.anyres_tower import AnyResBridge, AnyResVisionTower
from lmmkit.models.build import build_vlm
from lmmkit.models.highres import anyres_token_count
from lmmkit.train.checkpoint import load_model, read_config
from lmmkit.train.features import FeatureCache, image_key
from lmmkit.train.loop import make_batch
from lmmkit.train.run import load_samples

N_IMAGES = 6
PINPOINTS = "32x64,64x32,64x64"
GRID = [(32, 64), (64, 32), (64, 64)]
ANYRES = {"anyres": True, "anyres_grid_pinpoints": PINPOINTS, "vision_select_layer": -2}
SIZES = [(90, 40), (64, 64), (30, 100), (64, 64), (90, 40), (30, 100)]  # (height, width) of the mixed records


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, seed=0, n_train=N_IMAGES, n_test=1, n_pope_images=0, workers=1, progress=False)
    return root


def _write_config(path: Path, data: dict, model: dict) -> Path:
    config = {
        "model": {"llm": "shipped:lm", **model},
        "data": {"max_length": 256, "bad_records": "stop", **data},
        "train": {"stage": "align", "max_steps": 6, "batch_size": N_IMAGES, "lr": 1e-3, "warmup_ratio": 0.0,
                  "precision": "fp32", "log_every": 1, "output_dir": "runs/align", "seed": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_align_sft_reload_chat_on_shapesworld(shapes, tiny_clip_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    trained = []  # the in-memory model each `lmmkit train` trained, to compare with its reloaded checkpoint

    def capture(model, *args, **kwargs):
        trained.append(model)
        return real_run_stage(model, *args, **kwargs)

    real_run_stage = run_module.run_stage
    monkeypatch.setattr(run_module, "run_stage", capture)
    data = {"train": str(shapes / "train" / "captions.json"), "image_folder": str(shapes / "images")}
    config = _write_config(tmp_path / "run.yaml", data, {"vision": str(tiny_clip_dir), **ANYRES})

    # ---- align: the projector and image_newline train, on captions ---------------------------------
    assert main(["train", "--config", str(config)]) == 0
    assert "align: 6 steps" in capsys.readouterr().out
    align = tmp_path / "runs" / "align" / "checkpoint-6"
    assert {p.name for p in align.glob("*.safetensors")} == {"bridge.safetensors"}
    assert read_config(align)["model"]["anyres_grid_pinpoints"] == PINPOINTS
    losses = _losses(tmp_path / "runs" / "align")
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    initial = build_vlm("shipped:lm", str(tiny_clip_dir), -2, seed=1, anyres=True, anyres_grid_pinpoints=PINPOINTS)
    aligned = load_model(align)
    assert not torch.equal(aligned.bridge.image_newline, initial.bridge.image_newline), \
        "align must train image_newline: it belongs to the bridge"

    # ---- sft: bridge + LLM on conversations -----------------------------------------------------
    conversations = shapes / "train" / "conversations.json"
    assert main(["train", "--config", str(config), "train.stage=sft", f"train.init_from={align}",
                 f"data.train={conversations}", "train.output_dir=runs/sft", "train.max_steps=3"]) == 0
    assert "sft: 3 steps" in capsys.readouterr().out
    sft = tmp_path / "runs" / "sft" / "checkpoint-3"
    assert {p.name for p in sft.glob("*.safetensors")} == {"bridge.safetensors", "llm.safetensors"}

    # ---- reload: an AnyRes model again, exactly the same logits ----------------------------------
    model, reloaded = trained[-1].eval(), load_model(sft)
    assert isinstance(reloaded.vision, AnyResVisionTower) and isinstance(reloaded.bridge, AnyResBridge)
    assert reloaded.tokens_per_image is None and reloaded.vision.grid.pinpoints == tuple(GRID)
    path = shapes / "images" / "train" / "000000.png"
    image = load_image(path, "test")
    assert reloaded.image_token_counts([path]) == [16 + 8 * 8 + 8] == [anyres_token_count((64, 64), GRID, 32, 8)]
    ids = torch.tensor([prompt_ids(model, "What is in the image?", image=image)])
    pixels = model.vision.preprocess([image])
    assert pixels.shape == (5, 3, 32, 32)  # base view + 2x2 tiles
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels, image_sizes=[(64, 64)]).logits
        theirs = reloaded(input_ids=ids, pixel_values=pixels, image_sizes=[(64, 64)]).logits
    assert torch.equal(ours, theirs)
    assert not torch.equal(model.bridge.image_newline, aligned.bridge.image_newline)

    # ---- lmmkit chat on one image ---------------------------------------------------------------
    assert main(["chat", str(sft), "--image", str(path), "--prompt", "What is in the image?", "--max-tokens", "6"]) == 0
    printed = capsys.readouterr().out.rstrip("\n").split("\n")[-1]
    expected = answer_questions(reloaded, [(image, "What is in the image?")], max_new_tokens=6, progress=False)[0]
    assert printed == expected


def _mixed_records(root: Path) -> tuple[Path, Path]:
    """LLaVA records whose PNGs have different sizes (and so different AnyRes grids and token counts)."""
    images = root / "images"
    images.mkdir(parents=True)
    records = []
    for i, (height, width) in enumerate(SIZES):
        pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        colour = ("red", "green", "blue")[i % 3]
        records.append({"id": f"mixed-{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat colour is it?"},
            {"from": "gpt", "value": f"It is {colour}."}]})
    data = root / "mixed.json"
    data.write_text(json.dumps(records))
    return data, images


def test_images_of_several_sizes_in_one_batch(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    data, images = _mixed_records(tmp_path / "data")
    model = build_vlm("shipped:lm", str(tiny_clip_dir), -2, anyres=True, anyres_grid_pinpoints=PINPOINTS).eval()
    samples, counter = load_samples(model, data, images, max_length=256, policy="stop")
    assert counter.total == 0 and len(samples) == len(SIZES)
    counts = [s.input_ids.count(model.image_token_id) for s in samples]
    assert counts == [anyres_token_count(size, GRID, 32, 8) for size in SIZES]
    assert len(set(counts)) == 3  # three sizes, three different counts: 52, 88 and 40 tokens

    # One batch holding every size: cached features (variable shapes) and raw pixels give the same loss.
    cache = FeatureCache()
    cache.fill(model, [im for s in samples for im in s.images], autocast=False)
    assert [cache.features[image_key(s.images[0])].shape[0] for s in samples] == [3, 5, 3, 5, 3, 3]  # base + tiles
    with torch.no_grad():
        for s in samples:  # each entry is its own image's views, whatever order the batch was encoded in
            direct = model.vision_features(model.vision.preprocess([load_image(s.images[0], "test")]))
            torch.testing.assert_close(cache.features[image_key(s.images[0])].float(), direct, atol=0.03, rtol=0.02)
        pad = model.tokenizer.pad_token_id
        cached = model(**make_batch(model, samples, cache, pad)).loss
        direct = model(**make_batch(model, samples, None, pad)).loss
    # The cache keeps bf16 features: the two losses differ by that rounding only (measured 6e-4 of 9.1).
    assert torch.isfinite(cached) and abs(cached.item() - direct.item()) < 3e-3

    # `lmmkit train` on the mixed batch (feature cache on): the loss falls.
    monkeypatch.chdir(tmp_path)
    config = _write_config(tmp_path / "mixed.yaml", {"train": str(data), "image_folder": str(images)},
                           {"vision": str(tiny_clip_dir), **ANYRES})
    assert main(["train", "--config", str(config), "train.max_steps=4", "train.stage=sft", "train.lr=3e-3",
                 "train.output_dir=runs/mixed"]) == 0
    losses = _losses(tmp_path / "runs" / "mixed")
    assert len(losses) == 4 and losses[-1] < losses[0], losses


@pytest.mark.parametrize("model, where, needles", [
    ({"vision": "patch", "bridge": "fuyu"}, "config", ["model.anyres", "model.vision=patch"]),
    ({"bridge": "resampler"}, "config", ["model.anyres", "model.bridge=mlp"]),
    ({"anyres_grid_pinpoints": "32x64,64"}, "config", ["model.anyres_grid_pinpoints", "pinpoint 2 '64'"]),
    ({"anyres_grid_pinpoints": "7x14,14x7"}, "config", ["model.anyres_grid_pinpoints", "dividing all these sides is 7"]),
    ({"anyres": False, "anyres_max": 2}, "config", ["model.anyres_max is set but model.anyres is false"]),
    ({"vision": "shipped:vision"}, "model", ["convolutional 'resnet'", "model.anyres=false"]),
    ({"anyres_grid_pinpoints": "32x64,64x48"}, "model",
     ["model.anyres_grid_pinpoints", "pinpoint 2 (64x48) has width 48", "input size 32", "use e.g. 64"]),
])
def test_anyres_choices_that_cannot_work_fail_before_training(model, where, needles, shapes, tiny_clip_dir, tmp_path,
                                                              monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = {"train": str(shapes / "train" / "captions.json"), "image_folder": str(shapes / "images")}
    config = _write_config(tmp_path / "run.yaml", data, {"vision": str(tiny_clip_dir), **ANYRES, **model})
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert (f"model error ({config})" in err) == (where == "model"), err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "runs").exists()
