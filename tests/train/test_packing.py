"""Sequence packing: packed rows train exactly like the same samples padded, and only LLMs that can take the
block-diagonal mask are allowed to pack.

Tolerances: fp32 throughout; the same sums are reduced in another order, so losses agree to ~1e-7 and are
compared at 1e-5 (relative), gradients at 1e-5 relative + 1e-6 absolute.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoConfig, AutoModelForCausalLM, MambaConfig, MambaForCausalLM

import tiny_hf
from lmmkit.config import Config, ConfigError, ModelSpec, TrainSpec, config_from_dict, config_to_dict
from lmmkit.data.templates import IGNORE_INDEX
from lmmkit.models.build import build_vlm
from lmmkit.spec_checks import PACKABLE_LLM_TYPES
from lmmkit.train.loop import LMObjective, make_batch, run_stage
from lmmkit.train.packing import (
    PackedLMObjective,
    PackingError,
    first_fit_decreasing,
    make_packed_batch,
    pack_rows,
    packed_mask,
)
from lmmkit.train.run import load_samples, train_from_config

FP32 = {"precision": "fp32", "progress": False, "log_every": 1}
MAX_LEN = 128  # = conftest's VARIED_MAX_LEN: varied_samples (50-110 tokens) pack two or three to a row


def _config(llm, vision, **train) -> dict:
    return config_to_dict(Config(model=ModelSpec(llm=str(llm), vision=str(vision), vision_select_layer=-2),
                                 train=TrainSpec(**train)))


def _spans(batch: dict, samples: list) -> dict[str, tuple[int, int, int]]:
    """sample id -> (row, start, length) from the packed batch's own per-row sample ids."""
    by_id = {s.id: s for s in samples}
    out = {}
    for row, names in enumerate(batch["sample_ids"]):
        start = 0
        for name in names.split("+"):
            n = len(by_id[name].input_ids)
            out[name] = (row, start, n)
            start += n
    return out


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token loss (0 where no target) and the target mask, over one row's span."""
    targets = labels[1:]
    mask = targets != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(logits[:-1].float(), targets.clamp(min=0), reduction="none")
    return ce * mask, mask


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_first_fit_decreasing_packs_longest_first_into_the_first_row_with_room():
    assert first_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 10) == [[0, 1, 6], [2, 3, 4, 5]]
    lengths = [(i * 37) % 61 + 1 for i in range(200)]
    rows = first_fit_decreasing(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(200))  # every item exactly once
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 100) + 3  # close to the bound: far fewer rows than items
    assert rows == first_fit_decreasing(lengths, 100)
    with pytest.raises(PackingError, match="does not fit a packed row of 50"):
        first_fit_decreasing([10, 51], 50)


