"""Smoke runs of the benchmark scripts at their --quick size: they run end to end and check what they claim to
(same pixels, same input ids, same answers). No timing is asserted; the figures are in docs/performance.md."""

from __future__ import annotations

import importlib.util
import subprocess
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


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


def test_train_throughput_quick(work, capsys):
    results = _script("train_throughput").main(["--quick", "--work", str(work), "--json", str(work / "t.json")])
    for stage in ("sft", "align"):
        s = results["stages"][stage]
        assert s["same_input_ids"] == 1.0  # the HF processor builds exactly lmmkit's sequences
        assert s["hf"]["tokens_per_s"] > 0 and s["lmmkit"]["tokens_per_s"] > 0 and s["ratio"] > 0
        assert s["lmmkit"]["positions_per_step"] >= s["lmmkit"]["tokens_per_step"]
    assert "sft ratio lmmkit/hf" in capsys.readouterr().out and (work / "t.json").exists()


def test_eval_throughput_quick(work, capsys):
    results = _script("eval_throughput").main(["--quick", "--work", str(work)])
    assert results["questions"] == 12 and results["agreement"] == 1.0 and results["ratio"] > 0
    assert "answers identical" in capsys.readouterr().out


def test_preprocess_throughput_quick(work):
    results = _script("preprocess_throughput").main(["--quick", "--work", str(work)])
    assert results["same_pixels"] == {"anyres": True, "fixed 64px": True}
    assert results["views"] > 4  # AnyRes really tiled: more views than images
    assert results["anyres"]["ratio"] > 0


def test_packing_demo_quick(work):
    results = _script("packing_demo").main(["--quick", "--work", str(work)])
    for stage in ("align", "sft"):
        padding = results[stage]["padding"]
        # Packing never computes more positions than padding the same batch (pack_rows' guarantee).
        assert padding["packed"]["positions_per_step"] <= padding["padded"]["positions_per_step"] + 1e-9
        assert padding["packed"]["tokens_per_step"] == padding["padded"]["tokens_per_step"]


def test_each_script_is_one_command():
    for name in ("train_throughput", "eval_throughput", "preprocess_throughput", "packing_demo"):
        out = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), "--help"], capture_output=True,
                             text=True, check=True).stdout
        assert "--quick" in out and "--repeats" in out


def test_gpu_mfu_quick_counts_flops_and_padding(work, capsys):
    """On a CPU the quick run trains lmmkit's mask-packed step and HF's padded one at tiny shapes (the varlen side
    needs CUDA); the FLOP count follows the docstring's formula."""
    module = _script("gpu_mfu")
    results = module.main(["--quick", "--json", str(work / "mfu.json")])
    sides = results["sides"]
    assert set(sides) == {"lmmkit-mask", "hf"} and all("error" not in r for r in sides.values())
    for r in sides.values():
        assert r["tokens_per_s"] > 0 and all(loss == loss for loss in r["losses"])  # finite, not NaN
    assert sides["hf"]["tokens_per_step"] == sides["lmmkit-mask"]["tokens_per_step"]  # the same samples
    assert sides["hf"]["positions_per_step"] > sides["lmmkit-mask"]["positions_per_step"]  # HF pads
    shape = module.TINY
    sample = module.sample_stream(shape, 5, seed=0, count=1)[0]
    params = {"llm": 1000, "embed": 100, "bridge": 10, "vision": 7}
    flops, attention = module.model_flops(shape, params, [[sample]])
    n, targets, head = len(sample.input_ids), sum(t >= 0 for t in sample.labels[1:]), shape.hidden * shape.vocab
    assert flops == 6 * (1000 - 100 - head) * n + 6 * head * targets + 6 * 10 * 4 + 2 * 7 * 5
    assert attention == 6 * shape.layers * shape.hidden * n ** 2 + 4 * shape.vision_layers * shape.vision_hidden * 25
    assert "ratio lmmkit-mask/hf" in capsys.readouterr().out


# The data benchmarks (docs/data.md): lmmkit's pixels equal the processor's; memory is measured at each checkpoint.
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
