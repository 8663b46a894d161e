"""Smoke runs of the data benchmarks at their --quick size: they run end to end and check what they claim
(lmmkit's pixels equal the processor's; memory is measured at each checkpoint). No timing is asserted; the
figures are in docs/data.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def test_data_throughput_quick(tmp_path, capsys):
    results = _script("data_throughput").main(["--quick", "--work", str(tmp_path), "--json", str(tmp_path / "t.json")])
    assert results["same_pixels"] is True and results["checked"] >= 16
    assert results["counts"]["plain"] == 64 and results["counts"]["lmmkit"] == 64
    assert results["ratio"] > 0 and results["ratio_draft"] > 0 and results["draft_abs_diff"]["mean"] < 0.05
    assert "ratio lmmkit/plain" in capsys.readouterr().out and (tmp_path / "t.json").exists()


def test_data_memory_quick(tmp_path):
    results = _script("data_memory").main(["--quick", "--work", str(tmp_path)])
    assert [c["records"] for c in results["checkpoints"]] == [100, 1000, 4000]
    assert all(c["peak_rss_mib"] > 0 for c in results["checkpoints"])
    assert results["file_bytes"]["text-b.json"] > 1_000_000  # the JSON list really is streamed, not tiny
