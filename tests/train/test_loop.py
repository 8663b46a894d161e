"""run_stage on a tiny model: loss goes down, resume is exact, checkpoints round-trip, data order."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmmkit.config import Config, ModelSpec, TrainSpec, config_to_dict
from lmmkit.models.build import build_vlm
from lmmkit.train.batches import batch_order
from lmmkit.train.checkpoint import (
    CONFIG_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    latest_checkpoint,
    load_model,
    read_config,
    read_state,
)
from lmmkit.train.features import FeatureCache
from lmmkit.train.loop import make_batch, run_stage

FP32 = {"precision": "fp32", "progress": False, "log_every": 1}


def _config(llm, vision, **train) -> dict:
    return config_to_dict(Config(model=ModelSpec(llm=str(llm), vision=str(vision), vision_select_layer=-2),
                                 train=TrainSpec(**train)))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_few_steps_lower_the_loss(clip_vlm, encoded_samples, tiny_llama_dir, tiny_clip_dir, tmp_path):
    torch.manual_seed(0)
    result = run_stage(clip_vlm, encoded_samples, stage="sft", output_dir=tmp_path / "out",
                       config=_config(tiny_llama_dir, tiny_clip_dir, stage="sft"), batch_size=4, lr=1e-2,
                       max_steps=30, warmup_ratio=0.1, seed=0, **FP32)
    losses = [loss for _, loss in result.losses]
    assert result.steps == 30 and len(losses) == 30
    assert [s for s, _ in result.losses] == list(range(1, 31))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 4.0  # ~ln(vocab): the random model knows nothing
    assert last < 1.5 and last < 0.3 * first, f"loss went from {first:.3f} to {last:.3f}"
    assert result.final_loss == losses[-1]
    # metrics.jsonl has one line per step (log_every=1) with the same losses.
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31))
    assert lines[-1]["loss"] == pytest.approx(losses[-1], abs=1e-4)
    # The time spent building batches is measured: a share of the stage, growing with the steps.
    shares = [x["data_share"] for x in lines]
    assert 0 < shares[-1] < 1 and 0 < result.data_seconds < result.seconds
    assert result.data_share == pytest.approx(result.data_seconds / result.seconds)


def test_resume_continues_exactly(tiny_llama_dir, tiny_clip_dir, encoded_samples, tmp_path):
    """Kill after the step-3 checkpoint, resume in a fresh model: the final weights are run 1's."""
    kwargs = dict(stage="sft", config=_config(tiny_llama_dir, tiny_clip_dir, stage="sft"), batch_size=2,
                  grad_accum=2, lr=2e-3, max_steps=6, warmup_ratio=0.2, seed=3, save_every=3, **FP32)
    # 8 samples / batch 2 = 4 batches per epoch; 6 steps x 2 micro-batches cross two epoch boundaries.
    model1 = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2)
    run1 = run_stage(model1, encoded_samples, output_dir=tmp_path / "run1", **kwargs)
    assert sorted(p.name for p in (tmp_path / "run1").iterdir() if p.is_dir()) == ["checkpoint-3", "checkpoint-6"]
    assert read_state(tmp_path / "run1" / "checkpoint-3")["step"] == 3

    (tmp_path / "run2").mkdir()
    shutil.copytree(tmp_path / "run1" / "checkpoint-3", tmp_path / "run2" / "checkpoint-3")
    model2 = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2)
    run2 = run_stage(model2, encoded_samples, output_dir=tmp_path / "run2", resume=True, **kwargs)

    assert [s for s, _ in run2.losses] == [4, 5, 6]
    for (s1, l1), (s2, l2) in zip(run1.losses[3:], run2.losses, strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-6, abs=1e-7)
    final1, final2 = _state(model1), _state(model2)
    assert final1.keys() == final2.keys()
    for name in final1:
        torch.testing.assert_close(final2[name], final1[name], rtol=1e-6, atol=1e-7, msg=name)
    assert latest_checkpoint(tmp_path / "run2").name == "checkpoint-6"
    # The resumed run trained for real: its weights moved away from the step-3 checkpoint.
    model3 = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2)
    from lmmkit.train.checkpoint import load_trained_parts

    load_trained_parts(model3, tmp_path / "run1" / "checkpoint-3")
    assert not torch.allclose(model3.bridge.net[0].weight, model2.bridge.net[0].weight)