def test_pack_rows_never_computes_more_positions_than_padding_or_full_rows():
    def positions(rows, lengths):
        return len(rows) * -(-max(sum(lengths[i] for i in row) for row in rows) // 32) * 32

    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        n = int(torch.randint(1, 40, (1,), generator=generator))
        lengths = torch.randint(5, 200, (n,), generator=generator).tolist()
        rows = pack_rows(lengths, 200)
        assert sorted(i for row in rows for i in row) == list(range(n))
        assert all(sum(lengths[i] for i in row) <= 200 for row in rows)
        padded = n * -(-max(lengths) // 32) * 32
        assert positions(rows, lengths) <= min(padded, positions(first_fit_decreasing(lengths, 200), lengths))
    assert [len(r) for r in pack_rows([89] * 10, 512)] == [5, 5]  # 445 of 448: denser than 10 x 96
    assert [len(r) for r in pack_rows([89] * 4, 512)] == [1] * 4  # 4 x 96 beats 448 for all four
    assert pack_rows([100, 20, 100, 20, 60, 60], 128) == [[0, 1], [2, 3], [4, 5]]
    assert pack_rows([90, 90], 100) == [[0], [1]]  # budgets stop at max_length, even off the 32 grid


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # the mask's form follows the implementation
def test_packed_batch_gives_the_padded_per_sample_losses_and_gradients(clip_vlm, varied_samples, attention):
    model, pad = clip_vlm, clip_vlm.tokenizer.pad_token_id
    model.llm.set_attn_implementation(attention)
    model.eval()  # no dropout: both layouts must see the same function
    padded = make_batch(model, varied_samples, None, pad)
    packed = make_packed_batch(model, varied_samples, None, pad, MAX_LEN)
    assert packed["input_ids"].shape[0] < len(varied_samples)  # samples really share rows
    assert packed["num_tokens"] == int(padded["attention_mask"].sum())

    out_padded = model(**padded)
    padded_loss = out_padded.loss
    padded_loss.backward()
    grads_padded = _grads(model)
    model.zero_grad(set_to_none=True)
    out_packed = model(**packed)
    out_packed.loss.backward()
    grads_packed = _grads(model)

    spans = _spans(packed, varied_samples)
    for i, s in enumerate(varied_samples):
        n = len(s.input_ids)
        ref, ref_mask = _token_losses(out_padded.logits[i, :n], padded["labels"][i, :n])
        row, start, length = spans[s.id]
        assert length == n
        got, got_mask = _token_losses(out_packed.logits[row, start:start + n], packed["labels"][row, start:start + n])
        assert torch.equal(got_mask, ref_mask), s.id  # the same targets (the first token is never one)
        assert got.sum().item() == pytest.approx(ref.sum().item(), rel=1e-5), s.id
    assert out_packed.loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    assert grads_packed.keys() == grads_padded.keys() and any("bridge" in k for k in grads_packed)
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_mask_keeps_samples_apart(clip_vlm, varied_samples):
    model, pad = clip_vlm, clip_vlm.tokenizer.pad_token_id
    model.eval()
    packed = make_packed_batch(model, varied_samples, None, pad, MAX_LEN)
    row = next(r for r, names in enumerate(packed["sample_ids"]) if "+" in names)
    first, second = packed["sample_ids"][row].split("+")[:2]
    spans = _spans(packed, varied_samples)
    _, a0, na = spans[first]
    _, b0, nb = spans[second]
    changed = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in packed.items() if k != "num_tokens"}
    ids = changed["input_ids"][row, a0:a0 + na]
    text = ids != model.image_token_id
    vocab = model.llm.get_input_embeddings().weight.shape[0]
    other = (ids[text] + 7) % vocab  # other text tokens for sample A only
    ids[text] = torch.where(other == model.image_token_id, (other + 1) % vocab, other)
    with torch.no_grad():
        before = model(**{k: v for k, v in packed.items() if k != "num_tokens"}).logits
        after = model(**changed).logits
        assert not torch.allclose(after[row, a0:a0 + na], before[row, a0:a0 + na], atol=1e-3)  # A did change
        torch.testing.assert_close(after[row, b0:b0 + nb], before[row, b0:b0 + nb], rtol=0, atol=1e-6)
        # ...and sample B reads as if it were alone (positions restart at 0 for it).
        alone = make_batch(model, [s for s in varied_samples if s.id == second], None, pad)
        torch.testing.assert_close(model(**alone).logits[0, :nb], before[row, b0:b0 + nb], rtol=1e-5, atol=1e-5)
        # The check has teeth: a plain causal mask over the row lets A's change reach B.
        plain = dict(changed, attention_mask=torch.ones_like(changed["input_ids"]))
        plain.pop("position_ids")
        assert not torch.allclose(model(**plain).logits[row, b0:b0 + nb], before[row, b0:b0 + nb], atol=1e-3)


def test_no_sample_learns_to_predict_the_next_samples_first_token(clip_vlm, varied_samples):
    """Plain LM samples (every token a target, the first one too): packed, the first token of each sample is
    not a target, just as unpacked, where nothing precedes it."""
    model, pad = clip_vlm, clip_vlm.tokenizer.pad_token_id
    lm_samples = [replace(s, labels=[t if t != model.image_token_id else IGNORE_INDEX for t in s.input_ids])
                  for s in varied_samples]
    assert all(s.labels[0] != IGNORE_INDEX for s in lm_samples)
    with torch.no_grad():
        padded = model(**make_batch(model, lm_samples, None, pad)).loss
        packed_batch = make_packed_batch(model, lm_samples, None, pad, MAX_LEN)
        packed_batch.pop("num_tokens")
        assert packed_batch["input_ids"].shape[0] < len(lm_samples)
        assert model(**packed_batch).loss.item() == pytest.approx(padded.item(), rel=1e-5)


def test_positions_restart_for_absolute_position_embeddings(tiny_tokenizer, tiny_clip_dir, varied_samples,
                                                            tmp_path):
    """GPT-2 learns a vector per absolute position: a packed sample reads right only if its positions restart at 0
    (RoPE models would not notice a shift: their attention depends on relative positions only)."""
    model = build_vlm(str(tiny_hf.save_tiny_gpt2(tmp_path / "gpt2", tiny_tokenizer)), str(tiny_clip_dir), -2).eval()
    pad = model.tokenizer.pad_token_id
    packed = make_packed_batch(model, varied_samples, None, pad, MAX_LEN)
    assert torch.equal(packed["position_ids"][0, :3], torch.arange(3))
    padded = make_batch(model, varied_samples, None, pad)
    with torch.no_grad():
        ours = model(**{k: v for k, v in packed.items() if k != "num_tokens"}).logits
        ref = model(**padded).logits
    spans = _spans(packed, varied_samples)
    assert any(start > 0 for _, start, _ in spans.values())
    for i, s in enumerate(varied_samples):
        row, start, n = spans[s.id]
        torch.testing.assert_close(ours[row, start:start + n], ref[i, :n], rtol=1e-5, atol=1e-5)


class _ShuffledLM(LMObjective):
    """Unpacked, but batched in packing's order (plain shuffle), so the two runs see the same batches."""

    length_group = 1


class _Recording(PackedLMObjective):
    def __init__(self, model, max_length: int) -> None:
        super().__init__(model, max_length)
        self.batches: list[dict] = []
        self.samples: dict[str, list[int]] = {}

    def batch(self, model, samples, cache, pad_id):
        batch = super().batch(model, samples, cache, pad_id)
        self.samples.update({s.id: s.input_ids for s in samples})
        self.batches.append({"sample_ids": batch["sample_ids"], "input_ids": batch["input_ids"].clone()})
        return batch


def test_packed_run_stage_trains_like_the_padded_run(clip_vlm, varied_samples, tiny_llama_dir, tiny_clip_dir,
                                                     tmp_path):
    kwargs = dict(stage="sft", config=_config(tiny_llama_dir, tiny_clip_dir, stage="sft"), batch_size=4, lr=5e-3,
                  max_steps=6, warmup_ratio=0.0, seed=2, **FP32)
    padded_model = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2, seed=0)
    padded = run_stage(padded_model, varied_samples, output_dir=tmp_path / "padded", objective=_ShuffledLM(),
                       **kwargs)
    recorder = _Recording(clip_vlm, max_length=MAX_LEN)
    packed = run_stage(clip_vlm, varied_samples, output_dir=tmp_path / "packed", objective=recorder, **kwargs)
    for (s1, l1), (s2, l2) in zip(padded.losses, packed.losses, strict=True):
        assert s1 == s2 and l2 == pytest.approx(l1, rel=1e-5)
    assert packed.losses[-1][1] < packed.losses[0][1]  # it trained
    for name, weight in padded_model.state_dict().items():
        torch.testing.assert_close(clip_vlm.state_dict()[name], weight, rtol=1e-4, atol=1e-5, msg=name)

    # 8 samples, batch 4: two steps per epoch, three epochs. Each epoch has every sample exactly once...
    per_epoch = [[n for b in recorder.batches[e:e + 2] for row in b["sample_ids"] for n in row.split("+")]
                 for e in range(0, 6, 2)]
    assert all(sorted(ids) == sorted(s.id for s in varied_samples) for ids in per_epoch)
    assert per_epoch[0] != per_epoch[1]  # ...in a new order
    assert any("+" in names for b in recorder.batches for names in b["sample_ids"])  # rows were shared
    # ...and every row holds whole samples, back to back from its start, within max_length.
    for b in recorder.batches:
        assert b["input_ids"].shape[1] <= 128
        for r, names in enumerate(b["sample_ids"]):
            row = [t for n in names.split("+") for t in recorder.samples[n]]
            assert len(row) <= MAX_LEN
            assert b["input_ids"][r, :len(row)].tolist() == row


