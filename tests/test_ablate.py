"""`lmmkit ablate` on tiny ShapesWorld data: files, equal budgets, token accounting, resume, errors.

One module-scoped run trains four designs (align 2 + SFT 4 steps, batch 8) on 32 training images and
scores them on 8 held-out POPE images; the other tests read it, extend it, or fail before it starts.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmmkit.ablate as ablate
from lmmkit.ablate import AblateSettings, AblationError, parse_designs, run_ablation
from lmmkit.ablate_cli import add_ablate_parser

DESIGNS = ("mlp", "resampler", "cross-attention", "fuyu")
# Visual tokens each image costs in the LLM's sequence on the shipped parts (8x8 ResNet grid, 64x64 images).
TOKENS = {"mlp": 64, "resampler": 32, "cross-attention": 1, "fuyu": 8 * 9, "pixel-shuffle": 16}
TINY = {"n_train": 32, "n_test": 8, "n_pope_images": 8, "align_steps": 2, "sft_steps": 4, "batch_size": 8,
        "probes": 2, "probe_questions": 12, "workers": 1, "progress": False}


def _reset_accelerate() -> None:
    # accelerate keeps one process-wide state; other tests may have left one with another precision.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[AblateSettings, dict]:
    out = tmp_path_factory.mktemp("ablate")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one_torch_thread, for a module-scoped fixture
    _reset_accelerate()
    try:
        s = AblateSettings(designs=DESIGNS, out=out, **TINY)
        return s, run_ablation(s)
    finally:
        torch.set_num_threads(threads)
        _reset_accelerate()


@pytest.fixture(autouse=True)
def _clean_accelerate(one_torch_thread):
    _reset_accelerate()
    yield
    _reset_accelerate()


def test_writes_json_markdown_plot_and_page(first_run):
    s, summary = first_run
    saved = json.loads((s.out / "ablation.json").read_text())
    assert list(saved["designs"]) == list(DESIGNS) and saved["designs_run_now"] == list(DESIGNS)
    for name, r in saved["designs"].items():
        pope = r["pope"]
        for split in ("random", "popular", "adversarial"):
            assert pope[split]["n"] == 8 * 6 and 0 <= pope[split]["f1"] <= 1 and 0 <= pope[split]["yes_ratio"] <= 1
        assert pope["mean_f1"] == pytest.approx(sum(pope[sp]["f1"] for sp in ("random", "popular", "adversarial")) / 3)
        assert r["lm_loss"]["loss"] > 0 and r["lm_loss"]["tokens"] > 0
        assert r["seconds"]["align"] > 0 and r["seconds"]["sft"] > 0 and r["seconds"]["eval pope"] > 0
        assert json.loads((s.out / "designs" / f"{name}.json").read_text()) == r
        assert (s.out / "runs" / name / "sft" / "checkpoint-4" / "llm.safetensors").is_file()
    table = (s.out / "ablation.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| design")]
    assert [row.split("|")[1].strip() for row in rows] == list(DESIGNS)
    mlp_row = rows[0].split("|")
    assert mlp_row[2].strip() == "64" and f"{saved['designs']['mlp']['pope']['random']['f1']:.3f}" in rows[0]
    svg = ET.fromstring((s.out / "ablation.svg").read_text())
    lines = [el for el in svg.iter() if el.tag.endswith("polyline")]
    assert sorted(el.find("{http://www.w3.org/2000/svg}title").text for el in lines) == sorted(DESIGNS)
    page = (s.out / "ablation.html").read_text()
    assert page.count("<svg") == 1 and "<table" in page and "cross-attention" in page


def test_every_design_gets_the_same_budget(first_run):
    _, summary = first_run
    results = summary["designs"].values()
    assert {(r["steps"]["align"], r["steps"]["sft"]) for r in results} == {(2, 4)}
    assert all(r["batch_size"] == [8] for r in results)  # measured per step, not copied from the settings
    assert len({json.dumps(r["lr"]) for r in results}) == 1
    # probes: after align (SFT step 0), halfway, and at the end; tokens grow along the curve
    for r in results:
        assert [p["sft_step"] for p in r["curve"]] == [0, 2, 4]
        tokens = [p["tokens"] for p in r["curve"]]
        assert tokens[0] == r["training_tokens"]["align"]["total"] and tokens[-1] == r["training_tokens"]["total"]
        assert tokens == sorted(tokens) and len(set(tokens)) == 3


def test_token_and_parameter_accounting(first_run):
    _, summary = first_run
    d = summary["designs"]
    for name, r in d.items():
        assert r["tokens_per_image"] == TOKENS[name], name
        # one image per caption / conversation: visual tokens = images seen x tokens per image
        for stage, steps in (("align", 2), ("sft", 4)):
            tok = r["training_tokens"][stage]
            assert tok["visual"] == steps * 8 * TOKENS[name], (name, stage)
            assert tok["visual"] < tok["total"] <= tok["padded"]
        p = r["params"]
        assert p["trainable_align"] == p["bridge"] > 0 and p["trainable_align"] < p["trainable_sft"] <= p["total"]
    # the same conversations cost more with more visual tokens per image
    assert d["fuyu"]["training_tokens"]["total"] > d["mlp"]["training_tokens"]["total"] > \
        d["resampler"]["training_tokens"]["total"] > d["cross-attention"]["training_tokens"]["total"]
    assert d["fuyu"]["params"]["trainable_sft"] == d["fuyu"]["params"]["total"]  # no tower weights to freeze
    assert d["mlp"]["params"]["total"] > d["mlp"]["params"]["trainable_sft"]  # the frozen ResNet
    assert d["cross-attention"]["image_features_per_image"] == 64  # what its gated blocks attend to


def test_rerun_skips_done_designs_and_redoes_changed_ones(first_run, monkeypatch, capsys):
    s, summary = first_run
    before = {n: (s.out / "designs" / f"{n}.json").read_text() for n in DESIGNS}
    trained: list[tuple[str, str]] = []
    real = ablate.run_stage

    def spy(model, samples, **kwargs):
        trained.append((kwargs["stage"], Path(kwargs["output_dir"]).parent.name))
        return real(model, samples, **kwargs)

    monkeypatch.setattr(ablate, "run_stage", spy)
    extended = AblateSettings(designs=(*DESIGNS, "pixel-shuffle"), out=s.out, **TINY)
    again = run_ablation(extended)
    assert trained == [("align", "pixel-shuffle"), ("sft", "pixel-shuffle")]
    printed = capsys.readouterr().out
    assert all(f"{n}: done in an earlier run with the same settings, skipped" in printed for n in DESIGNS)
    assert {n: (s.out / "designs" / f"{n}.json").read_text() for n in DESIGNS} == before
    assert list(again["designs"]) == [*DESIGNS, "pixel-shuffle"] and again["designs_run_now"] == ["pixel-shuffle"]
    assert again["designs"]["pixel-shuffle"]["tokens_per_image"] == 16
    assert json.loads((s.out / "ablation.json").read_text())["designs"].keys() == again["designs"].keys()

    # A different budget (here: no probes during SFT) is another experiment, so mlp is trained again; its
    # weights equal the first run's, so measuring POPE inside the SFT loop never changed what was trained.
    weights = s.out / "runs" / "mlp" / "sft" / "checkpoint-4" / "llm.safetensors"
    first = load_file(weights)
    trained.clear()
    changed = run_ablation(AblateSettings(designs=("mlp",), out=s.out, **{**TINY, "probes": 0}))
    assert trained == [("align", "mlp"), ("sft", "mlp")]
    assert [p["sft_step"] for p in changed["designs"]["mlp"]["curve"]] == [0, 4]
    retrained = load_file(weights)
    assert first.keys() == retrained.keys() and all(torch.equal(first[k], retrained[k]) for k in first)


def test_unknown_design_names_the_known_ones(tmp_path, capsys):
    with pytest.raises(AblationError, match="'perceiver'.*choose from: mlp, resampler, qformer, cross-attention, fuyu"):
        parse_designs("mlp,perceiver")
    with pytest.raises(AblationError, match="named twice"):
        parse_designs("mlp,mlp")
    parser = argparse.ArgumentParser()
    add_ablate_parser(parser.add_subparsers())
    args = parser.parse_args(["ablate", "--bridges", "mlp,flamingo", "--out", str(tmp_path / "x")])
    assert args.func(args) == 2
    assert "unknown design(s) 'flamingo'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_design_that_cannot_be_built_fails_first_and_is_named(tmp_path, monkeypatch):
    # 3 heads do not divide the shipped LM's width (128): make_bridge refuses it
    monkeypatch.setitem(ablate.DESIGNS, "odd-heads", {"bridge": "resampler", "bridge_heads": 3})
    s = AblateSettings(designs=("mlp", "odd-heads"), out=tmp_path / "out", **TINY)
    with pytest.raises(AblationError, match=r"design 'odd-heads' .* cannot be built: model.bridge_heads=3"):
        run_ablation(s)
    assert not (tmp_path / "out" / "data").exists()  # refused before any data was generated or training began
