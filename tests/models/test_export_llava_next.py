"""`lmmkit export --format hf-llava-next` / `lmmkit import` of LlavaNext: lmmkit AnyRes models <-> HF LlavaNext.

Tolerance: fp32 on CPU. The exported processor is checked to build the same input ids and the same pixels
(every view, bit for bit), and the HF model runs the same tower, projector, packing and LLM kernels on
them, so logits are expected to be bit-identical (measured max |difference| 0.0 on every size below);
ATOL leaves room for another BLAS only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

import tiny_hf
from lmmkit.config import Config, ModelSpec, config_to_dict
from lmmkit.eval.generation import prompt_ids
from lmmkit.models.anyres_tower import AnyResBridge, AnyResVisionTower
from lmmkit.models.build import build_vlm
from lmmkit.models.convert_cli import add_export_parser, add_import_parser
from lmmkit.models.export_hf import ExportError, compare_logits, export_hf, export_llava
from lmmkit.models.export_llava_next import export_llava_next
from lmmkit.models.highres import anyres_token_count
from lmmkit.models.import_hf import HFImportError, import_hf
from lmmkit.train.checkpoint import load_model, save_checkpoint

ATOL = 1e-5
QUESTION = "What is in the picture?"
PINPOINTS = "32x64,64x32,64x64,96x32"
GRID = [[32, 64], [64, 32], [64, 64], [96, 32]]
# (height, width): a 1x2, a 2x1, a 2x2 and a 3x1 grid, with unpadding on either axis or none.
SIZES = [(40, 90), (100, 30), (64, 64), (48, 40), (150, 40)]


def _image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8), "RGB")


def _hf_inputs(processor, image: Image.Image, question: str = QUESTION):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=text, images=[image], add_special_tokens=False, return_tensors="pt")


@torch.no_grad()
def _lmmkit_logits(model, image: Image.Image, question: str = QUESTION) -> torch.Tensor:
    ids = torch.tensor([prompt_ids(model, question, image=image)])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=model.vision.preprocess([image]),
                 image_sizes=[(image.height, image.width)]).logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_llama_dir, tiny_clip_dir) -> Path:
    """An AnyRes checkpoint whose LLM, projector and image_newline differ from their initial values."""
    model = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), vision_select_layer=-2, seed=3, anyres=True,
                      anyres_grid_pinpoints=PINPOINTS)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in [*model.llm.parameters(), model.bridge.image_newline]:
            p.add_(0.05 * torch.randn_like(p))
    spec = ModelSpec(llm=str(tiny_llama_dir), vision=str(tiny_clip_dir), vision_select_layer=-2, anyres=True,
                     anyres_grid_pinpoints=PINPOINTS)
    folder = tmp_path_factory.mktemp("ckpt") / "final"
    return save_checkpoint(folder, model, ("bridge", "llm"), config_to_dict(Config(model=spec)), {"step": 1})


@pytest.fixture(scope="module")
def lmmkit_model(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    return export_hf(checkpoint, tmp_path_factory.mktemp("export") / "hf", "hf-llava-next")


@pytest.fixture(scope="module")
def hf_model(exported):
    return AutoModelForImageTextToText.from_pretrained(exported).eval()


def test_export_folder_is_a_llava_next_with_lmmkit_settings(exported, lmmkit_model):
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert config["image_grid_pinpoints"] == GRID
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-2, "default")
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        newline = f.get_tensor("image_newline")
    assert torch.equal(newline, lmmkit_model.bridge.image_newline.detach())
    _, info = AutoModelForImageTextToText.from_pretrained(exported, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ip = json.loads((exported / "preprocessor_config.json").read_text())
    tower_ip = lmmkit_model.vision.processor
    assert ip["image_processor_type"].startswith("LlavaNextImageProcessor")
    assert (ip["resample"], ip["image_mean"], ip["image_std"]) == (tower_ip.resample, list(tower_ip.image_mean),
                                                                   list(tower_ip.image_std))
    assert ip["crop_size"] == {"height": 32, "width": 32} and ip["do_pad"]


@pytest.mark.parametrize("size", SIZES)
def test_logits_equal_on_images_of_several_sizes(size, exported, lmmkit_model, hf_model):
    processor = AutoProcessor.from_pretrained(exported)
    image = _image(size, seed=sum(size))
    inputs = _hf_inputs(processor, image)
    ids = prompt_ids(lmmkit_model, QUESTION, image=image)
    # Same input ids (the <image> expansion counts the same AnyRes tokens) and the same pixels, view for view.
    assert inputs["input_ids"][0].tolist() == ids
    assert ids.count(lmmkit_model.image_token_id) == anyres_token_count(size, GRID, 32, 8)
    assert torch.equal(inputs["pixel_values"][0], lmmkit_model.vision.preprocess([image]))
    with torch.no_grad():
        theirs = hf_model(**inputs).logits
    assert _max_diff(_lmmkit_logits(lmmkit_model, image), theirs) <= ATOL
    assert compare_logits(lmmkit_model, exported, image) <= ATOL


def test_the_tiles_and_the_newline_reach_the_logits(exported, lmmkit_model, hf_model):
    """A model ignoring the high-resolution tiles or image_newline would also 'match': they must matter."""
    processor = AutoProcessor.from_pretrained(exported)
    image = _image((40, 90), seed=1)
    inputs = _hf_inputs(processor, image)
    with torch.no_grad():
        before = hf_model(**inputs).logits
        tiles = inputs["pixel_values"].clone()
        tiles[0, 1:] = 0  # same base view, blank tiles
        changed_tiles = hf_model(**{**inputs, "pixel_values": tiles}).logits
        saved = hf_model.model.image_newline.detach().clone()
        hf_model.model.image_newline.data.zero_()
        changed_newline = hf_model(**inputs).logits
        hf_model.model.image_newline.data.copy_(saved)
    assert _max_diff(before, changed_tiles) > 1e-3 and _max_diff(before, changed_newline) > 1e-3


def test_greedy_generate_gives_the_same_text(exported, lmmkit_model, hf_model):
    processor = AutoProcessor.from_pretrained(exported)
    tokenizer = lmmkit_model.tokenizer
    for k, size in enumerate(SIZES[:3]):
        image = _image(size, seed=10 + k)
        inputs = _hf_inputs(processor, image)
        out = hf_model.generate(**inputs, max_new_tokens=12, do_sample=False)
        out = out[0, inputs["input_ids"].shape[1]:].tolist()
        theirs = out[:-1] if out and out[-1] == tokenizer.eos_token_id else out
        ids = torch.tensor([prompt_ids(lmmkit_model, QUESTION, image=image)])
        ours = lmmkit_model.generate(ids, torch.ones_like(ids), pixel_values=lmmkit_model.vision.preprocess([image]),
                                     image_sizes=[size], max_new_tokens=12)[0]
        assert len(ours) > 2 and ours == theirs
        assert tokenizer.decode(ours, skip_special_tokens=True) == processor.batch_decode(
            [out], skip_special_tokens=True)[0]


def test_lmmkit_eval_backend_on_the_export_answers_like_lmmkit(exported, lmmkit_model):
    """`lmmkit eval --model EXPORT_DIR`: one left-padded HF batch of three sizes (three token counts)."""
    from lmmkit.eval.backends.base import GenerationSettings, Request
    from lmmkit.eval.backends.hf_model import HFImageTextBackend

    questions = [QUESTION, "Describe the image briefly.", "How many?"]
    images = [_image(size, seed=50 + k) for k, size in enumerate(SIZES[:3])]
    backend = HFImageTextBackend(exported, batch_size=3, device="cpu")
    theirs = backend.generate([Request(q, [im]) for q, im in zip(questions, images, strict=True)],
                              GenerationSettings(max_new_tokens=10))
    ours = []
    for q, im in zip(questions, images, strict=True):
        ids = torch.tensor([prompt_ids(lmmkit_model, q, image=im)])
        new = lmmkit_model.generate(ids, torch.ones_like(ids), pixel_values=lmmkit_model.vision.preprocess([im]),
                                    image_sizes=[(im.height, im.width)], max_new_tokens=10)[0]
        ours.append(lmmkit_model.tokenizer.decode(new, skip_special_tokens=True).strip())
    assert theirs == ours and all(ours)


def test_export_then_import_round_trips(exported, lmmkit_model, tmp_path):
    model = load_model(import_hf(exported, tmp_path / "imported"))
    assert isinstance(model.vision, AnyResVisionTower) and isinstance(model.bridge, AnyResBridge)
    assert [list(p) for p in model.vision.grid.pinpoints] == GRID
    assert model.tokenizer.chat_template == lmmkit_model.tokenizer.chat_template
    for k, size in enumerate(SIZES[:3]):
        image = _image(size, seed=20 + k)
        ours = _lmmkit_logits(model, image)
        assert _max_diff(ours, _lmmkit_logits(lmmkit_model, image)) <= ATOL
        assert compare_logits(model, exported, image) <= ATOL


def test_import_native_hf_llava_next_as_anyres(tiny_tokenizer, tmp_path):
    folder = tiny_hf.save_tiny_llava_next(tmp_path / "next", tiny_tokenizer, seed=5)
    model = load_model(import_hf(folder, tmp_path / "imported"))
    assert isinstance(model.bridge, AnyResBridge) and model.tokens_per_image is None
    hf = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert torch.equal(model.bridge.image_newline, hf.model.image_newline)
    for k, size in enumerate([(40, 90), (100, 30), (32, 32), (48, 40)]):  # (32, 32): the 1x1 pinpoint
        assert compare_logits(model, folder, _image(size, seed=30 + k)) <= ATOL


def test_siglip_tower_exports(tiny_siglip_dir, tmp_path):
    model = build_vlm("shipped:lm", str(tiny_siglip_dir), seed=1, anyres=True, anyres_grid_pinpoints=PINPOINTS)
    model.eval()
    out = export_llava_next(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["vision_feature_select_strategy"] == "full" and config["tie_word_embeddings"]
    for k, size in enumerate([(40, 90), (64, 64), (100, 30)]):
        assert compare_logits(model, out, _image(size, seed=40 + k)) <= ATOL


def test_what_llava_next_cannot_express_is_refused(tiny_llama_dir, tiny_clip_dir, tmp_path):
    capped = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), anyres=True, anyres_grid_pinpoints=PINPOINTS,
                       anyres_max=1)
    with pytest.raises(ExportError, match="anyres_max"):
        export_llava_next(capped, tmp_path / "capped")
    one_layer = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), bridge_layers=1, anyres=True)
    with pytest.raises(ExportError, match="cannot export this architecture as hf-llava-next: the bridge has 1"):
        export_llava_next(one_layer, tmp_path / "one")
    with pytest.raises(ExportError, match="--format hf-llava-next"):  # and an AnyRes model is no plain Llava
        export_llava(build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), anyres=True), tmp_path / "llava")
    assert not any(tmp_path.iterdir())


def test_cli_export_verify_and_import(checkpoint, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="lmmkit")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_parser(sub)
    add_import_parser(sub)

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    out = str(tmp_path / "hf")
    assert run("export", str(checkpoint), "--format", "hf-llava-next", "--out", out, "--verify") == 0
    assert "max |logit difference| vs lmmkit = 0" in capsys.readouterr().out
    assert run("export", str(checkpoint), "--format", "hf-llava", "--out", str(tmp_path / "llava")) == 2
    assert "--format hf-llava-next" in capsys.readouterr().err
    assert run("import", out, "--out", str(tmp_path / "back")) == 0
    assert load_model(tmp_path / "back").variable_tokens


@pytest.mark.parametrize("edit, needle", [
    ({"vision_feature_select_strategy": "full"}, "keeps CLIP's CLS token"),
    ({"image_grid_pinpoints": [[32, 64], [64, 64]]}, "grid pinpoints"),
])
def test_llava_next_folders_anyres_cannot_reproduce_are_refused(edit, needle, tiny_tokenizer, tmp_path):
    folder = tiny_hf.save_tiny_llava_next(tmp_path / "next", tiny_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(HFImportError, match=needle) as err:
        import_hf(folder, tmp_path / "imported")
    assert "--base-resolution-only" in str(err.value)
    assert not (tmp_path / "imported").exists()
