"""Packed rows through flash-attention's varlen kernel (train/varlen.py).

The layout and the refusals are checked everywhere; the kernel itself runs on CUDA only, so the loss and
gradient checks skip on a CPU (CI) and run on a GPU (`docs/performance.md` says where they last ran).
Tolerances there: bf16 autocast on both sides with different attention kernels (flash varlen vs sdpa), so
losses are compared at 1e-2 relative and gradients by cosine similarity >= 0.99 per tensor.
"""

from __future__ import annotations

import pytest
import torch

from lmmkit.data.templates import IGNORE_INDEX
from lmmkit.train.loop import make_batch, target_loss
from lmmkit.train.packing import check_packable, make_packed_batch
from lmmkit.train.varlen import (
    VARLEN_ATTENTION,
    VarlenError,
    register_varlen_attention,
    varlen_attention,
    varlen_available,
    varlen_layout,
)

needs_cuda = pytest.mark.skipif(not varlen_available(), reason="the flash varlen kernel needs a CUDA GPU")


def test_layout_is_one_unpadded_row_with_sample_boundaries(varied_samples):
    batch = varlen_layout(varied_samples)
    lengths = [len(s.input_ids) for s in varied_samples]
    total = sum(lengths)
    assert batch["input_ids"].shape == (1, total) and batch["num_tokens"] == total
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_q"].tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert batch["max_length_q"] == max(lengths)
    start = 0
    for s, n in zip(varied_samples, lengths, strict=True):
        assert batch["input_ids"][0, start:start + n].tolist() == s.input_ids
        assert batch["position_ids"][0, start:start + n].tolist() == list(range(n))  # restart per sample
        assert batch["labels"][0, start] == IGNORE_INDEX  # never predicted from the previous sample
        assert batch["labels"][0, start + 1:start + n].tolist() == s.labels[1:]
        start += n


def test_packing_takes_the_varlen_layout_when_the_llm_runs_that_kernel(clip_vlm, varied_samples, varied_max_len):
    clip_vlm.llm.set_attn_implementation(register_varlen_attention())
    check_packable(clip_vlm, varied_max_len)  # accepted: no mask to hand over
    batch = make_packed_batch(clip_vlm, varied_samples, None, clip_vlm.tokenizer.pad_token_id, varied_max_len)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    assert batch["pixel_values"].shape[0] == len(varied_samples)  # one image per sample, in sample order


