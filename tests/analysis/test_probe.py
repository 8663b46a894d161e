"""Hallucination probes: teacher-forced log-probs, visual dependency, image attention share, AUROC, CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lmmkit.analysis.probe import (
    ProbeResult,
    answer_logprobs,
    answer_positions,
    auroc,
    blank_like,
    eager_attention,
    encode_image,
    image_attention_share,
    probe_answer,
    roc_curve,
)
from lmmkit.analysis.probe_cli import main
from lmmkit.analysis.probe_study import caption_mentions, error_type, separation
from lmmkit.data.shapes.render import render_scene
from lmmkit.data.shapes.world import Scene, SceneObject
from lmmkit.eval.generation import prompt_ids

PROMPT = "Describe the image in detail."


@pytest.fixture(scope="module")
def model():
    from lmmkit.models.build import build_vlm

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    m = build_vlm("shipped:lm", "shipped:vision")
    m.eval()
    torch.set_num_threads(old)
    return m


@pytest.fixture(scope="module")
def image():
    scene = Scene("t", [SceneObject("red", "circle", 20, 20, 7), SceneObject("blue", "square", 44, 30, 6)])
    return render_scene(scene)


def _last_logprobs(model, ids: list[int], embeds) -> torch.Tensor:
    """log p(next | ids) from one plain forward pass ending at the last position (no teacher forcing)."""
    t = torch.tensor([ids])
    with torch.no_grad():
        return model.llm(inputs_embeds=model.embed(t, embeds)).logits[0, -1].float().log_softmax(-1)


def test_teacher_forced_logprobs_match_the_generate_path(model, image, one_torch_thread):
    r = probe_answer(model, image, PROMPT, max_new_tokens=8)
    assert r.token_ids, "the generate path gave no tokens"
    embeds = encode_image(model, image)
    full = answer_logprobs(model, prompt_ids(model, PROMPT), r.token_ids, embeds)
    assert full.shape == (len(r.token_ids), model.llm.config.vocab_size)
    for i, tok in enumerate(r.token_ids):
        assert full[i].argmax().item() == tok  # the greedy choice is the teacher-forced argmax
        assert r.logp_image[i] == pytest.approx(full[i].max().item(), abs=1e-6)
    assert all(r.greedy_agrees)
    assert r.tokens == [model.tokenizer.decode([t]) for t in r.token_ids]


def test_dependency_is_exactly_zero_when_the_blank_is_the_image(model, image, one_torch_thread):
    r = probe_answer(model, image, PROMPT, max_new_tokens=6, blank=image)
    assert r.logp_blank == r.logp_image
    assert r.dependency_blank == [0.0] * len(r.token_ids)
    # A real blank changes the context, so some token's probability moves.
    other = probe_answer(model, image, PROMPT, answer_ids=r.token_ids)
    assert other.logp_image == r.logp_image
    assert any(d != 0.0 for d in other.dependency_blank)
    assert blank_like(image).size == image.size


def test_every_log_prob_equals_a_plain_forward_at_its_own_position(model, image, one_torch_thread):
    """Dropping the image shortens the prompt; each answer token must still be scored where it sits."""
    with_image, without = prompt_ids(model, PROMPT), prompt_ids(model, PROMPT, with_image=False)
    n_image = sum(t == model.image_token_id for t in with_image)
    assert n_image == model.tokens_per_image and model.image_token_id not in without
    # Without the image, the tag's slots and its newline go; the header, question and template stay.
    stripped = [t for t in with_image if t != model.image_token_id]
    newline = model.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert stripped == without[:3] + newline + without[3:]
    answer = model.tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    r = probe_answer(model, image, PROMPT, answer_ids=answer)
    embeds, blank = encode_image(model, image), encode_image(model, blank_like(image))
    for i, tok in enumerate(answer):
        assert r.logp_image[i] == pytest.approx(_last_logprobs(model, with_image + answer[:i], embeds)[tok].item(),
                                                abs=1e-4)
        assert r.logp_blank[i] == pytest.approx(_last_logprobs(model, with_image + answer[:i], blank)[tok].item(),
                                                abs=1e-4)
        assert r.logp_none[i] == pytest.approx(_last_logprobs(model, without + answer[:i], None)[tok].item(),
                                               abs=1e-4)
    assert list(answer_positions(10, 3)) == [9, 10, 11]
    with pytest.raises(ValueError):
        answer_positions(0, 1)


def _hand_attention_share(model, prompt: list[int], answer: list[int], embeds) -> torch.Tensor:
    """Softmax(q k^T) of every Llama layer recomputed from its input hidden states (not via eager attention)."""
    ids = torch.tensor([prompt + answer])
    llm = model.llm
    with torch.no_grad():
        out = llm(inputs_embeds=model.embed(ids, embeds), output_hidden_states=True)
        n = ids.shape[1]
        positions = torch.arange(n)[None]
        causal = torch.full((n, n), float("-inf")).triu(1)
        shares = []
        for layer, h in zip(llm.model.layers, out.hidden_states, strict=False):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
            cos, sin = llm.model.rotary_emb(x, positions)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            weights = ((q @ k.transpose(-1, -2)) * attn.scaling + causal).softmax(-1)[0]  # (heads, n, n)
            shares.append(weights[..., ids[0] == model.image_token_id].sum(-1))
        rows = list(answer_positions(len(prompt), len(answer)))
        return torch.stack(shares)[:, :, rows].mean(dim=(0, 1))


def test_attention_share_matches_a_hand_computation(model, image, one_torch_thread):
    prompt = prompt_ids(model, PROMPT)
    answer = model.tokenizer("a red circle at the left", add_special_tokens=False)["input_ids"]
    embeds = encode_image(model, image)
    before = model.llm.config._attn_implementation
    share = image_attention_share(model, prompt, answer, embeds)
    assert model.llm.config._attn_implementation == before  # switched to eager for the pass only
    assert share.shape == (len(answer),)
    assert bool(((share >= 0) & (share <= 1)).all())
    torch.testing.assert_close(share, _hand_attention_share(model, prompt, answer, embeds), atol=1e-5, rtol=0)
    r = probe_answer(model, image, PROMPT, answer_ids=answer)
    assert r.attention_share == pytest.approx(share.tolist(), abs=1e-6)


def test_attention_share_with_zero_queries_is_the_image_fraction_of_the_prefix(model, image, one_torch_thread):
    """Zero queries make every layer attend uniformly to the causal prefix: share = n_image / (position + 1)."""
    prompt = prompt_ids(model, PROMPT)
    answer = model.tokenizer("a blue square", add_special_tokens=False)["input_ids"]
    saved = [layer.self_attn.q_proj.weight.detach().clone() for layer in model.llm.model.layers]
    try:
        with torch.no_grad():
            for layer in model.llm.model.layers:
                layer.self_attn.q_proj.weight.zero_()
        share = image_attention_share(model, prompt, answer, encode_image(model, image))
    finally:
        with torch.no_grad():
            for layer, w in zip(model.llm.model.layers, saved, strict=True):
                layer.self_attn.q_proj.weight.copy_(w)
    expected = [model.tokens_per_image / (p + 1) for p in answer_positions(len(prompt), len(answer))]
    assert share.tolist() == pytest.approx(expected, abs=1e-6)


def test_eager_switch_is_restored_after_an_error(model):
    before = model.llm.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), eager_attention(model.llm):
        assert model.llm.config._attn_implementation == "eager"
        raise RuntimeError("boom")
    assert model.llm.config._attn_implementation == before


def _pairs_auroc(pos, neg) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_by_hand_and_by_pair_counting():
    # 0.9 and 0.8 beat all three; 0.4 loses to 0.5, ties 0.4, beats 0.1: (3 + 3 + 1.5) / 9
    assert auroc([0.9, 0.8, 0.4], [0.5, 0.4, 0.1]) == pytest.approx(7.5 / 9)
    assert auroc([2, 3], [0, 1]) == 1.0 and auroc([0, 1], [2, 3]) == 0.0
    assert auroc([1, 1], [1]) == 0.5
    assert math.isnan(auroc([], [1.0]))
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 6, 40).tolist(), rng.integers(0, 5, 30).tolist()  # many ties
    assert auroc(pos, neg) == pytest.approx(_pairs_auroc(pos, neg))
    points = roc_curve(pos, neg)
    assert points[0] == (0.0, 0.0) and points[-1] == (1.0, 1.0)
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(points))
    assert area == pytest.approx(auroc(pos, neg))


def test_auroc_counts_ties_as_half_by_hand():
    # 12 (pos, neg) pairs: 0.3 beats 2; each 0.7 beats 2 and ties 1 (2.5 each); 0.9 beats 3 -> 10 / 12
    pos, neg = [0.3, 0.7, 0.7, 0.9], [0.1, 0.7, 0.2]
    assert auroc(pos, neg) == pytest.approx(10 / 12)


def test_caption_mentions_label_and_locate_objects(model):
    text = "There are two objects: a red circle at the left and a blue squares."
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids)
    values = [float(i) for i in range(n)]
    result = ProbeResult(PROMPT, text, ids, [model.tokenizer.decode([t]) for t in ids], values, values, values,
                         values, [True] * n)
    records = caption_mentions(model, result, ["red circle", "blue circle"])
    assert [(r["name"], r["hallucinated"], r["error"]) for r in records] == [
        ("red circle", False, None), ("blue square", True, "colour")]
    red, blue = records
    assert "red" in red["tokens"][0] and "circ" in "".join(red["tokens"])
    colour_i = result.tokens.index(red["tokens"][0])
    assert red["scores"]["attention_share/colour"] == values[colour_i]
    assert red["scores"]["attention_share/mean"] == pytest.approx(np.mean(
        [values[i] for i in range(colour_i, colour_i + len(red["tokens"]))]))
    assert red["scores"]["dependency_blank/colour"] == 0.0  # logp_image - logp_blank, equal here
    assert blue["scores"]["attention_share/shape"] == values[result.tokens.index(" squares")]
    assert blue["scores"]["attention_share/colour"] == values[result.tokens.index(" blue")]
    assert error_type("red square", ["red circle", "blue square"]) == "binding"
    assert error_type("green star", ["red circle"]) == "neither"
    assert error_type("red star", ["red circle"]) == "colour"


def test_separation_gives_auroc_with_a_clustered_interval():
    records = [{"kind": "caption", "image": f"im{i % 6}", "hallucinated": i % 3 == 0, "rank": i % 2,
                "scores": {f"{s}/{a}": float(i % 3 != 0) + 0.1 * (i % 5)
                           for s in ("dependency_blank", "dependency_none", "attention_share")
                           for a in ("colour", "shape", "mean")}} for i in range(30)]
    out = separation(records, "caption", n_boot=200)
    assert (out["grounded"], out["hallucinated"], out["images"]) == (20, 10, 6)
    cell = out["auroc"]["attention_share/mean"]
    assert cell["estimate"] == pytest.approx(auroc(
        [r["scores"]["attention_share/mean"] for r in records if not r["hallucinated"]],
        [r["scores"]["attention_share/mean"] for r in records if r["hallucinated"]]))
    assert cell["low"] <= cell["estimate"] <= cell["high"]
    assert "note" in separation(records[:1], "caption")


def test_cli_prints_a_table_and_writes_json(shipped_checkpoint, image, tmp_path, capsys, one_torch_thread):
    path = tmp_path / "scene.png"
    image.save(path)
    out = tmp_path / "probe.json"
    rc = main(["probe", str(shipped_checkpoint), "--image", str(path), "--prompt", PROMPT, "--max-tokens", "4",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "dep blank" in text and "attn img" in text and f"prompt: {PROMPT}" in text
    data = json.loads(out.read_text())
    assert len(data["rows"]) == len(data["token_ids"]) <= 4
    assert set(data["rows"][0]) >= {"token", "logp_image", "logp_blank", "logp_none", "dependency_blank",
                                    "dependency_none", "attention_share"}


def test_cli_bad_inputs_exit_2(shipped_checkpoint, image, tmp_path, capsys):
    path = tmp_path / "scene.png"
    image.save(path)
    assert main(["probe", str(shipped_checkpoint), "--image", str(tmp_path / "nope.png"), "--prompt", "x"]) == 2
    assert "image file not found" in capsys.readouterr().err
    assert main(["probe", str(tmp_path / "no-ckpt"), "--image", str(path), "--prompt", "x"]) == 2
    assert "not an lmmkit checkpoint" in capsys.readouterr().err
    assert main(["probe-study", str(shipped_checkpoint), "--data", str(tmp_path / "no-data")]) == 2
    assert "no held-out scenes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["probe", str(shipped_checkpoint), "--image", str(path), "--prompt", "x", "--max-tokens", "0"])
    assert exit_info.value.code == 2


def test_cli_study_writes_json_table_and_plot(shipped_checkpoint, tmp_path, capsys, one_torch_thread):
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    scenes = [Scene("a", [SceneObject("red", "circle", 20, 20, 7), SceneObject("blue", "square", 44, 30, 6)]),
              Scene("b", [SceneObject("green", "star", 30, 25, 8)])]
    (data / "test" / "scenes.jsonl").write_text("".join(json.dumps(s.to_json()) + "\n" for s in scenes))
    out = tmp_path / "study"
    rc = main(["probe-study", str(shipped_checkpoint), "--data", str(data), "--n-images", "2", "--out", str(out),
               "--max-tokens", "8", "--n-boot", "50"])
    assert rc == 0
    study = json.loads((out / "probe_study.json").read_text())
    assert study["n_images"] == 2 and len(study["captions"]) == 2
    assert {q["image"] for q in study["questions"]} == {"a", "b"}
    assert "| caption |" in (out / "probe_study.md").read_text()
    assert (out / "probe_roc.svg").read_text().startswith("<svg")
    assert "AUROC" in capsys.readouterr().out


def test_within_rank_auroc_removes_a_position_confound():
    """Late mentions are hallucinated more often and score lower, but within a rank the score says nothing:
    the pooled AUROC is far from 0.5, the same-rank one is exactly 0.5, and the position control sees it."""
    records = []
    for i in range(40):
        rank = i % 2
        fake = i % 4 == 2 if rank == 0 else i % 8 != 3  # first mentions: half fake; second: mostly
        score = 1.0 - rank  # depends on the rank only
        records.append({"kind": "caption", "image": f"im{i}", "hallucinated": fake, "rank": rank,
                        "scores": {f"{s}/{a}": score for s in ("dependency_blank", "dependency_none",
                                                                "attention_share")
                                   for a in ("colour", "shape", "mean")}})
    out = separation(records, "caption", n_boot=100)
    assert out["auroc"]["dependency_blank/mean"]["estimate"] > 0.6
    assert out["within_rank"]["dependency_blank/mean"]["estimate"] == 0.5
    assert out["position_control"]["estimate"] == out["auroc"]["dependency_blank/mean"]["estimate"]
