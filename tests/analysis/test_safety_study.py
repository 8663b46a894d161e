"""`lmmkit safety-study`: the before/after comparison and a toy-size run."""

from __future__ import annotations

import json

import pytest

from lmmkit.analysis.safety_study import SafetyStudySettings, compare_attacks, markdown_table, run_study
from lmmkit.data.shapes.attacks import FAMILIES


def _records(flags: list[bool], family: str = "privacy") -> list[dict]:
    return [{"id": f"{family}/{i}", "family": family, "role": "attack", "response": "x", "success": f}
            for i, f in enumerate(flags)]


def test_compare_attacks_pairs_items_by_id():
    a = {"items": _records([True] * 8 + [False] * 2)}
    b = {"items": _records([False] * 8 + [True, False]) + [{"id": "privacy/x", "family": "privacy",
                                                           "role": "attack", "response": None, "success": False}]}
    eff = compare_attacks(a, b)["privacy"]
    assert eff["n_paired"] == 10 and eff["a"] == 0.8 and eff["b"] == 0.1
    assert eff["difference"] == pytest.approx(-0.7) and eff["high"] < 0
    assert eff["mcnemar"] == {"b_only": 1, "a_only": 8, "p_value": pytest.approx(0.0390625)}


def test_markdown_table_reports_every_attack_and_the_tradeoff():
    fam = {"aspect": "privacy", "asr": 0.9, "asr_ci": [0.8, 0.95], "control_metric": "over-refusal",
           "control_rate": 0.0, "control_ci": [0.0, 0.04]}
    run = {"attacks": {"families": {f: dict(fam) for f in FAMILIES}}, "pope_f1_mean": 0.93,
           "pope_ci": {"low": 0.92, "high": 0.94}, "lm_loss": 0.2671}
    study = {"runs": {"baseline": run, "safety": {**run, "lm_loss": 0.2702}},
             "attack_effect": {f: {"difference": -0.5, "low": -0.6, "high": -0.4, "p_value": 1e-9} for f in FAMILIES},
             "pope_effect": {"difference": -0.004, "low": -0.01, "high": 0.002, "p_value": 0.2, "test": "McNemar"}}
    table = markdown_table(study)
    assert all(f.replace("_", " ") in table for f in FAMILIES)
    assert "0.90 [0.80, 0.95]" in table and "-0.50 [-0.60, -0.40]" in table and "1e-09" in table
    assert "0.930 [0.920, 0.940]" in table and "| 0.2671 | 0.2702 | +0.0031 |" in table


def test_toy_study_writes_both_runs(tmp_path, one_torch_thread):
    s = SafetyStudySettings(out=tmp_path / "study", n_train=40, n_test=30, n_pope_images=4, n_attack=2,
                            safety_share=0.25, align_steps=1, sft_steps=2, batch_size=4)
    study = run_study(s)
    assert set(study["runs"]) == {"baseline", "safety"}
    assert study["runs"]["safety"]["sft_samples"] == study["runs"]["baseline"]["sft_samples"] + 10
    assert study["safety_data"]["per_family"] == dict.fromkeys(FAMILIES, 2)
    for run in study["runs"].values():
        assert set(run["attacks"]["families"]) == set(FAMILIES) and not run["failures"]
        assert 0 <= run["pope_f1_mean"] <= 1 and run["lm_loss"] > 0
    assert set(study["attack_effect"]) <= set(FAMILIES) and "difference" in study["pope_effect"]
    saved = json.loads((tmp_path / "study" / "safety_study.json").read_text())
    assert saved["settings"]["timings"]["total"] > 0
    assert (tmp_path / "study" / "safety_study.md").read_text().startswith("| attack (aspect) |")
    with pytest.raises(ValueError, match="safety_share"):
        run_study(SafetyStudySettings(out=tmp_path / "bad", safety_share=2.0))
