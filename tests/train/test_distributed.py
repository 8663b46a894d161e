"""`accelerate launch` runs the unchanged training entry point on several processes, and two processes
train exactly what one process trains on the same global batch.

This file is also the worker of the equivalence test: `accelerate launch ... test_distributed.py ARGS`
runs `_train_tiny` on every process (see the bottom)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_helpers import cpu_env, launch_cmd
from safetensors.torch import load_file

from lmmkit.data.shapes.generate import generate_shapes

ROOT = Path(__file__).parents[2]
# The equivalence run: sft (bridge + LLM) of the shipped parts, 2 micro-batches of 4 per step (global), fp32.
STEPS, GLOBAL_BATCH, GRAD_ACCUM, SEED = 4, 4, 2, 0


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path: Path) -> None:
    data = generate_shapes(tmp_path / "data", seed=1, n_train=64, n_test=8, n_pope_images=2, workers=1,
                           progress=False)
    out = tmp_path / "run"
    cmd = launch_cmd(2, "-m", "lmmkit.cli", "train", "--config", str(ROOT / "configs" / "demo.yaml"),
                  "train.stage=align", "train.max_steps=3", "train.batch_size=8", f"train.output_dir={out}",
                  f"data.train={data.train_captions}", f"data.image_folder={data.image_folder}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoint-3" / "bridge.safetensors").exists()
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["parts"] == ["bridge"]
    # Only the main process writes metrics: one line per logged step, not two.
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [3]


def _train_tiny(data: Path, images: Path, out: Path, batch_size: int) -> None:
    """sft on the shipped parts in fp32, as every process of a launch (or one plain process) runs it; the
    main process writes the per-step losses (full precision) to out/losses.json, and what became of the
    LLM's first decoder-layer weight (a DTensor shard under FSDP) to out/params.json."""
    from lmmkit.models.build import build_vlm
    from lmmkit.train.features import FeatureCache
    from lmmkit.train.loop import run_stage
    from lmmkit.train.run import load_samples

    torch.set_num_threads(1)
    model = build_vlm("shipped:lm", "shipped:vision", seed=SEED)
    model.train()
    samples, _ = load_samples(model, data, images, max_length=512, policy="stop")
    cache = FeatureCache()
    cache.fill(model, [im for s in samples for im in s.images])
    result = run_stage(model, samples, stage="sft", output_dir=out, config={"test": "distributed"},
                       batch_size=batch_size, grad_accum=GRAD_ACCUM, lr=2e-3, max_steps=STEPS, warmup_ratio=0.0,
                       max_grad_norm=1.0, precision="fp32", seed=SEED, log_every=1, cache=cache, progress=False)
    if result.checkpoint is not None:  # the main process
        (out / "losses.json").write_text(json.dumps(result.losses))
        weight = model.llm.model.layers[0].mlp.up_proj.weight
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        (out / "params.json").write_text(json.dumps({"type": type(weight.data).__name__, "numel": weight.numel(),
                                                     "local_numel": local.numel()}))


