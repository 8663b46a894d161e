"""docs/smollm2_recipe.py, shrunk to seconds: the documented SmolLM2 recipe runs end to end on the real
fetched LLM (align, LoRA SFT, POPE with a blank control), and `--align-from` starts from its align stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmmkit.models.fetch import fetch_model
from lmmkit.train.checkpoint import checkpoint_chain

REPO = Path(__file__).resolve().parents[2]
TINY = ["--n-train", "16", "--n-test", "4", "--n-pope-images", "2", "--batch-size", "4", "--threads", "1"]


def _recipe(out: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(REPO / "docs" / "smollm2_recipe.py"), "--out", str(out), *TINY, *args],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_recipe_runs_and_resumes_from_its_align_stage(tmp_path: Path) -> None:
    fetch_model("smollm2-135m")  # the shared cache the fetch tests use: downloaded once per machine
    first = _recipe(tmp_path / "a", "--align-steps", "2", "--sft-steps", "2")
    assert [s["name"] for s in first["stages"]] == ["align", "sft"]
    assert [s["steps"] for s in first["stages"]] == [2, 2]
    for condition in ("model", "blind control (blank image)"):
        for split in ("random", "popular", "adversarial"):
            assert first["pope"][condition][split]["strict"]["n"] == 2 * 6
    assert "Paris" in first["text_answer"]["before"]  # the real LLM, before any training

    align = Path(first["stages"][0]["checkpoint"])
    second = _recipe(tmp_path / "b", "--align-from", str(align), "--sft-steps", "1")
    assert [s["name"] for s in second["stages"]] == ["sft"]
    chain, _ = checkpoint_chain(second["stages"][0]["checkpoint"])
    assert chain[1] == align  # the SFT checkpoint loads through the given align stage
