"""LoRA adapters: identity at init, only adapters train, merging keeps the function, adapters restore."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from lmmkit.models.lora import (
    LoRALinear,
    add_lora,
    has_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    merged_view,
    restrict_to_lora,
)
from lmmkit.train.stages import apply_stage

IDS = torch.tensor([[5, 17, 42, 7, 99, 3], [8, 8, 120, 64, 2, 11]])


@pytest.fixture
def llama(tiny_llama_dir):
    return LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def train_adapters(model, steps: int = 5) -> None:
    """A few SGD steps on next-token loss, through whatever requires grad."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_fresh_adapters_are_the_identity(llama):
    before = logits(llama)
    names = add_lora(llama, rank=4, alpha=8)
    layers = llama.config.num_hidden_layers
    assert len(names) == 4 * layers and names[0] == "model.layers.0.self_attn.q_proj"
    assert isinstance(llama.model.layers[0].self_attn.o_proj, LoRALinear) and has_lora(llama)
    assert torch.equal(logits(llama), before)  # B starts at zero: exactly the same outputs


def test_only_adapters_train_and_outputs_change(llama):
    base = {k: v.clone() for k, v in llama.state_dict().items()}
    before = logits(llama)
    add_lora(llama, rank=4)
    n = restrict_to_lora(llama)
    trainable = [name for name, p in llama.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith((".lora_a", ".lora_b")) for name in trainable)
    assert n == sum(p.numel() for p in lora_parameters(llama))
    assert n == llama.config.num_hidden_layers * 4 * 4 * (32 + 32)  # rank 4, 32 in and 32 out per projection
    llama.train()
    train_adapters(llama)
    llama.eval()
    assert not torch.allclose(logits(llama), before, atol=1e-4)
    # The base weights never moved; only adapter tensors are new.
    for key, value in llama.state_dict().items():
        if key.endswith((".lora_a", ".lora_b")):
            continue
        assert torch.equal(value, base[key.replace(".base.", ".")]), key
    assert set(lora_state_dict(llama)) == {k for k in llama.state_dict() if k.endswith((".lora_a", ".lora_b"))}


def test_merged_weights_load_into_a_plain_model(llama, tiny_llama_dir):
    add_lora(llama, rank=4)
    restrict_to_lora(llama)
    llama.train()
    train_adapters(llama)
    llama.eval()
    trained = logits(llama)
    with merged_view(llama):
        state = {k: v.clone() for k, v in llama.state_dict().items()}
        assert not has_lora(llama)
    assert has_lora(llama) and torch.equal(logits(llama), trained)  # adapters back, bit for bit
    plain = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    plain.load_state_dict(state, strict=True)  # same keys as a model that never had adapters
    assert torch.allclose(logits(plain), trained, atol=1e-5)
    assert merge_lora(llama) == 4 * llama.config.num_hidden_layers and not has_lora(llama)
    assert torch.allclose(logits(llama), trained, atol=1e-5)


def test_adapters_alone_restore_a_run(llama, tiny_llama_dir):
    add_lora(llama, rank=4)
    restrict_to_lora(llama)
    llama.train()
    train_adapters(llama)
    llama.eval()
    saved = {k: v.clone() for k, v in lora_state_dict(llama).items()}
    fresh = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    add_lora(fresh, rank=4, seed=123)  # other random A: the load must overwrite it
    load_lora_state_dict(fresh, saved)
    assert torch.equal(logits(fresh), logits(llama))  # base + adapters: exactly the trained model
    with pytest.raises(ValueError, match="does not match"):
        load_lora_state_dict(fresh, {k: v for k, v in saved.items() if "layers.0." not in k})


def test_bad_targets_and_double_wrapping_are_errors(llama):
    with pytest.raises(ValueError, match="no nn.Linear named"):
        add_lora(llama, targets=("qproj",))
    add_lora(llama)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(llama)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(torch.nn.Linear(4, 4), rank=0)


def test_sft_stage_with_lora_trains_bridge_and_adapters_only(clip_vlm):
    model = clip_vlm
    add_lora(model.llm, rank=2)
    try:
        counts = apply_stage(model, "sft", verbose=False)  # unfreezes the whole LLM ...
        counts["llm"] = restrict_to_lora(model.llm)  # ... then only its adapters train
        trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"bridge", "llm"}
        assert all(name.endswith((".lora_a", ".lora_b")) for name, p in model.llm.named_parameters()
                   if p.requires_grad)
        assert counts["llm"] == sum(p.numel() for p in lora_parameters(model.llm))
    finally:
        merge_lora(model.llm)  # the module-scoped fixture is shared: leave it as it was (B is still 0)
        model.eval()
