"""Bridges beyond the plain MLP: pixel shuffle, the Perceiver resampler and the Q-Former.

Token counts and layouts on random inputs, the errors a bad combination gives (at build time,
naming the config keys), the model with each bridge (loss, generate), checkpoint reload, and the
export refusal.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lmmkit.config import ConfigError, config_from_dict, config_to_dict
from lmmkit.eval.generation import prompt_ids
from lmmkit.models.bridges import (
    MLPBridge,
    PerceiverResampler,
    PixelShuffleBridge,
    QFormerBridge,
    ResamplerBridge,
    pixel_shuffle,
)
from lmmkit.models.build import build_vlm, make_bridge
from lmmkit.models.export_hf import ExportError, export_llava
from lmmkit.train.checkpoint import load_model, save_checkpoint

STYLES = pytest.mark.parametrize("style", ["perceiver", "qformer"])


# ---- token counts and shapes -------------------------------------------------------------------
def test_mlp_bridge_keeps_one_token_per_feature():
    bridge = MLPBridge(12, 20)
    assert bridge.num_output_tokens(49) == 49
    assert bridge(torch.randn(2, 49, 12)).shape == (2, 49, 20)


@STYLES
def test_resampler_gives_k_tokens_whatever_the_input_count(style):
    torch.manual_seed(0)
    bridge = ResamplerBridge(24, 40, num_queries=7, depth=2, heads=4, width=32, style=style)
    for n in (1, 5, 16, 50):
        assert bridge.num_output_tokens(n) == 7
        out = bridge(torch.randn(3, n, 24))
        assert out.shape == (3, 7, 40) and torch.isfinite(out).all()
    # The K outputs are distinct and depend on the image.
    x = torch.randn(2, 16, 24)
    out = bridge(x)
    assert not torch.allclose(out[0, 0], out[0, 1], atol=1e-4)
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_perceiver_and_qformer_classes_are_the_two_styles():
    perceiver, qformer = PerceiverResampler(8, 16, num_queries=3, depth=1), QFormerBridge(8, 16, num_queries=3, depth=1)
    assert (perceiver.style, qformer.style) == ("perceiver", "qformer")
    # Perceiver: one attention over [image ; queries]; Q-Former: self-attention then cross-attention.
    assert hasattr(perceiver.layers[0], "attn") and not hasattr(perceiver.layers[0], "self_attn")
    assert hasattr(qformer.layers[0], "self_attn") and hasattr(qformer.layers[0], "cross_attn")


def test_perceiver_keys_include_the_queries():
    """Flamingo: the keys/values are the image tokens followed by the (normed) queries themselves."""
    torch.manual_seed(0)
    bridge = PerceiverResampler(8, 16, num_queries=4, depth=1, heads=2)
    x = torch.randn(1, 1, 8)
    seen = {}
    attn = bridge.layers[0].attn
    handle = attn.kv.register_forward_hook(lambda _m, args, _out: seen.update(context=args[0]))
    bridge(x)
    handle.remove()
    assert seen["context"].shape == (1, 1 + 4, 16)  # 1 image token + 4 queries


@STYLES
def test_one_image_does_not_see_another_in_the_batch(style):
    torch.manual_seed(0)
    bridge = ResamplerBridge(8, 16, num_queries=5, depth=2, heads=2, style=style).eval()
    x = torch.randn(3, 9, 8)
    torch.testing.assert_close(bridge(x)[1:2], bridge(x[1:2]), rtol=1e-5, atol=1e-6)


@STYLES
def test_position_embedding_makes_token_order_matter(style):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 8)
    perm = torch.randperm(9)
    plain = ResamplerBridge(8, 16, num_queries=4, depth=2, heads=2, style=style).eval()
    located = ResamplerBridge(8, 16, num_queries=4, depth=2, heads=2, style=style, num_input_tokens=9).eval()
    with torch.no_grad():
        # Attention over the image is permutation invariant: without positions, where a feature was is lost.
        assert (plain(x[:, perm]) - plain(x)).abs().max() <= 1e-6
        # With them it is not. (Small at init: near-uniform attention averages the positions away, so
        # only its departures from uniform see them; training sharpens it.)
        assert (located(x[:, perm]) - located(x)).abs().max() > 1e-5
    assert located.num_output_tokens(9) == 4
    with pytest.raises(ValueError, match="covers 9 image tokens, but got 16"):
        located.num_output_tokens(16)
    with pytest.raises(ValueError, match="num_input_tokens=16"):
        located(torch.randn(1, 16, 8))


@STYLES
def test_resampler_trains_and_every_parameter_gets_a_gradient(style):
    """Stable init: a few Adam steps fit a fixed batch (loss falls well), and nothing is dead at init."""
    torch.manual_seed(0)
    bridge = ResamplerBridge(8, 12, num_queries=3, depth=3, heads=2, width=16, style=style, num_input_tokens=6)
    x, target = torch.randn(4, 6, 8), torch.randn(4, 3, 12)
    loss = torch.nn.functional.mse_loss(bridge(x), target)
    loss.backward()
    dead = [n for n, p in bridge.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead
    opt = torch.optim.Adam(bridge.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(bridge(x), target)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_resampler_rejects_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match=r"heads=3 does not divide its width 32.*1, 2, 4, 8, 16, 32"):
        ResamplerBridge(8, 32, heads=3)
    with pytest.raises(ValueError, match="num_queries must be >= 1"):
        ResamplerBridge(8, 32, num_queries=0)


# ---- pixel shuffle -------------------------------------------------------------------------------
def test_pixel_shuffle_regroups_each_block_in_row_major_order():
    # A 4x4 grid whose token t holds (10*t, 10*t + 1): each token's two values say where it came from.
    t = torch.arange(16).float()
    x = torch.stack([10 * t, 10 * t + 1], dim=-1).unsqueeze(0)  # (1, 16, 2)
    out = pixel_shuffle(x, 2)
    assert out.shape == (1, 4, 8)
    blocks = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]  # (row, col) blocks, row-major
    for i, tokens in enumerate(blocks):
        expected = [v for tok in tokens for v in (10 * tok, 10 * tok + 1)]
        assert out[0, i].tolist() == expected, f"output token {i}"
    # Factor 4 makes one token of all 16, in the original order; factor 1 is the identity.
    assert pixel_shuffle(x, 4)[0, 0].tolist() == x[0].flatten().tolist()
    assert torch.equal(pixel_shuffle(x, 1), x)
    # Batch rows are shuffled independently.
    both = pixel_shuffle(torch.cat([x, x + 1000]), 2)
    assert torch.equal(both[1], out[0] + 1000)


def test_pixel_shuffle_bridge_shapes():
    bridge = PixelShuffleBridge(6, 20, layers=2, factor=2)
    assert bridge.mlp.net[0].in_features == 6 * 4
    assert bridge.num_output_tokens(64) == 16
    assert bridge(torch.randn(3, 64, 6)).shape == (3, 16, 20)
    assert PixelShuffleBridge(6, 20, layers=1, factor=4).num_output_tokens(64) == 4


def test_pixel_shuffle_errors_name_the_grid_and_what_works():
    bridge = PixelShuffleBridge(6, 20, factor=4)
    with pytest.raises(ValueError) as err:
        bridge.num_output_tokens(36)
    assert "r=4" in str(err.value) and "s=6" in str(err.value) and "1, 2, 3, 6" in str(err.value)
    with pytest.raises(ValueError) as err:
        PixelShuffleBridge(6, 20, factor=2).num_output_tokens(17)
    assert "17 tokens" in str(err.value) and "not a square" in str(err.value)
    assert "vision_drop_cls" in str(err.value)  # 17 = 4x4 + CLS
    with pytest.raises(ValueError, match="not a square"):
        bridge(torch.randn(1, 20, 6))


def test_make_bridge_refuses_pixel_shuffle_with_a_resampler():
    for kind in ("resampler", "qformer"):
        with pytest.raises(ValueError) as err:
            make_bridge(kind, 8, 16, 16, pixel_shuffle=2)
        message = str(err.value)
        assert "model.pixel_shuffle=2" in message and "model.bridge=mlp" in message and kind in message
    with pytest.raises(ValueError, match=r"model.bridge_heads=5 does not divide the LLM's hidden size 16"):
        make_bridge("resampler", 8, 16, 16, heads=5)
    with pytest.raises(ValueError, match=r"model.bridge_heads=3 does not divide model.bridge_width=20"):
        make_bridge("qformer", 8, 16, 16, heads=3, width=20)
    with pytest.raises(ValueError, match="choose one of: mlp, resampler, qformer"):
        make_bridge("perceiver", 8, 16, 16)


# ---- config -----------------------------------------------------------------------------------
def test_config_accepts_the_bridge_keys_and_checks_their_values():
    cfg = config_from_dict({"model": {"bridge": "qformer", "bridge_queries": 8, "bridge_depth": 1,
                                      "bridge_heads": 2, "bridge_width": 64}})
    assert (cfg.model.bridge, cfg.model.bridge_queries, cfg.model.bridge_width) == ("qformer", 8, 64)
    defaults = config_from_dict({}).model
    assert (defaults.bridge, defaults.bridge_queries, defaults.bridge_depth, defaults.bridge_heads,
            defaults.bridge_width, defaults.pixel_shuffle) == ("mlp", 32, 2, 4, 0, 1)
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"bridge": "perceiver", "bridge_queries": 0, "pixel_shuffle": 0,
                                    "bridge_width": -1}}, source="x.yaml")
    message = str(err.value)
    assert "x.yaml: model.bridge: 'perceiver' is not allowed; choose one of: mlp, resampler, qformer" in message
    assert "x.yaml: model.bridge_queries: expected an integer > 0, got 0" in message
    assert "x.yaml: model.pixel_shuffle: expected an integer >= 1 (1 = off), got 0" in message
    assert "model.bridge_width: expected an integer >= 0 (0 = the LLM's hidden size), got -1" in message
    assert len(err.value.errors) == 4


# ---- the model with each bridge ---------------------------------------------------------------
BRIDGES = {
    "resampler": dict(bridge="resampler", bridge_queries=6, bridge_depth=2, bridge_heads=4),
    "qformer": dict(bridge="qformer", bridge_queries=5, bridge_depth=1, bridge_heads=2, bridge_width=16),
    "shuffle": dict(pixel_shuffle=2, bridge_layers=1),
}
TOKENS = {"resampler": 6, "qformer": 5, "shuffle": 4}  # the tiny CLIP gives a 4x4 grid


@pytest.fixture(scope="module")
def vlms(tiny_llama_dir, tiny_clip_dir):
    return {name: build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2, seed=3, **kw).eval()
            for name, kw in BRIDGES.items()}


@pytest.mark.parametrize("name", list(BRIDGES))
def test_vlm_with_each_bridge_computes_a_loss_and_generates(name, vlms, images):
    model = vlms[name]
    assert model.tokens_per_image == TOKENS[name]
    ids = torch.tensor([prompt_ids(model, "What colour is the square?")])
    assert int((ids == model.image_token_id).sum()) == TOKENS[name]
    pixels = model.vision.preprocess(images[:1])
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, pixel_values=pixels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.bridge.parameters())
    model.zero_grad()
    new = model.generate(ids, torch.ones_like(ids), pixel_values=pixels, max_new_tokens=4)
    assert len(new) == 1 and len(new[0]) <= 4
    # The image matters: another image changes the logits.
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels).logits
        b = model(input_ids=ids, pixel_values=model.vision.preprocess(images[1:2])).logits
    assert not torch.allclose(a, b, atol=1e-5)


def test_build_fails_before_training_when_the_tower_grid_does_not_fit(tiny_llama_dir, tiny_clip_dir):
    with pytest.raises(ValueError) as err:
        build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2, pixel_shuffle=3)
    message = str(err.value)
    assert "model.pixel_shuffle=3" in message and "s=4" in message and "1, 2, 4" in message
    with pytest.raises(ValueError, match="vision_drop_cls"):  # CLIP keeping CLS: 17 tokens
        build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2, vision_drop_cls=False, pixel_shuffle=2)
    with pytest.raises(ValueError, match="model.bridge=mlp"):
        build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2, bridge="resampler", pixel_shuffle=2)


def test_bridge_init_follows_the_seed(tiny_llama_dir, tiny_clip_dir, vlms):
    again = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2, seed=3, **BRIDGES["qformer"])
    other = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2, seed=4, **BRIDGES["qformer"])
    for key, value in vlms["qformer"].bridge.state_dict().items():
        assert torch.equal(again.bridge.state_dict()[key], value), key
    assert not torch.equal(other.bridge.queries, vlms["qformer"].bridge.queries)


def _config(llm, vision, **model) -> dict:
    cfg = config_from_dict({"model": {"llm": str(llm), "vision": str(vision), "vision_select_layer": -2, **model},
                            "train": {"stage": "align"}})
    return config_to_dict(cfg)


@pytest.mark.parametrize("name", list(BRIDGES))
def test_checkpoint_reload_rebuilds_the_bridge_exactly(name, vlms, images, tiny_llama_dir, tiny_clip_dir,
                                                       tmp_path):
    model = copy.deepcopy(vlms[name])
    with torch.no_grad():
        for p in model.bridge.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights a fresh build would not have
    ckpt = save_checkpoint(tmp_path / "ckpt", model, ("bridge",),
                           _config(tiny_llama_dir, tiny_clip_dir, **BRIDGES[name]), {"step": 1})
    loaded = load_model(ckpt)
    assert type(loaded.bridge) is type(model.bridge) and loaded.tokens_per_image == TOKENS[name]
    ids = torch.tensor([prompt_ids(model, "Describe the image briefly.")])
    pixels = model.vision.preprocess(images[:1])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=pixels).logits,
                           model(input_ids=ids, pixel_values=pixels).logits)


def test_checkpoint_without_the_new_keys_loads_as_mlp(tiny_llama_dir, tiny_clip_dir, tmp_path):
    model = build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), -2, bridge_layers=1)
    config = _config(tiny_llama_dir, tiny_clip_dir, bridge_layers=1)
    for key in ("bridge", "bridge_queries", "bridge_depth", "bridge_heads", "bridge_width", "pixel_shuffle"):
        del config["model"][key]  # as written before these keys existed
    loaded = load_model(save_checkpoint(tmp_path / "old", model, ("bridge",), config, {"step": 0}))
    assert type(loaded.bridge) is MLPBridge and len(loaded.bridge.net) == 1
    assert loaded.tokens_per_image == 16
    assert torch.equal(loaded.bridge.net[0].weight, model.bridge.net[0].weight)


# ---- export -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "needles"), [
    ("resampler", ["Perceiver resampler with 6 learned queries", "model.bridge=resampler"]),
    ("qformer", ["Q-Former with 5 learned queries", "model.bridge=qformer"]),
    ("shuffle", ["pixel shuffle by 2", "model.pixel_shuffle=2"]),
])
def test_export_refuses_bridges_llava_cannot_express(name, needles, vlms, tmp_path):
    with pytest.raises(ExportError, match="cannot export this architecture as hf-llava") as err:
        export_llava(vlms[name], tmp_path / "hf")
    for needle in [*needles, "multi_modal_projector", "model.pixel_shuffle=1"]:
        assert needle in str(err.value)
    assert not (tmp_path / "hf").exists()
