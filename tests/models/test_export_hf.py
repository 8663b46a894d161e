"""`lmmkit export` / `lmmkit import`: lmmkit checkpoints <-> HF Llava folders, checked by logits and text.

Tolerance: fp32 on CPU, the exported model runs the same kernels on the same tensors (same pixels, same
input ids), so logits are expected to be bit-identical; ATOL leaves room for another BLAS only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import tiny_hf
from lmmkit import IMAGE_TOKEN
from lmmkit.config import Config, DataSpec, ModelSpec, TrainSpec, config_to_dict
from lmmkit.eval.generation import prompt_ids
from lmmkit.models.build import build_vlm
from lmmkit.models.convert_cli import add_export_parser, add_import_parser
from lmmkit.models.export_hf import ExportError, compare_logits, export_hf, export_llava
from lmmkit.models.import_hf import import_hf
from lmmkit.train.checkpoint import load_model, save_checkpoint

ATOL = 1e-5  # measured: 0.0 in every case below
QUESTION = "What is in the picture?"


def _image(seed: int = 0) -> Image.Image:
    """Deterministic noise (Image.effect_noise draws anew on every call), not the tower's size."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _hf_inputs(processor, image: Image.Image, question: str = QUESTION):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # As vLLM does for chat requests: the template already wrote any special tokens it wants.
    return processor(text=text, images=[image], add_special_tokens=False, return_tensors="pt")


@torch.no_grad()
def _lmmkit_logits(model, image: Image.Image, question: str = QUESTION) -> torch.Tensor:
    ids = torch.tensor([prompt_ids(model, question)])
    pixels = model.vision.preprocess([image])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits


@torch.no_grad()
def _hf_logits(folder: Path, image: Image.Image, question: str = QUESTION) -> torch.Tensor:
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    return model(**_hf_inputs(processor, image, question)).logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_llama_dir, tiny_clip_dir) -> Path:
    """An lmmkit checkpoint whose LLM and bridge differ from the base parts (export must use its weights)."""
    model = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), vision_select_layer=-2, seed=3)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in model.llm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    config = config_to_dict(Config(model=ModelSpec(llm=str(tiny_llama_dir), vision=str(tiny_clip_dir),
                                                   vision_select_layer=-2)))
    folder = tmp_path_factory.mktemp("ckpt") / "final"
    return save_checkpoint(folder, model, ("bridge", "llm"), config, {"step": 1})


