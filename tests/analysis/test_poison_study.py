"""`lmmkit poison-study` end to end at a toy size, and its pieces."""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET

import pytest

from lmmkit.analysis.poison_cli import add_poison_study_parser
from lmmkit.analysis.poison_plot import study_svg
from lmmkit.analysis.poison_study import (
    PoisonStudySettings,
    caption_f1,
    caption_objects,
    markdown_table,
    run_study,
)


def test_caption_objects():
    assert caption_objects("Red circle, blue square.") == {"red circle", "blue square"}
    assert caption_objects("") == set()
    assert caption_f1(["red circle, red circle.", "blue star."], [{"red circle", "green ring"}, {"cyan star"}]) == 0.4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_poison_study_parser(parser.add_subparsers(dest="command"))
    return parser


@pytest.mark.parametrize("ratios", ["0,2", "a,b", ""])
def test_bad_ratios_are_refused(ratios, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["poison-study", "--ratios", ratios])
    assert "--ratios" in capsys.readouterr().err


def test_ratios_always_include_the_clean_run():
    args = _parser().parse_args(["poison-study", "--ratios", "0.2,0.05"])
    assert args.ratios == (0.0, 0.05, 0.2)


def test_bad_trigger_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="trigger"):
        run_study(PoisonStudySettings(out=tmp_path / "s", trigger="patch:plaid:8"))
    assert not (tmp_path / "s").exists()


def test_study_end_to_end_at_toy_size(tmp_path, one_torch_thread):
    s = PoisonStudySettings(out=tmp_path / "s", ratios=(0.0, 0.25), n_train=64, n_test=8, n_pope_images=4, n_eval=4,
                            align_steps=2, sft_steps=2, batch_size=16)
    study = run_study(s)
    runs = {(r["poisoned_stage"], r["ratio"]): r for r in study["runs"]}
    assert set(runs) == {("none", 0.0), ("align", 0.25), ("sft", 0.25)}
    assert runs["align", 0.25]["n_poisoned"] == runs["sft", 0.25]["n_poisoned"] == 16
    assert "after_align" in runs["align", 0.25] and "after_align" not in runs["sft", 0.25]  # SFT runs reuse the clean align
    for r in study["runs"]:
        final = r["after_sft"]
        assert 0 <= final["asr_caption"] <= 1 and 0 <= final["pope_f1_mean"] <= 1
        assert set(final["pope_f1"]) == {"random", "popular", "adversarial"}
    written = json.loads((tmp_path / "s" / "poison_study.json").read_text())
    assert written["clean_checkpoint"] == runs["none", 0.0]["sft_checkpoint"]
    assert (tmp_path / "s" / "poisoned" / "sft-0.25" / "poison_manifest.json").is_file()
    table = (tmp_path / "s" / "poison_study.md").read_text()
    assert table.count("\n") == 5 and "SFT conversations | 0.25 | 16" in table
    svg = ET.fromstring((tmp_path / "s" / "poison_study.svg").read_text())
    assert svg.tag.endswith("svg") and len(svg.findall(".//{http://www.w3.org/2000/svg}polyline")) == 6


def test_plot_and_table_from_a_written_study():
    def run(stage, p, asr):
        after = {"asr_caption": asr, "asr_question": asr / 2, "false_trigger": 0.0, "pope_f1_mean": 0.9,
                 "caption_f1": 0.5, "partial": 0.0}
        row = {"poisoned_stage": stage, "ratio": p, "n_poisoned": int(p * 100), "after_sft": after, "seconds": 1.0}
        if stage != "sft":
            row["after_align"] = dict(after)
        return row

    no_sft = run("align", 0.01, 0.0)
    del no_sft["after_sft"]  # a poisoned align not followed by SFT (--sft-after-align max)
    study = {"settings": {"trigger": "patch:checker:8@br"},
             "runs": [run("none", 0.0, 0.0), no_sft, run("align", 0.05, 0.0), run("sft", 0.05, 0.4),
                      run("sft", 0.2, 1.0)]}
    table = markdown_table(study)
    assert "| SFT conversations | 0.2 | 20 | - | - | 1.00 | 0.50 | 0.00 | 0.900 | 0.50 |" in table
    assert "| align captions | 0.01 | 1 | 0.00 | 0.50 | - | - | - | - | - |" in table
    svg = study_svg(study)
    assert svg.count("<polyline") == 6 and "ASR, caption prompt (SFT poisoned)" in svg