def test_latest_checkpoint_ignores_half_written_folders(tmp_path):
    for name, step in (("checkpoint-2", 2), ("checkpoint-10", 10), (".checkpoint-12.tmp", 12)):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_text(json.dumps({"step": step, "parts": ["bridge"]}))
    (tmp_path / "checkpoint-14").mkdir()  # no trainer state: never finished
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"  # by step, not by name
    assert latest_checkpoint(tmp_path / "missing") is None


def test_resume_without_a_checkpoint_starts_from_scratch(clip_vlm, encoded_samples, tiny_llama_dir,
                                                           tiny_clip_dir, tmp_path):
    result = run_stage(clip_vlm, encoded_samples, stage="align", output_dir=tmp_path / "out", batch_size=4,
                       config=_config(tiny_llama_dir, tiny_clip_dir, stage="align"), max_steps=2, resume=True,
                       **FP32)
    assert [s for s, _ in result.losses] == [1, 2]


@pytest.mark.parametrize(("stage", "parts"), [("align", {"bridge"}), ("sft", {"bridge", "llm"})])
def test_checkpoint_holds_the_trained_parts_and_reloads(clip_vlm, encoded_samples, tiny_llama_dir, tiny_clip_dir,
                                                        tmp_path, stage, parts):
    model = clip_vlm
    config = _config(tiny_llama_dir, tiny_clip_dir, stage=stage)
    result = run_stage(model, encoded_samples, stage=stage, output_dir=tmp_path / "out", config=config,
                       batch_size=4, lr=1e-2, max_steps=3, **FP32)
    ckpt = result.checkpoint
    assert ckpt == tmp_path / "out" / "checkpoint-3"
    files = {p.name for p in ckpt.iterdir()}
    assert {f for f in files if f.endswith(".safetensors")} == {f"{p}.safetensors" for p in parts}
    assert {CONFIG_FILE, STATE_FILE, OPTIMIZER_FILE} <= files
    assert read_config(ckpt) == config
    assert set(read_state(ckpt)["parts"]) == parts
    # Written atomically: no temporary or old folders are left beside it.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-3", "metrics.jsonl"]

    # The trained weights really are in the checkpoint: the rebuilt model gives the same logits,
    # and a freshly built (untrained) model does not.
    reloaded = load_model(ckpt)
    model.eval()
    batch = make_batch(model, encoded_samples[:3], None, model.tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        untrained = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2)
        assert not torch.allclose(untrained(**batch).logits, expected, atol=1e-3)
    assert not reloaded.training


def test_batch_order_is_a_function_of_seed_and_epoch():
    n, bs = 70, 4
    lengths = [(i * 37) % 101 for i in range(n)]
    a = batch_order(n, bs, seed=5, epoch=2, lengths=lengths, group=4)
    assert a == batch_order(n, bs, seed=5, epoch=2, lengths=lengths, group=4)
    assert a != batch_order(n, bs, seed=5, epoch=3, lengths=lengths, group=4)
    assert a != batch_order(n, bs, seed=6, epoch=2, lengths=lengths, group=4)
    for epoch in range(4):
        batches = batch_order(n, bs, seed=5, epoch=epoch, lengths=lengths, group=4)
        flat = [i for b in batches for i in b]
        assert all(len(b) == bs for b in batches)  # only full batches
        assert len(flat) == len(set(flat))  # every sample at most once per epoch
        assert set(flat) <= set(range(n))
        assert len(batches) == n // bs  # only the one partial batch is dropped