@pytest.fixture(scope="module")
def lmmkit_model(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    return export_hf(checkpoint, tmp_path_factory.mktemp("export") / "hf", "hf-llava")


def test_export_loads_unchanged_and_logits_equal(exported, lmmkit_model):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "chat_template.jinja", "preprocessor_config.json", "generation_config.json"} <= names
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default" and config["image_seq_length"] == 16
    _, info = AutoModelForImageTextToText.from_pretrained(exported, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for seed in (0, 1):
        ours, theirs = _lmmkit_logits(lmmkit_model, _image(seed)), _hf_logits(exported, _image(seed))
        assert _max_diff(ours, theirs) <= ATOL
    # The image reaches the logits (a model ignoring it would also "match").
    assert _max_diff(_hf_logits(exported, _image(0)), _hf_logits(exported, _image(1))) > 1e-3
    assert compare_logits(lmmkit_model, exported, _image(2)) <= ATOL


def test_exported_processor_builds_lmmkit_inputs(exported, lmmkit_model):
    processor = AutoProcessor.from_pretrained(exported)
    image = _image(3)
    inputs = _hf_inputs(processor, image)
    ids = prompt_ids(lmmkit_model, QUESTION)
    assert inputs["input_ids"][0].tolist() == ids
    assert ids.count(lmmkit_model.image_token_id) == lmmkit_model.tokens_per_image == 16
    assert torch.equal(inputs["pixel_values"], lmmkit_model.vision.preprocess([image]))
    # String content (lmmkit's own format) renders the same through the exported template.
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{QUESTION}"}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ours = lmmkit_model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ours
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == lmmkit_model.image_token_id


def test_greedy_generate_gives_the_same_text(exported, lmmkit_model):
    processor = AutoProcessor.from_pretrained(exported)
    hf = AutoModelForImageTextToText.from_pretrained(exported).eval()
    tokenizer = lmmkit_model.tokenizer
    for seed in (0, 1):
        image = _image(seed)
        inputs = _hf_inputs(processor, image)
        out = hf.generate(**inputs, max_new_tokens=12, do_sample=False)
        out = out[0, inputs["input_ids"].shape[1]:].tolist()
        theirs = out[:-1] if out and out[-1] == tokenizer.eos_token_id else out
        ids = torch.tensor([prompt_ids(lmmkit_model, QUESTION)])
        pixels = lmmkit_model.vision.preprocess([image])
        ours = lmmkit_model.generate(ids, torch.ones_like(ids), pixel_values=pixels, max_new_tokens=12)[0]
        assert len(ours) > 2 and ours == theirs
        assert tokenizer.decode(ours, skip_special_tokens=True) == processor.batch_decode(
            [out], skip_special_tokens=True)[0]


def test_lmmkit_eval_backend_on_the_export_answers_like_lmmkit(exported, lmmkit_model):
    """`lmmkit eval --model EXPORT_DIR` (HFImageTextBackend, left-padded batch) answers as lmmkit does."""
    from lmmkit.eval.backends.base import GenerationSettings, Request
    from lmmkit.eval.backends.hf_model import HFImageTextBackend

    questions = [QUESTION, "Describe the image briefly.", "How many?"]
    images = [_image(k) for k in range(3)]
    backend = HFImageTextBackend(exported, batch_size=3, device="cpu")
    theirs = backend.generate([Request(q, [im]) for q, im in zip(questions, images, strict=True)],
                              GenerationSettings(max_new_tokens=10))
    ours = []
    for q, im in zip(questions, images, strict=True):
        ids = torch.tensor([prompt_ids(lmmkit_model, q)])
        pixels = lmmkit_model.vision.preprocess([im])
        new = lmmkit_model.generate(ids, torch.ones_like(ids), pixel_values=pixels, max_new_tokens=10)[0]
        ours.append(lmmkit_model.tokenizer.decode(new, skip_special_tokens=True).strip())
    assert theirs == ours


def test_siglip_tower_and_tied_shipped_lm(tiny_siglip_dir, tmp_path):
    model = build_vlm("shipped:lm", str(tiny_siglip_dir), seed=1).eval()
    assert model.llm.config.tie_word_embeddings
    out = export_llava(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["vision_feature_select_strategy"] == "full" and config["tie_word_embeddings"]
    assert json.loads((out / "processor_config.json").read_text())["num_additional_image_tokens"] == 0
    assert _max_diff(_lmmkit_logits(model, _image(0)), _hf_logits(out, _image(0))) <= ATOL


def test_clip_keeping_cls_exports_as_full(tiny_llama_dir, tiny_clip_dir, tmp_path):
    model = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), vision_select_layer=-1, vision_drop_cls=False)
    model.eval()
    assert model.tokens_per_image == 17
    out = export_llava(model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["vision_feature_select_strategy"] == "full"
    assert _max_diff(_lmmkit_logits(model, _image(1)), _hf_logits(out, _image(1))) <= ATOL


@pytest.mark.parametrize("case, needles", [
    ("conv", ["convolutional", "'resnet'", "CLIP, SigLIP", "shipped demo tower"]),
    ("bridge1", ["1 linear layer", "Linear-GELU-Linear", "bridge_layers=2"]),
    ("gpt2", ["GPT2LMHeadModel", "'transformer'"]),
])
def test_architectures_without_an_hf_llava_equivalent_are_refused(case, needles, tiny_llama_dir,
                                                                  tiny_clip_dir, tiny_gpt2_dir, tmp_path):
    llm = str(tiny_gpt2_dir if case == "gpt2" else tiny_llama_dir)
    vision = "shipped:vision" if case == "conv" else str(tiny_clip_dir)
    model = build_vlm(llm, vision, vision_select_layer=-2, bridge_layers=1 if case == "bridge1" else 2)
    with pytest.raises(ExportError, match="cannot export this architecture as hf-llava") as err:
        export_llava(model, tmp_path / "hf")
    for needle in needles:
        assert needle in str(err.value)
    assert not (tmp_path / "hf").exists() and not (tmp_path / ".hf.tmp").exists()


def test_llava_next_export_is_refused_with_the_reason(checkpoint, tmp_path):
    with pytest.raises(ExportError, match="no AnyRes") as err:
        export_hf(checkpoint, tmp_path / "next", "hf-llava-next")
    assert "image_newline" in str(err.value) and "--format hf-llava" in str(err.value)
    assert not (tmp_path / "next").exists()


def test_export_then_import_round_trips(exported, lmmkit_model, tmp_path):
    ckpt = import_hf(exported, tmp_path / "imported")
    assert {p.name for p in ckpt.iterdir()} >= {"llm", "vision", "bridge.safetensors", "lmmkit_config.json"}
    model = load_model(ckpt)
    # The exported template is lmmkit's own underneath; the import gives it back unchanged.
    assert model.tokenizer.chat_template == lmmkit_model.tokenizer.chat_template
    assert (model.vision.select_layer, model.vision.drop_cls) == (-2, True)
    image = _image(4)
    ours = _lmmkit_logits(model, image)
    assert _max_diff(ours, _hf_logits(exported, image)) <= ATOL
    assert _max_diff(ours, _lmmkit_logits(lmmkit_model, image)) <= ATOL


def test_import_native_hf_llava(tiny_tokenizer, tmp_path):
    folder = tiny_hf.save_tiny_llava(tmp_path / "llava", tiny_tokenizer, seed=5)
    model = load_model(import_hf(folder, tmp_path / "imported"))
    assert model.tokens_per_image == 16 and model.vision.select_layer == -1
    for seed in (0, 1):
        assert _max_diff(_lmmkit_logits(model, _image(seed)), _hf_logits(folder, _image(seed))) <= ATOL
    # lmmkit's string prompt renders as the HF processor renders list content.
    assert compare_logits(model, folder, _image(2)) <= ATOL


def test_import_keeps_the_bos_a_tokenizer_adds(tmp_path):
    """A tokenizer that adds BOS itself (Llama): lmmkit encodes without special tokens; the template must."""
    from tokenizers import processors

    from lmmkit.models.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["<image>\nWhat is in the picture? A cat on a mat."] * 20, vocab_size=300)
    bos = "<|endoftext|>"
    tokenizer.bos_token = bos
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
    folder = tiny_hf.save_tiny_llava(tmp_path / "llava", tokenizer, seed=7)
    model = load_model(import_hf(folder, tmp_path / "imported"))
    ids = prompt_ids(model, QUESTION)
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert compare_logits(model, folder, _image(0)) <= ATOL  # HF side: the processor's tokenizer adds the BOS


