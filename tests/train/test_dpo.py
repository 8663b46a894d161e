"""DPO: the losses' values and gradients, the reference model, shared image encoding, and a short
run on ShapesWorld pairs that raises the chosen answers' likelihood over the rejected ones."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from lmmkit.data.check import BadRecordCounter
from lmmkit.data.preference import encode_preferences
from lmmkit.data.shapes.preferences import preference_pairs
from lmmkit.data.shapes.render import render_scene
from lmmkit.data.shapes.world import World
from lmmkit.models.build import build_vlm
from lmmkit.models.lora import add_lora
from lmmkit.train.dpo import (
    DPOObjective,
    DPOSettings,
    ReferenceModel,
    adapters_disabled,
    answer_logps,
    make_pair_batch,
    preference_loss,
)
from lmmkit.train.features import FeatureCache
from lmmkit.train.loop import run_stage


def test_answer_logps_sums_only_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    total, count = answer_logps(logits, labels)
    logp = logits.log_softmax(-1)
    # token t is predicted by position t - 1
    assert total[0].item() == pytest.approx((logp[0, 1, 3] + logp[0, 2, 4]).item(), abs=1e-5)
    assert total[1].item() == pytest.approx((logp[1, 0, 1] + logp[1, 1, 2] + logp[1, 2, 6] + logp[1, 3, 0]).item(),
                                            abs=1e-5)
    assert count.tolist() == [2, 4]


def test_losses_at_the_reference_and_their_gradients():
    z = torch.zeros(3)
    n = torch.full((3,), 4.0)
    beta = 0.2
    assert preference_loss(z, z, z, z, n, n, beta, "sigmoid").tolist() == pytest.approx([math.log(2)] * 3)
    assert preference_loss(z, z, z, z, n, n, beta, "hinge").tolist() == pytest.approx([1.0] * 3)
    assert preference_loss(z, z, z, z, n, n, beta, "ipo").tolist() == pytest.approx([(1 / (2 * beta)) ** 2] * 3)
    for kind in ("sigmoid", "hinge", "ipo"):
        chosen = torch.zeros(3, requires_grad=True)
        preference_loss(chosen, z, z, z, n, n, beta, kind).sum().backward()
        assert (chosen.grad < 0).all(), f"{kind}: raising the chosen log-prob must lower the loss"
    # IPO averages per token: the same summed margin over twice the tokens is half the margin.
    short = preference_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1),
                            torch.tensor([2.0]), torch.tensor([2.0]), 1.0, "ipo")
    long = preference_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1),
                           torch.tensor([4.0]), torch.tensor([4.0]), 1.0, "ipo")
    assert short.item() == pytest.approx((1 - 0.5) ** 2) and long.item() == pytest.approx((0.5 - 0.5) ** 2)
    with pytest.raises(ValueError, match="choose one of sigmoid, ipo, hinge"):
        preference_loss(z, z, z, z, n, n, beta, "kto")


def test_settings_are_validated():
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOSettings(beta=0)
    with pytest.raises(ValueError, match="unknown"):
        DPOSettings(loss_type="nope")  # type: ignore[arg-type]


@pytest.fixture
def shapes_pairs(tmp_path):
    world, rng = World(), random.Random(0)
    scenes = [world.sample_scene(rng, f"s{k}", held_out=False) for k in range(24)]
    paths = []
    for scene in scenes:
        path = tmp_path / f"{scene.id}.png"
        render_scene(scene).save(path)
        paths.append(path)
    return preference_pairs(scenes, paths, seed=0)


@pytest.fixture
def shipped_vlm():
    torch.manual_seed(0)
    return build_vlm("shipped:lm", "shipped:vision", seed=0)


def test_pair_batch_shares_the_image_encoding(shipped_vlm, shapes_pairs):
    model = shipped_vlm
    pairs = encode_preferences(shapes_pairs[:4], model.tokenizer, model.image_token_id, model.tokens_per_image,
                               512, BadRecordCounter(), "stop")
    calls = []
    handle = model.vision.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        batch = make_pair_batch(model, pairs, None, model.tokenizer.pad_token_id)
    finally:
        handle.remove()
    assert calls == [4]  # the tower ran once, on the 4 images
    feats = batch["vision_features"]
    assert feats.shape[0] == 8 and torch.equal(feats[:4], feats[4:])
    assert batch["input_ids"].shape[0] == 8
    assert batch["sample_ids"][:4] == [p.chosen.id for p in pairs]


def test_reference_copy_stays_put_and_adapters_off_equals_the_base(shipped_vlm, shapes_pairs):
    model = shipped_vlm
    pairs = encode_preferences(shapes_pairs[:3], model.tokenizer, model.image_token_id, model.tokens_per_image,
                               512, BadRecordCounter(), "stop")
    batch = make_pair_batch(model, pairs, None, model.tokenizer.pad_token_id)
    ref = ReferenceModel(model, "copy")
    before, _ = ref.logps(batch)
    with torch.no_grad():
        for p in model.llm.parameters():
            p.add_(0.05)
    after, _ = ref.logps(batch)
    assert torch.equal(before, after)
    policy_now, _ = answer_logps(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
    assert not torch.allclose(policy_now, before)

    with pytest.raises(ValueError, match="needs LoRA adapters"):
        ReferenceModel(model, "adapters-off")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = model(**inputs).logits
    add_lora(model.llm, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.5)
    adapted = model(**inputs).logits
    assert not torch.allclose(adapted, base)
    with adapters_disabled(model.llm):
        assert torch.allclose(model(**inputs).logits, base, atol=1e-6)
    assert torch.equal(model(**inputs).logits, adapted)  # switched back on


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_run_prefers_the_chosen_answers(shipped_vlm, shapes_pairs, tmp_path, loss_type):
    model = shipped_vlm
    pairs = encode_preferences(shapes_pairs, model.tokenizer, model.image_token_id, model.tokens_per_image,
                               512, BadRecordCounter(), "stop")
    cache = FeatureCache()
    cache.fill(model, [im for p in pairs for im in p.images])
    settings = DPOSettings(beta=0.5, loss_type=loss_type, sft_weight=0.1)
    objective = DPOObjective(model, settings)
    eval_batch = make_pair_batch(model, pairs, cache, model.tokenizer.pad_token_id)
    ref_logps, _ = objective.reference.logps(eval_batch)
    result = run_stage(model, pairs, stage="dpo", output_dir=tmp_path / "dpo", config={"train": {"stage": "dpo"}},
                       batch_size=8, lr=2e-3, max_steps=12, precision="fp32", progress=False, log_every=1,
                       cache=cache, objective=objective)
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in eval_batch.items() if k != "labels"})
    logps, _ = answer_logps(out.logits, eval_batch["labels"])
    n = len(pairs)
    margin_before = (ref_logps[:n] - ref_logps[n:]).mean().item()
    margin_after = (logps[:n] - logps[n:]).mean().item()
    assert margin_after > margin_before + 1.0, (margin_before, margin_after)
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_margin", "reward_accuracy", "kl_proxy"} <= set(rows[0])
    assert rows[-1]["reward_accuracy"] >= rows[0]["reward_accuracy"]
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"]
    assert result.checkpoint is not None and (result.checkpoint / "llm.safetensors").exists()