def test_resume_is_exact_with_packing(tiny_llama_dir, tiny_clip_dir, varied_samples, tmp_path):
    kwargs = dict(stage="sft", config=_config(tiny_llama_dir, tiny_clip_dir, stage="sft", packing=True),
                  batch_size=2, grad_accum=2, lr=2e-3, max_steps=6, warmup_ratio=0.2, seed=3, save_every=3, **FP32)
    model1 = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2)
    run1 = run_stage(model1, varied_samples, output_dir=tmp_path / "run1",
                     objective=PackedLMObjective(model1, MAX_LEN), **kwargs)
    (tmp_path / "run2").mkdir()
    shutil.copytree(tmp_path / "run1" / "checkpoint-3", tmp_path / "run2" / "checkpoint-3")
    model2 = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2)
    run2 = run_stage(model2, varied_samples, output_dir=tmp_path / "run2", resume=True,
                     objective=PackedLMObjective(model2, MAX_LEN), **kwargs)
    assert [s for s, _ in run2.losses] == [4, 5, 6]
    for (s1, l1), (s2, l2) in zip(run1.losses[3:], run2.losses, strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-6, abs=1e-7)
    for name, weight in model1.state_dict().items():
        torch.testing.assert_close(model2.state_dict()[name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_anyres_images_of_several_sizes_are_spliced_in_sample_order(tiny_llama_dir, tiny_clip_dir, tmp_path):
    """AnyRes gives each image its own token count, so an image spliced into the wrong sample cannot fit."""
    model = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2, anyres=True,
                      anyres_grid_pinpoints="32x64,64x32,64x64", seed=0).eval()
    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for i, (h, w) in enumerate([(90, 40), (64, 64), (30, 100), (40, 40), (30, 100), (64, 64)]):
        im = Image.new("RGB", (w, h), (128, 128, 128))
        ImageDraw.Draw(im).rectangle((2 + i, 2, w // 2, h // 2), fill=(40 * i, 200, 30))
        im.save(folder / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?" + " Please." * i},
            {"from": "gpt", "value": "A square."}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    samples, _ = load_samples(model, tmp_path / "data.json", folder, max_length=256, policy="stop")
    assert len({len(s.input_ids) for s in samples}) > 3
    pad = model.tokenizer.pad_token_id
    packed = make_packed_batch(model, samples, None, pad, 256)
    padded = make_batch(model, samples, None, pad)
    assert packed["input_ids"].shape[0] < len(samples)
    with torch.no_grad():
        ours, ref = model(**{k: v for k, v in packed.items() if k != "num_tokens"}), model(**padded)
    spans = _spans(packed, samples)
    for i, s in enumerate(samples):
        row, start, n = spans[s.id]
        torch.testing.assert_close(ours.logits[row, start:start + n], ref.logits[i, :n], rtol=1e-5, atol=1e-5)
    assert ours.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)


@pytest.mark.parametrize("model_type", PACKABLE_LLM_TYPES)
def test_every_packable_llm_type_keeps_packed_samples_apart(model_type):
    """The allow-list is what was verified: for each type, a packed row gives each sample's own logits."""
    torch.manual_seed(0)
    size = {"n_embd": 32, "n_layer": 2, "n_head": 2} if model_type == "gpt2" else {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16}
    config = AutoConfig.for_model(model_type, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **size)
    llm = AutoModelForCausalLM.from_config(config).eval()
    a, b = torch.randint(3, 64, (1, 5)), torch.randint(3, 64, (1, 9))
    ids = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], 1)
    segments = torch.tensor([[0] * 5 + [1] * 9 + [-15, -16]])
    positions = torch.tensor([list(range(5)) + list(range(9)) + [0, 0]])
    impl = llm.config._attn_implementation
    with torch.no_grad():
        out = llm(input_ids=ids, attention_mask=packed_mask(segments, impl, llm.dtype), position_ids=positions).logits
        torch.testing.assert_close(out[0, :5], llm(input_ids=a).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[0, 5:14], llm(input_ids=b).logits[0], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A state-space LM: no attention, so no mask can keep packed samples apart."""
    folder = tmp_path_factory.mktemp("mamba")
    torch.manual_seed(0)
    MambaForCausalLM(MambaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, state_size=4,
                                 pad_token_id=tiny_tokenizer.pad_token_id)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_an_llm_that_cannot_take_the_mask_is_refused_at_config_and_build_time(mamba_dir, tiny_clip_dir):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"llm": str(mamba_dir), "vision": str(tiny_clip_dir)},
                          "train": {"packing": True}}, source="run.yaml")
    message = str(info.value)
    assert message.startswith("run.yaml: model.llm is a 'mamba' model")
    assert "position_ids and a 4D" in message and "Supported LLM types: llama, mistral" in message
    # Without packing the same model is fine, and so is packing with a Llama.
    config_from_dict({"model": {"llm": str(mamba_dir), "vision": str(tiny_clip_dir)}})
    config_from_dict({"train": {"packing": True}})

    model = build_vlm(str(mamba_dir), str(tiny_clip_dir), -2)
    with pytest.raises(PackingError, match="'mamba' LLM is not one lmmkit has verified. Supported LLM types: llama"):
        PackedLMObjective(model, 128)


def test_packing_config_rules():
    def errors(d: dict) -> str:
        with pytest.raises(ConfigError) as info:
            config_from_dict(d, source="run.yaml")
        return str(info.value)

    assert "expected true or false" in errors({"train": {"packing": "yes"}})
    assert "the dpo stage compares" in errors({"train": {"packing": True, "stage": "dpo"}})
    assert "cross-attention" in errors({"model": {"bridge": "cross-attention"}, "train": {"packing": True}})
    assert config_from_dict({"train": {"packing": True, "stage": "align"}}).train.packing is True
    assert config_from_dict({}).train.packing is False


def test_sliding_window_shorter_than_max_length_is_refused(clip_vlm):
    clip_vlm.llm.config.sliding_window = 64
    with pytest.raises(PackingError, match="sliding window of 64 tokens"):
        PackedLMObjective(clip_vlm, 128)
    PackedLMObjective(clip_vlm, 64)


def test_lmmkit_train_packs_when_the_config_says_so(tiny_llama_dir, tiny_clip_dir, llava_data, tmp_path):
    data, images = llava_data
    cfg = config_from_dict({
        "model": {"llm": str(tiny_llama_dir), "vision": str(tiny_clip_dir), "vision_select_layer": -2},
        "data": {"train": str(data), "image_folder": str(images), "max_length": MAX_LEN},
        "train": {"stage": "align", "packing": True, "max_steps": 2, "batch_size": 4, "precision": "fp32",
                  "output_dir": str(tmp_path / "out"), "log_every": 1}})
    result = train_from_config(cfg)
    assert result.steps == 2 and result.tokens_per_second > 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
