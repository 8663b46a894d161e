"""Checkpoints: what trained, as safetensors per part, plus optimizer state; written atomically.

A checkpoint folder holds `lmmkit_config.json` (the full config that made it), one
`<part>.safetensors` per part that trained (bridge, llm, vision), `trainer_state.json`, and
`optimizer.pt` for resuming. It is written to a temporary folder and renamed into place, so a
kill mid-write never leaves a half checkpoint that --resume would pick up. A model is rebuilt
from a checkpoint by building the base parts named in its config, applying the checkpoint it
was initialised from (`train.init_from`), then its own trained parts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, save_model
from safetensors.torch import load_model as load_safetensors

from lmmkit.models.lora import has_lora, load_lora_state_dict, lora_state_dict, merged_view
from lmmkit.models.vlm import VisionLanguageModel

CONFIG_FILE = "lmmkit_config.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
LORA_FILE = "lora.safetensors"
PARTS = ("vision", "bridge", "llm")


def save_checkpoint(path: Path, model: VisionLanguageModel, parts: tuple[str, ...], config: dict, state: dict,
                    optimizer: torch.optim.Optimizer | None = None, scheduler=None) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    lora = "llm" in parts and has_lora(model.llm)
    for part in parts:
        if part == "llm" and lora:
            # The merged weights load into a model without adapters (load_model, export, serve); the adapters
            # alone are what --resume needs, since the base weights never change under LoRA.
            with merged_view(model.llm):
                save_model(model.llm, str(tmp / "llm.safetensors"))
            save_file(lora_state_dict(model.llm), str(tmp / LORA_FILE))
        else:
            save_model(getattr(model, part), str(tmp / f"{part}.safetensors"))
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    (tmp / STATE_FILE).write_text(json.dumps({**state, "parts": list(parts)}, indent=2))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None}, tmp / OPTIMIZER_FILE)
    model.tokenizer.save_pretrained(tmp / "tokenizer")
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def read_config(path: Path) -> dict:
    return json.loads((Path(path) / CONFIG_FILE).read_text())


def load_trained_parts(model: VisionLanguageModel, path: Path) -> list[str]:
    """Load the parts a checkpoint saved into `model` (strict per part). A model carrying LoRA adapters
    (resuming a LoRA run) gets the checkpoint's adapters; one without gets the merged LLM weights."""
    parts = read_state(path)["parts"]
    for part in parts:
        if part == "llm" and has_lora(model.llm):
            lora_path = Path(path) / LORA_FILE
            if not lora_path.exists():
                raise ValueError(f"{path}: the model has LoRA adapters but this checkpoint saved none "
                                 f"(no {LORA_FILE}); load it into a model without adapters")
            load_lora_state_dict(model.llm, load_file(str(lora_path)))
            continue
        load_safetensors(getattr(model, part), str(Path(path) / f"{part}.safetensors"), strict=True)
    return parts


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint with the highest step in output_dir (`checkpoint-<step>` or `final`)."""
    output_dir = Path(output_dir)
    if not output_dir.exists():
        return None
    found = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and (p / STATE_FILE).exists()]
    if not found:
        return None
    return max(found, key=lambda p: read_state(p)["step"])


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's output folder (-> its latest checkpoint)."""
    path = Path(path)
    if (path / CONFIG_FILE).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: not an lmmkit checkpoint (no {CONFIG_FILE}) nor a run folder holding one")
    return latest


def checkpoint_chain(path: str | Path) -> tuple[list[Path], list[dict]]:
    """The checkpoint and every checkpoint it was initialised from (newest first), with their configs."""
    chain = [resolve_checkpoint(path)]
    configs = [read_config(chain[0])]
    while init_from := configs[-1]["train"].get("init_from"):
        chain.append(resolve_checkpoint(init_from))
        configs.append(read_config(chain[-1]))
    return chain, configs


def load_model(path: str | Path) -> VisionLanguageModel:
    """Rebuild a trained model from a checkpoint (or run) folder, following its init_from chain."""
    from lmmkit.models.build import bridge_kwargs, build_vlm

    chain, configs = checkpoint_chain(path)
    m = configs[0]["model"]
    # Configs saved before the resampler / pixel-shuffle keys existed lack them: build_vlm's defaults
    # then give the plain MLP bridge those checkpoints hold.
    model = build_vlm(m["llm"], m["vision"], m["vision_select_layer"], m["vision_drop_cls"], m["bridge_layers"],
                      **bridge_kwargs(m))
    for ckpt in reversed(chain):
        load_trained_parts(model, ckpt)
    model.eval()
    return model