def _force_fsdp_on_cpu() -> None:
    """accelerate 1.15 turns FSDP on for GPU-like devices only: on CPU ranks (MULTI_CPU) it ignores the plugin
    and trains with DDP. This flips that one switch after the Accelerator is built, so run_stage's FSDP path
    (accelerate's FSDP2 prepare: fully_shard over gloo, DTensor shards, gathered checkpoint) runs on CPU."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType

    import lmmkit.train.loop as loop

    class CPUFSDPAccelerator(Accelerator):
        def __init__(self, *args, fsdp_plugin=None, **kwargs) -> None:
            super().__init__(*args, fsdp_plugin=fsdp_plugin, **kwargs)
            if fsdp_plugin is not None:
                # Both states: every AcceleratorState() copies the PartialState's fields again.
                PartialState().distributed_type = DistributedType.FSDP
                self.state.distributed_type = DistributedType.FSDP
                self.state.fsdp_plugin = fsdp_plugin

    loop.Accelerator = CPUFSDPAccelerator  # type: ignore[misc]


def _rank_units(data: Path, images: Path) -> list[list[int]]:
    """Labelled targets of rank 0 and rank 1 in each micro-batch of the run (the order run_stage uses)."""
    from lmmkit.data.collate import pad_batch
    from lmmkit.models.build import build_vlm
    from lmmkit.train.batches import batch_order
    from lmmkit.train.loop import labelled_targets
    from lmmkit.train.run import load_samples

    model = build_vlm("shipped:lm", "shipped:vision", seed=SEED)
    samples, _ = load_samples(model, data, images, max_length=512, policy="stop")
    order = batch_order(len(samples), GLOBAL_BATCH, SEED, 0, [len(s.input_ids) for s in samples])
    return [[labelled_targets(pad_batch([(samples[i].input_ids, samples[i].labels) for i in ids[r::2]], 0))
             for r in (0, 1)] for ids in order[:STEPS * GRAD_ACCUM]]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[list[str], Path]:
    """The data, and the single-process reference run on it (its own process, as the launched ones are)."""
    root = tmp_path_factory.mktemp("equivalence")
    ds = generate_shapes(root / "data", seed=1, n_train=STEPS * GRAD_ACCUM * GLOBAL_BATCH, n_test=8,
                         n_pope_images=2, workers=1, progress=False)
    data = [str(ds.train_conversations), str(ds.image_folder)]
    units = _rank_units(*map(Path, data))
    # The case DDP's plain average gets wrong: a mean over each rank's tokens, unequal counts.
    assert all(a != b for a, b in units), units
    proc = subprocess.run([sys.executable, str(Path(__file__)), *data, str(root / "one"), str(GLOBAL_BATCH)],
                          capture_output=True, text=True, timeout=300, env=cpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, root / "one"


def _launch_two(data: list[str], out: Path, *mode: str, env: dict[str, str] | None = None) -> float:
    start = time.time()
    args = [str(Path(__file__)), *data, str(out), str(GLOBAL_BATCH // 2), *mode]
    proc = subprocess.run(launch_cmd(2, *args), capture_output=True, text=True, timeout=300, env=env or cpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.time() - start


def _compare(one: Path, two: Path, label: str, launched: float) -> None:
    """Per-step losses within 1e-5 relative, trained weights within 5e-5 absolute."""
    losses1 = json.loads((one / "losses.json").read_text())
    losses2 = json.loads((two / "losses.json").read_text())
    assert [s for s, _ in losses2] == [s for s, _ in losses1] == list(range(1, STEPS + 1))
    rel = max(abs(a - b) / abs(a) for (_, a), (_, b) in zip(losses1, losses2, strict=True))
    weights1, weights2 = _trained_weights(one), _trained_weights(two)
    assert weights1.keys() == weights2.keys()
    worst = max(float((weights1[k] - weights2[k]).abs().max()) for k in weights1)
    print(f"\nlosses, 1 process:    {[round(x, 6) for _, x in losses1]}\nlosses, 2 processes ({label}): "
          f"{[round(x, 6) for _, x in losses2]}\nlargest relative loss difference {rel:.2e}, largest weight "
          f"difference {worst:.2e}; the 2-process launch took {launched:.1f}s")
    assert rel < 1e-5, (losses1, losses2)
    # Adam moves a weight by up to ~lr per step (here 4 x 2e-3 in all); fp32 summation-order noise, amplified
    # where a gradient is near zero, moves it by ~1e-5 (measured); unweighted ranks move weights by ~1e-2.
    for name in weights1:
        torch.testing.assert_close(weights2[name], weights1[name], rtol=0, atol=5e-5, msg=name)


def _trained_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = run / f"checkpoint-{STEPS}"
    return {f"{part}.{k}": v for part in ("bridge", "llm") for k, v in load_file(ckpt / f"{part}.safetensors").items()}


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(one_process, tmp_path: Path) -> None:
    """DDP on 2 gloo ranks vs one process, same global batches: per-step losses and trained weights agree in
    fp32, although the two ranks hold different numbers of labelled tokens in every micro-batch."""
    data, one = one_process
    launched = _launch_two(data, tmp_path / "two")
    _compare(one, tmp_path / "two", "DDP", launched)
    assert json.loads((tmp_path / "two" / "params.json").read_text())["type"] == "Tensor"


@pytest.mark.slow
def test_fsdp_two_processes_train_what_one_process_trains(one_process, tmp_path: Path) -> None:
    """The same with FSDP2 (one unit per decoder layer and vision stage, from fsdp_wrap_classes): the weights
    really are sharded over the 2 ranks, and the gathered checkpoint equals the single-process one."""
    data, one = one_process
    env = {**cpu_env(), "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    launched = _launch_two(data, tmp_path / "fsdp", "fsdp", env=env)
    _compare(one, tmp_path / "fsdp", "FSDP2", launched)
    params = json.loads((tmp_path / "fsdp" / "params.json").read_text())
    assert params["type"] == "DTensor" and params["local_numel"] * 2 == params["numel"], params
    # FSDP checkpoints hold the gathered weights, not the sharded optimizer state.
    assert not (tmp_path / "fsdp" / f"checkpoint-{STEPS}" / "optimizer.pt").exists()


def test_fsdp_wraps_each_decoder_layer_and_vision_block(tiny_llama_dir, tiny_clip_dir, tiny_siglip_dir) -> None:
    from lmmkit.models.build import build_vlm
    from lmmkit.train.distributed import fsdp_wrap_classes

    shipped = build_vlm("shipped:lm", "shipped:vision")
    assert fsdp_wrap_classes(shipped) == [type(shipped.llm.model.layers[0]).__name__, "ResNetStage"]
    assert fsdp_wrap_classes(shipped) == ["LlamaDecoderLayer", "ResNetStage"]
    clip = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), vision_select_layer=-2)
    assert fsdp_wrap_classes(clip) == ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    assert fsdp_wrap_classes(build_vlm(str(tiny_llama_dir), str(tiny_siglip_dir))) == ["LlamaDecoderLayer",
                                                                                      "SiglipEncoderLayer"]
    # Fused towers: every tower's block; the encoder-free Fuyu tower has none.
    fused = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), vision_extra=str(tiny_siglip_dir))
    assert fsdp_wrap_classes(fused) == ["LlamaDecoderLayer", "CLIPEncoderLayer", "SiglipEncoderLayer"]
    assert fsdp_wrap_classes(build_vlm("shipped:lm", "patch", bridge="fuyu")) == ["LlamaDecoderLayer"]


def test_fsdp_plugin_follows_the_launch_config(monkeypatch) -> None:
    from lmmkit.models.build import build_vlm
    from lmmkit.train.distributed import fsdp_plugin

    model = build_vlm("shipped:lm", "shipped:vision")
    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_AUTO_WRAP_POLICY", "FSDP_TRANSFORMER_CLS_TO_WRAP"):
        monkeypatch.delenv(key, raising=False)
    assert fsdp_plugin(model) is None  # not an FSDP launch: plain DDP / one process
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        fsdp_plugin(model)
    monkeypatch.setenv("FSDP_VERSION", "2")
    plugin = fsdp_plugin(model)
    assert plugin is not None and plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer", "ResNetStage"]
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")  # the config's own choice wins
    assert fsdp_plugin(model).transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]


if __name__ == "__main__":  # the equivalence tests' worker: DATA IMAGES OUT PER_RANK_BATCH [fsdp]
    if sys.argv[5:] == ["fsdp"]:
        _force_fsdp_on_cpu()
    _train_tiny(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    from lmmkit.train.distributed import end_distributed

    end_distributed()
