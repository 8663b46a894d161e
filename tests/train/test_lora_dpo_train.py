"""`lmmkit train` with LoRA (sft) and the dpo stage, end to end on ShapesWorld with the shipped parts:
only adapters train, checkpoints hold merged weights that reload exactly, a LoRA run resumes exactly,
and DPO on `lmmkit data prefs` pairs raises the chosen answers' reward over the rejected ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lmmkit.train.run as run_module
from lmmkit.cli import main
from lmmkit.config import ConfigError, load_config
from lmmkit.data.shapes.generate import generate_shapes
from lmmkit.models.build import build_vlm
from lmmkit.models.lora import has_lora
from lmmkit.train.checkpoint import LORA_FILE, load_model

N_IMAGES = 8


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, seed=0, n_train=N_IMAGES, n_test=1, n_pope_images=0, workers=1, progress=False)
    return root


def _config(path: Path, shapes: Path, data: str, **train) -> Path:
    config = {
        "model": {"llm": "shipped:lm", "vision": "shipped:vision"},
        "data": {"train": str(shapes / data), "image_folder": str(shapes / "images"), "max_length": 256,
                 "bad_records": "stop"},
        "train": {"stage": "sft", "max_steps": 4, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0,
                  "precision": "fp32", "log_every": 1, "output_dir": "runs/sft", "seed": 1, **train},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lora_sft_trains_adapters_only_saves_merged_weights_and_resumes_exactly(shapes, tmp_path, monkeypatch,
                                                                                 capsys):
    monkeypatch.chdir(tmp_path)
    trained = []
    real = run_module.run_stage
    monkeypatch.setattr(run_module, "run_stage", lambda model, *a, **k: trained.append(model) or real(model, *a, **k))
    config = _config(tmp_path / "lora.yaml", shapes, "train/conversations.json", lora_rank=4, lora_alpha=8,
                     save_every=2)
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 4, alpha 8" in out and "LoRA adapters only" in out
    model = trained[0]
    base = build_vlm("shipped:lm", "shipped:vision")
    # The base LLM weights did not move; only adapters (and the bridge) did.
    for name, p in model.llm.named_parameters():
        if not name.endswith(("lora_a", "lora_b")):
            assert torch.equal(p, base.llm.state_dict()[name.replace(".base.", ".")]), name
    final = tmp_path / "runs" / "sft" / "checkpoint-4"
    assert (final / LORA_FILE).exists()
    merged = load_file(str(final / "llm.safetensors"))
    assert not any("lora" in k for k in merged)
    reloaded = load_model(final)
    assert not has_lora(reloaded.llm)
    ids = torch.tensor([reloaded.tokenizer("<|im_start|>user\nIs there a red circle?")["input_ids"]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(reloaded(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)

    # Resume from step 2: the final adapters equal the uninterrupted run's.
    import shutil

    shutil.rmtree(final)
    assert main(["train", "--config", str(config), "--resume"]) == 0
    assert "resuming sft" in capsys.readouterr().out
    resumed = load_file(str(final / LORA_FILE))
    for key, value in resumed.items():
        assert torch.allclose(value, dict(trained[0].llm.named_parameters())[key], atol=1e-6), key


def test_dpo_stage_on_shapes_pairs_with_an_adapters_off_reference(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["data", "prefs", "--data", str(shapes), "--seed", "0"]) == 0
    assert f"{N_IMAGES} preference pairs" in capsys.readouterr().out
    config = _config(tmp_path / "dpo.yaml", shapes, "train/preferences.json", stage="dpo", lora_rank=8,
                     lora_alpha=16, dpo_reference="adapters-off", dpo_beta=0.5, max_steps=8, batch_size=N_IMAGES,
                     lr=1e-2, output_dir="runs/dpo")
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{N_IMAGES} preference pairs" in out
    rows = _metrics(tmp_path / "runs" / "dpo")
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as its reference
    assert rows[-1]["reward_margin"] > 0.5 and rows[-1]["reward_accuracy"] == 1.0, rows[-1]
    assert load_model(tmp_path / "runs" / "dpo") is not None


def test_lora_and_dpo_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="train.lora_rank: LoRA adapts the LLM in stages sft and dpo"):
        load_config(None, ["train.stage=align", "train.lora_rank=8"])
    with pytest.raises(ConfigError, match="'adapters-off' .* needs train.lora_rank > 0"):
        load_config(None, ["train.stage=dpo", "train.dpo_reference=adapters-off"])
    with pytest.raises(ConfigError, match="train.dpo_loss: 'kto' is not allowed; choose one of: sigmoid, ipo, hinge"):
        load_config(None, ["train.dpo_loss=kto"])
    cfg = load_config(None, ["train.stage=dpo", "train.lora_rank=16", "train.dpo_reference=adapters-off"])
    assert cfg.train.trains_llm and not cfg.train.trains_vision_tower