def test_refusals_say_what_is_wrong():
    q = torch.zeros(2, 2, 4, 8, dtype=torch.bfloat16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    layer = torch.nn.Linear(1, 1)
    with pytest.raises(VarlenError, match="packed training rows only"):
        varlen_attention(layer, q[:1], q[:1], q[:1], None)
    with pytest.raises(VarlenError, match="one packed row, got a batch of 2"):
        varlen_attention(layer, q, q, q, None, cu_seq_lens_q=cu, max_length_q=4)
    with pytest.raises(VarlenError, match="bf16 or fp16"):
        varlen_attention(layer, q[:1].float(), q[:1].float(), q[:1].float(), None, cu_seq_lens_q=cu, max_length_q=4)
    with pytest.raises(VarlenError, match="sample"):
        varlen_layout([])


@needs_cuda
def test_varlen_loss_and_gradients_equal_the_unpacked_ones(clip_vlm, varied_samples, varied_max_len):
    from lmmkit.train.stages import apply_stage

    model, pad = clip_vlm.cuda(), clip_vlm.tokenizer.pad_token_id
    apply_stage(model, "sft", verbose=False)  # as packed SFT trains: bridge + LLM, the tower frozen
    model.eval()  # no dropout: both layouts must see the same function

    def loss_and_grads(batch: dict, attention: str) -> tuple[float, dict[str, torch.Tensor]]:
        model.llm.set_attn_implementation(attention)
        model.zero_grad(set_to_none=True)
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items() if k != "num_tokens"}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = target_loss(model, batch)
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    padded_loss, padded_grads = loss_and_grads(make_batch(model, varied_samples, None, pad), "sdpa")
    register_varlen_attention()
    model.llm.set_attn_implementation(VARLEN_ATTENTION)
    packed = make_packed_batch(model, varied_samples, None, pad, varied_max_len)
    varlen_loss, varlen_grads = loss_and_grads(packed, VARLEN_ATTENTION)
    assert varlen_loss == pytest.approx(padded_loss, rel=1e-2)
    assert varlen_grads.keys() == padded_grads.keys() and any(k.startswith("bridge") for k in varlen_grads)
    scale = max(g.norm() for g in padded_grads.values())
    for name, grad in padded_grads.items():
        if grad.norm() < 1e-3 * scale:  # e.g. the key bias: zero in exact arithmetic, bf16 noise here
            continue
        cosine = torch.nn.functional.cosine_similarity(varlen_grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine >= 0.99, f"{name}: cosine {cosine:.4f}, norms {varlen_grads[name].norm():.3g} / {grad.norm():.3g}"
    # Per-sample logits agree too, and the check has teeth: the same row under one causal attention over all of
    # its samples (what packing without boundaries would do) moves them far more than the kernel change does.
    padded = {k: v.cuda() if torch.is_tensor(v) else v for k, v in make_batch(model, varied_samples, None, pad).items()}
    row = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed.items() if k not in ("labels", "num_tokens")}
    leaky = {k: v for k, v in row.items() if not k.startswith(("cu_seq", "max_length"))}
    leaky["position_ids"] = torch.arange(packed["num_tokens"], device="cuda")[None]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.llm.set_attn_implementation("sdpa")
        reference = model(**{k: v for k, v in padded.items() if k != "labels"}).logits.float()
        leaked = model(**leaky).logits.float()
        model.llm.set_attn_implementation(VARLEN_ATTENTION)
        packed_logits = model(**row).logits.float()

    def worst(logits: torch.Tensor) -> float:
        start, out = 0, 0.0
        for i, s in enumerate(varied_samples):
            n = len(s.input_ids)
            out = max(out, (logits[0, start:start + n] - reference[i, :n]).abs().max().item())
            start += n
        return out

    assert worst(packed_logits) * 5 < worst(leaked), (worst(packed_logits), worst(leaked))


@needs_cuda
def test_lmmkit_train_packs_through_varlen_on_a_gpu(tiny_llama_dir, tiny_clip_dir, llava_data, tmp_path, capsys,
                                                     varied_max_len):
    from lmmkit.config import config_from_dict
    from lmmkit.train.run import train_from_config

    data, images = llava_data
    cfg = config_from_dict({
        "model": {"llm": str(tiny_llama_dir), "vision": str(tiny_clip_dir), "vision_select_layer": -2},
        "data": {"train": str(data), "image_folder": str(images), "max_length": varied_max_len},
        "train": {"stage": "sft", "packing": True, "max_steps": 3, "batch_size": 4, "precision": "bf16",
                  "output_dir": str(tmp_path / "out"), "log_every": 1}})
    result = train_from_config(cfg)
    assert f"packing with {VARLEN_ATTENTION} attention" in capsys.readouterr().out
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)


def test_train_compile_gives_the_eager_losses(tiny_llama_dir, tiny_clip_dir, llava_data, tmp_path, capsys):
    """train.compile compiles the LLM's decoder layers; the losses are the eager ones (fp32: same math, fused)."""
    from lmmkit.config import config_from_dict
    from lmmkit.train.run import train_from_config

    data, images = llava_data
    losses = {}
    for compiled in (False, True):
        cfg = config_from_dict({
            "model": {"llm": str(tiny_llama_dir), "vision": str(tiny_clip_dir), "vision_select_layer": -2},
            "data": {"train": str(data), "image_folder": str(images)},
            "train": {"stage": "sft", "compile": compiled, "max_steps": 3, "batch_size": 4, "precision": "fp32",
                      "output_dir": str(tmp_path / f"out{compiled}"), "log_every": 1}})
        losses[compiled] = [loss for _, loss in train_from_config(cfg).losses]
    assert "torch.compile: 2 LLM decoder layers" in capsys.readouterr().out
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
