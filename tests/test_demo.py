"""End to end: the demo pipeline on the shipped parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmmkit.demo import DemoSettings, run_demo
from lmmkit.train.checkpoint import checkpoint_chain, load_model


def test_demo_small_writes_report_and_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A minutes-scale demo shrunk to seconds: every artefact is written and well formed. Its output folder
    is given relative to the working directory, as `make demo` does, and the SFT checkpoint loads from
    another one (its init_from chain holds absolute paths)."""
    monkeypatch.chdir(tmp_path)
    s = DemoSettings(out=Path("demo"), n_train=128, n_test=24, n_pope_images=8, align_steps=2, sft_steps=3,
                     batch_size=16, threads=1)
    results = run_demo(s)
    saved = json.loads((tmp_path / "demo" / "report" / "results.json").read_text())
    assert saved["pope"].keys() == {"model", "blind control (blank image)", "no image", "after align only"}
    for condition in saved["pope"].values():
        for split in ("random", "popular", "adversarial"):
            assert condition[split]["strict"]["n"] == 8 * 6
    # intervals bracket the estimates; SFT's effect on each POPE split has a paired test
    for parser, metrics in saved["pope_intervals"].items():
        for name, ci in metrics.items():
            assert ci["low"] <= ci["estimate"] <= ci["high"], (parser, name)
    effects = saved["stage_effects"]["align -> sft"]
    assert {r["test"] for r in effects} == {"McNemar"} and all(0 <= r["p_value"] <= 1 for r in effects)
    assert set(saved["benchmarks"]) == {"mme", "mmmu", "mathvista"}
    page = (tmp_path / "demo" / "report" / "report.html").read_text()
    assert "<svg" in page and "What each stage changed" in page and "Benchmark twins" in page
    assert [x["name"] for x in results["stages"]] == ["align", "sft"]
    assert (tmp_path / "demo" / "sft" / "checkpoint-3" / "llm.safetensors").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    chain, _ = checkpoint_chain(tmp_path / "demo" / "sft")
    assert chain == [tmp_path / "demo" / "sft" / "checkpoint-3", tmp_path / "demo" / "align" / "checkpoint-2"]
    load_model(tmp_path / "demo" / "sft")
    assert len(results["sample"]["conversation"]) == 8


@pytest.mark.slow(minutes=8)  # the longest test: conftest starts it first
def test_demo_reads_the_image(tmp_path: Path) -> None:
    """The README's `make demo` reads the image: high POPE F1 on held-out images, a balanced
    yes-ratio, and a blind control (blank images) at chance accuracy. The foundation issue's
    targets are F1 >= 0.95 and yes-ratio in [0.45, 0.55]; measured here F1 0.973 / 0.967 / 0.962
    and yes-ratio 0.482 / 0.488 / 0.493 (docs/results.md; identical on one and two threads). The F1
    bound leaves 0.01 for another CPU's bf16 kernels taking another training trajectory."""
    # One thread: make test runs two workers on two cores (the demo scored the same with one and two threads, docs/results.md).
    results = run_demo(DemoSettings(out=tmp_path / "demo", threads=1))
    for split in ("random", "popular", "adversarial"):
        m = results["pope"]["model"][split]["strict"]
        assert m["f1"] >= 0.94, (split, m)
        assert 0.45 <= m["yes_ratio"] <= 0.55, (split, m)
        for control in ("blind control (blank image)", "no image"):
            blind = results["pope"][control][split]["strict"]
            assert abs(blind["accuracy"] - 0.5) <= 0.06, (control, split, blind)


def test_demo_from_scratch_builds_its_own_parts(tmp_path: Path) -> None:
    """`lmmkit demo --from-scratch`: both parts are pretrained first, then used (tiny budgets here)."""
    s = DemoSettings(out=tmp_path / "demo", n_train=64, n_test=12, n_pope_images=4, align_steps=1, sft_steps=1,
                     batch_size=16, threads=1, from_scratch=True, lm_pretrain_steps=2, vision_pretrain_steps=2)
    results = run_demo(s)
    parts = tmp_path / "demo" / "parts"
    assert (parts / "lm" / "model.safetensors").exists() and (parts / "lm" / "tokenizer.json").exists()
    assert (parts / "vision" / "model.safetensors").exists()
    assert results["parts"] == {"llm": str(parts / "lm"), "vision": str(parts / "vision"), "from_scratch": True}
    assert "pretrain lm" in results["timings"] and "pretrain vision" in results["timings"]
