"""`accelerate launch` runs the unchanged training entry point on several processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmmkit.data.shapes.generate import generate_shapes


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path: Path) -> None:
    data = generate_shapes(tmp_path / "data", seed=1, n_train=64, n_test=8, n_pope_images=2, workers=1,
                           progress=False)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
           "-m", "lmmkit.cli", "train", "--config", str(Path(__file__).parents[2] / "configs" / "demo.yaml"),
           "train.stage=align", "train.max_steps=3", "train.batch_size=8", f"train.output_dir={out}",
           f"data.train={data.train_captions}", f"data.image_folder={data.image_folder}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoint-3" / "bridge.safetensors").exists()
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["parts"] == ["bridge"]
    # Only the main process writes metrics: one line per logged step, not two.
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [3]