def test_batch_order_covers_everything_and_groups_by_length():
    n, bs = 64, 4
    lengths = list(range(100, 100 + n))  # distinct
    batches = batch_order(n, bs, seed=0, epoch=0, lengths=lengths, group=16)  # one group: the whole epoch
    assert sorted(i for b in batches for i in b) == list(range(n))
    # Sorted by length within the group: batches hold disjoint length ranges (little padding).
    ranges = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    assert all(hi < next_lo for (_, hi), (next_lo, _) in zip(ranges, ranges[1:], strict=False))
    # ...but the batches themselves are shuffled, not served shortest first.
    firsts = [min(lengths[i] for i in b) for b in batches]
    assert firsts != sorted(firsts)


def test_cached_features_refuse_a_stage_that_trains_the_tower(clip_vlm, encoded_samples, tiny_llama_dir,
                                                              tiny_clip_dir, tmp_path):
    config = _config(tiny_llama_dir, tiny_clip_dir, stage="full", cache_vision_features=False)
    for stage, tower in (("full", False), ("sft", True)):
        with pytest.raises(ValueError, match="frozen tower"):
            run_stage(clip_vlm, encoded_samples, stage=stage, train_vision_tower=tower, output_dir=tmp_path / stage,
                      config=config, batch_size=4, max_steps=1, cache=FeatureCache(), **FP32)
        assert not (tmp_path / stage / "checkpoint-1").exists()


def test_cached_features_train_like_pixels_with_a_frozen_tower(clip_vlm, encoded_samples, tiny_llama_dir,
                                                               tiny_clip_dir, tmp_path):
    """align with a cache: the tower is never run during training, and the loss is the uncached one."""
    cache = FeatureCache()
    cache.fill(clip_vlm, [im for s in encoded_samples for im in s.images], autocast=False)
    assert len(cache) == 8
    batch = make_batch(clip_vlm, encoded_samples[:4], cache, clip_vlm.tokenizer.pad_token_id)
    pixels = make_batch(clip_vlm, encoded_samples[:4], None, clip_vlm.tokenizer.pad_token_id)
    clip_vlm.eval()
    with torch.no_grad():
        # The cache stores bf16, so the two agree to bf16 precision only.
        assert clip_vlm(**batch).loss.item() == pytest.approx(clip_vlm(**pixels).loss.item(), rel=1e-2)
    calls = []
    clip_vlm.vision.register_forward_hook(lambda *_: calls.append(1))
    run_stage(clip_vlm, encoded_samples, stage="align", output_dir=tmp_path / "out", batch_size=4, lr=1e-2,
              config=_config(tiny_llama_dir, tiny_clip_dir, stage="align"), max_steps=3, cache=cache, **FP32)
    assert calls == []


def test_target_loss_scores_logits_only_where_there_is_a_target(clip_vlm, encoded_samples, monkeypatch):
    """target_loss (the packed objective's) equals the LLM's own (value and gradients) while the LM head sees
    only the positions that predict a labelled token."""
    from lmmkit.train.loop import target_loss

    model = clip_vlm.eval()
    batch = make_batch(model, encoded_samples, None, model.tokenizer.pad_token_id)
    expected = model(**batch).loss
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    rows_seen = []
    model.llm.lm_head.register_forward_hook(lambda _m, args, _out: rows_seen.append(args[0].shape[1]))
    loss = target_loss(model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-7, msg=name)
    targets = (batch["labels"][:, 1:] != -100).any(0)
    assert rows_seen == [int(targets.sum())] and rows_seen[0] < batch["input_ids"].shape[1] // 2
    # An LLM without logits_to_keep gets its own loss, unchanged.
    original = type(model.llm).forward
    monkeypatch.setattr(type(model.llm), "forward", lambda self, inputs_embeds=None, **kw: original(
        self, inputs_embeds=inputs_embeds, **kw))
    rows_seen.clear()
    with torch.no_grad():
        assert target_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-6)
    assert rows_seen == [batch["input_ids"].shape[1]]
