"""`lmmkit train` on a data mixture (data.mixture): streamed by worker processes, resumed exactly from a
checkpoint although the workers had read ahead of it, bad records skipped and counted, config errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from launch_helpers import cpu_env, launch_cmd
from PIL import Image
from safetensors.torch import load_file

from formats_helpers import encode, write_tar
from lmmkit.cli import main
from lmmkit.config import ConfigError, load_config
from lmmkit.train.checkpoint import read_state


def _write_mixture_data(root: Path, bad_jpeg: bool = False) -> str:
    """Caption shards (img2dataset layout) + LLaVA JSON conversations with image files: an inline mixture."""
    rng = np.random.default_rng(0)
    for s in range(3):
        members = []
        for i in range(8):
            key = f"{s:02d}{i:03d}"
            pixels = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
            data = b"\xff\xd8\xff broken" if bad_jpeg and (s, i) == (1, 3) else encode(Image.fromarray(pixels))
            members += [(f"{key}.jpg", data), (f"{key}.txt", f"a picture number {s * 8 + i}".encode())]
        write_tar(root / "shards" / f"{s:02d}.tar", members)
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(10):
        Image.new("RGB", (32, 32), (20 * i, 100, 200 - 10 * i)).save(root / "images" / f"{i}.png")
        records.append({"id": f"c{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"Colour {i}."}]})
    (root / "chat.json").write_text(json.dumps(records))
    return f"caps=0.5*wds:{root}/shards/{{00..02}}.tar#seed=1;chat=0.5*llava:{root}/chat.json@{root}/images"


def _config(path: Path, llm: Path, vision: Path, mixture: str, out: str, **train) -> Path:
    cfg = {"model": {"llm": str(llm), "vision": str(vision), "vision_select_layer": -2},
           "data": {"mixture": mixture, "workers": 2, "max_length": 96},
           "train": {"stage": "sft", "batch_size": 4, "max_steps": 6, "lr": 3e-3, "precision": "fp32", "seed": 5,
                     "log_every": 1, "output_dir": out, **train}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_mixture_training_resumes_exactly_although_workers_read_ahead(tiny_llama_dir, tiny_clip_dir, tmp_path,
                                                                      capsys):
    mixture = _write_mixture_data(tmp_path / "data")
    config = _config(tmp_path / "run.yaml", tiny_llama_dir, tiny_clip_dir, mixture, str(tmp_path / "run1"),
                     save_every=3)
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "mixture of 2 sources: caps (0.5), chat (0.5); seed 5, 2 workers" in out
    assert "mixture: 24 samples streamed in all; bad records skipped: none" in out
    run1 = tmp_path / "run1"
    state3 = read_state(run1 / "checkpoint-3")
    # 3 steps x 4 samples = 3 blocks handed out; the 2 workers had prefetched more, which the state ignores.
    assert state3["data"]["blocks"] == 3 and state3["data"]["format"] == "mixture"
    assert read_state(run1 / "checkpoint-6")["data"]["blocks"] == 6

    # A "killed" run: only checkpoint-3 survived. --resume continues with exactly the next samples.
    run2 = tmp_path / "run2"
    run2.mkdir()
    shutil.copytree(run1 / "checkpoint-3", run2 / "checkpoint-3")
    assert main(["train", "--config", str(config), f"train.output_dir={run2}", "--resume"]) == 0
    losses1, losses2 = _losses(run1), _losses(run2)
    assert len(losses1) == 6 and len(losses2) == 3
    assert losses2 == pytest.approx(losses1[3:], rel=1e-5)
    for part in ("bridge", "llm"):
        a, b = load_file(run1 / "checkpoint-6" / f"{part}.safetensors"), load_file(run2 / "checkpoint-6" /
                                                                                    f"{part}.safetensors")
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=f"{part}: {name}")

    # A fresh run from scratch with another seed draws other samples: the resume match above is not trivial.
    assert main(["train", "--config", str(config), f"train.output_dir={tmp_path / 'run3'}", "train.seed=6",
                 "train.save_every=0"]) == 0
    assert _losses(tmp_path / "run3") != pytest.approx(losses1, rel=1e-5)


def test_mixture_training_skips_and_counts_a_corrupt_jpeg(tiny_llama_dir, tiny_clip_dir, tmp_path, capsys, caplog):
    mixture = _write_mixture_data(tmp_path / "data", bad_jpeg=True)
    # Only the shards: 3 shards of 8, one broken; 8 steps x 4 = 32 samples > 23 good ones, so the bad one is met.
    shards_only = mixture.split(";")[0].replace("caps=0.5*", "caps=1*")
    config = _config(tmp_path / "run.yaml", tiny_llama_dir, tiny_clip_dir, shards_only, str(tmp_path / "run"),
                     max_steps=8, stage="align")
    # In this process (workers=0), so that caplog sees the skip warnings (workers log to their own stderr).
    assert main(["train", "--config", str(config), "data.workers=0"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "skipping bad record" in r.getMessage()]
    assert warnings and all("01.tar" in w and "01003" in w for w in warnings)  # naming the shard and the key
    # 32 samples from 23 good records: the second epoch may meet the broken one again, and counts it again.
    assert f"bad records skipped: {len(warnings)} corrupt image" in capsys.readouterr().out
    stop = _config(tmp_path / "stop.yaml", tiny_llama_dir, tiny_clip_dir, shards_only, str(tmp_path / "stop"),
                   max_steps=8, stage="align")
    assert main(["train", "--config", str(stop), "data.bad_records=stop"]) == 2  # raised in a worker
    err = capsys.readouterr().err
    assert "data error:" in err and "01.tar" in err and "01003" in err


def test_mixture_config_errors_say_what_to_change(tmp_path):
    mixture = "1*llava:chat.json@images"

    def problems(*overrides: str) -> str:
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"data.mixture={mixture}", *overrides])
        return str(e.value)

    assert "data.mixture and data.train are both set" in problems("data.train=x.json", "train.max_steps=5")
    assert "train.max_steps: a data mixture streams without end" in problems()
    assert "stage 'dpo' reads a preference file" in problems("train.stage=dpo", "train.max_steps=5")
    assert "train.cache_vision_features: true needs the whole image set" in problems(
        "train.max_steps=5", "train.cache_vision_features=true")
    cfg = load_config(None, [f"data.mixture={mixture}", "train.max_steps=5"])
    assert cfg.train.cache_vision_features is False  # the default turns off: a stream has no fixed image set
    # Relative paths in an inline mixture resolve against the working directory (overrides) or the YAML's folder.
    assert f"llava:{Path.cwd() / 'chat.json'}@{Path.cwd() / 'images'}" in cfg.data.mixture
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data": {"mixture": mixture}, "train": {"max_steps": 2}}))
    assert f"llava:{tmp_path / 'chat.json'}@{tmp_path / 'images'}" in load_config(tmp_path / "c.yaml").data.mixture


@pytest.mark.slow
def test_two_processes_stream_the_mixture_one_process_trains_on(tmp_path):
    """`accelerate launch` on 2 gloo ranks, each streaming the global batch and keeping its half: the same losses
    and weights as one process with the whole batch (fp32; the ranks' losses weighted by their labelled tokens)."""
    mixture = _write_mixture_data(tmp_path / "data")
    model = {"llm": "shipped:lm", "vision": "shipped:vision"}
    runs = {}
    for n, per_rank in ((1, 4), (2, 2)):
        out = tmp_path / f"n{n}"
        config = tmp_path / f"n{n}.yaml"
        config.write_text(yaml.safe_dump({
            "model": model, "data": {"mixture": mixture, "workers": 2, "max_length": 128},
            "train": {"stage": "sft", "batch_size": per_rank, "max_steps": 3, "lr": 2e-3, "warmup_ratio": 0.0,
                      "precision": "fp32", "seed": 1, "log_every": 1, "output_dir": str(out)}}))
        argv = ["-m", "lmmkit.cli", "train", "--config", str(config)]
        cmd = launch_cmd(n, *argv) if n > 1 else [sys.executable, *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cpu_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "mixture: 12 samples streamed in all" in proc.stdout
        runs[n] = out
    assert _losses(runs[2]) == pytest.approx(_losses(runs[1]), rel=1e-5)
    for part in ("bridge", "llm"):
        a, b = (load_file(runs[n] / "checkpoint-3" / f"{part}.safetensors") for n in (1, 2))
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=f"{part}: {name}")