def test_import_llava_next_base_resolution_only(tiny_tokenizer, tmp_path):
    """--base-resolution-only keeps the Llava inside a LlavaNext (the full import is AnyRes:
    tests/models/test_export_llava_next.py)."""
    folder = tiny_hf.save_tiny_llava_next(tmp_path / "next", tiny_tokenizer)
    model = load_model(import_hf(folder, tmp_path / "imported", base_resolution_only=True))
    assert model.tokens_per_image == 16 and not model.variable_tokens
    # lmmkit's one view is LlavaNext's base tile (the first of its tiles), projected the same way.
    hf = AutoModelForImageTextToText.from_pretrained(folder).eval()
    image = _image(0)
    tiles = AutoProcessor.from_pretrained(folder).image_processor(images=[image], return_tensors="pt")
    base = tiles["pixel_values"][:, 0]
    assert torch.equal(model.vision.preprocess([image]), base)
    with torch.no_grad():
        hidden = hf.model.vision_tower(base, output_hidden_states=True).hidden_states[-1][:, 1:]
        assert _max_diff(model.encode_images(base), hf.model.multi_modal_projector(hidden)) <= ATOL


def test_imported_model_fine_tunes_and_exports_back(tiny_tokenizer, tmp_path):
    from accelerate.state import AcceleratorState

    from lmmkit.train.run import train_from_config

    folder = tiny_hf.save_tiny_llava(tmp_path / "llava", tiny_tokenizer, seed=6)
    ckpt = import_hf(folder, tmp_path / "imported")
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i in range(4):
        _image(i).save(images / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTION}"}, {"from": "gpt", "value": "A cat."}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    spec = ModelSpec(llm=str(ckpt / "llm"), vision=str(ckpt / "vision"), vision_select_layer=-1)
    cfg = Config(model=spec, data=DataSpec(train=str(tmp_path / "data.json"), image_folder=str(images)),
                 train=TrainSpec(stage="align", init_from=str(ckpt), max_steps=2, batch_size=2, lr=1e-2,
                                 precision="fp32", output_dir=str(tmp_path / "run")))
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        result = train_from_config(cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    tuned = load_model(result.checkpoint)
    before = load_model(ckpt)
    assert not torch.equal(tuned.bridge.net[0].weight, before.bridge.net[0].weight)
    out = export_llava(tuned, tmp_path / "hf")
    assert compare_logits(tuned, out, _image(1)) <= ATOL


def test_cli_export_and_import(checkpoint, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="lmmkit")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_parser(sub)
    add_import_parser(sub)

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    out = str(tmp_path / "hf")
    assert run("export", str(checkpoint), "--format", "hf-llava", "--out", out, "--verify") == 0
    assert "max |logit difference| vs lmmkit = 0" in capsys.readouterr().out
    assert run("export", str(checkpoint), "--out", str(tmp_path / "hf")) == 2  # exists, no --overwrite
    assert "not empty" in capsys.readouterr().err
    assert run("export", str(checkpoint), "--out", out, "--overwrite") == 0
    assert run("export", str(checkpoint), "--format", "hf-llava-next", "--out", str(tmp_path / "next")) == 2
    assert "no AnyRes" in capsys.readouterr().err
    assert run("import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")) == 0
    assert (tmp_path / "back" / "bridge.safetensors").is_file()
