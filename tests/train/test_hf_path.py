"""Acceptance: the pipeline runs on HF-format checkpoints named in a YAML config, through the CLI.

`lmmkit train --config X.yaml` with model.llm = a (tiny) LlamaForCausalLM folder and model.vision =
a (tiny) CLIP or SigLIP vision folder, all made here with save_pretrained (no hub): an align run,
then an sft run initialised from the align checkpoint, then `lmmkit chat` and load_model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import CLIPVisionModel, SiglipVisionModel

from lmmkit.cli import main
from lmmkit.data.images import load_image
from lmmkit.eval.generation import answer_questions
from lmmkit.train.checkpoint import load_model, read_config, read_state


def _write_config(path: Path, llm: Path, vision: Path) -> Path:
    config = {
        "model": {"llm": str(llm), "vision": str(vision), "vision_select_layer": -2, "bridge_layers": 2},
        # Relative to the YAML file's folder.
        "data": {"train": "../data/conversations.json", "image_folder": "../data/images", "max_length": 128},
        # Relative to the working directory.
        "train": {"stage": "align", "max_steps": 4, "batch_size": 4, "lr": 1.0e-2, "save_every": 2,
                  "log_every": 1, "output_dir": "runs/align"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _assert_same_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize(("tower", "tower_cls"), [("tiny_clip_dir", CLIPVisionModel),
                                                  ("tiny_siglip_dir", SiglipVisionModel)])
def test_train_align_then_sft_then_chat_on_hf_folders(tower, tower_cls, tiny_llama_dir, make_llava_data, request,
                                                       tmp_path, monkeypatch, capsys):
    vision_dir = request.getfixturevalue(tower)
    monkeypatch.chdir(tmp_path)
    make_llava_data(tmp_path / "data")
    config = _write_config(tmp_path / "configs" / "hf.yaml", tiny_llama_dir, vision_dir)

    # ---- stage 1: align (bridge only) --------------------------------------------------------
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "8 samples" in out and "align: 4 steps" in out
    align = tmp_path / "runs" / "align" / "checkpoint-4"
    assert (tmp_path / "runs" / "align" / "checkpoint-2").is_dir()  # save_every=2
    assert {p.name for p in align.glob("*.safetensors")} == {"bridge.safetensors"}
    saved = read_config(align)
    assert saved["model"]["llm"] == str(tiny_llama_dir)
    assert saved["model"]["vision"] == str(vision_dir)
    assert saved["model"]["vision_select_layer"] == -2
    assert saved["data"]["train"] == str(tmp_path / "data" / "conversations.json")
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "align" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]

    # ---- stage 2: sft (bridge + LLM), initialised from the align checkpoint ------------------
    rc = main(["train", "--config", str(config), "train.stage=sft", "train.init_from=runs/align/checkpoint-4",
               "train.output_dir=runs/sft", "train.lr=3e-3"])
    assert rc == 0
    assert "sft: 4 steps" in capsys.readouterr().out
    sft = tmp_path / "runs" / "sft" / "checkpoint-4"
    assert {p.name for p in sft.glob("*.safetensors")} == {"bridge.safetensors", "llm.safetensors"}
    assert read_config(sft)["train"]["init_from"] == str(align)
    assert read_state(sft)["stage"] == "sft"

    # ---- load_model: the base HF parts, then align's parts, then sft's ------------------------
    model = load_model(sft)
    assert model.tokens_per_image == 16
    assert model.vision.select_layer == -2
    _assert_same_weights(model.bridge, load_file(sft / "bridge.safetensors"))
    _assert_same_weights(model.llm, load_file(sft / "llm.safetensors"))
    _assert_same_weights(model.vision.model, tower_cls.from_pretrained(vision_dir).state_dict())
    align_bridge = load_file(align / "bridge.safetensors")
    assert any(not torch.equal(model.bridge.state_dict()[k], v) for k, v in align_bridge.items()), \
        "sft should have trained the bridge further"

    # ---- stage 3: full (the tower trains too, so features are not cached) -----------------------
    rc = main(["train", "--config", str(config), "train.stage=full", f"train.init_from={sft}",
               "train.output_dir=runs/full", "train.max_steps=2", "train.lr=1e-3"])
    assert rc == 0
    capsys.readouterr()
    full = tmp_path / "runs" / "full" / "checkpoint-2"
    assert {p.name for p in full.glob("*.safetensors")} == {"bridge.safetensors", "llm.safetensors",
                                                           "vision.safetensors"}
    full_model = load_model(full)
    _assert_same_weights(full_model.vision, load_file(full / "vision.safetensors"))
    original_tower = tower_cls.from_pretrained(vision_dir).state_dict()
    assert any(not torch.equal(full_model.vision.model.state_dict()[k], v) for k, v in original_tower.items())

    # ---- lmmkit chat ---------------------------------------------------------------------------
    image = tmp_path / "data" / "images" / "img0.png"
    prompt = "What colour is the square?"
    assert main(["chat", str(sft), "--image", str(image), "--prompt", prompt, "--max-tokens", "8"]) == 0
    printed = capsys.readouterr().out.rstrip("\n").split("\n")[-1]
    expected = answer_questions(model, [(load_image(image, "test"), prompt)], max_new_tokens=8, progress=False)[0]
    assert printed == expected
