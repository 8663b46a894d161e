"""The text-only LM pretraining's measurements (the training itself runs in the demo's from-scratch test)."""

from __future__ import annotations

from lmmkit.data.shapes.world import World
from lmmkit.train.pretrain_lm import false_yes_rates, symbolic_conversation, tiny_lm_config


def test_false_yes_rates_tell_a_yes_sayer_from_a_no_sayer(tiny_tokenizer, one_torch_thread):
    """An LM biased to "Yes" scores 1.0 everywhere, one biased to "No" 0.0: the rates measure answers."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_lm_config(len(tiny_tokenizer), tiny_tokenizer.pad_token_id,
                                            tiny_tokenizer.eos_token_id)).eval()
    yes_id = tiny_tokenizer.convert_tokens_to_ids(tiny_tokenizer.tokenize("Yes"))[0]
    for bias, expected in ((50.0, 1.0), (-50.0, 0.0)):
        with torch.no_grad():
            model.lm_head.weight.zero_()  # (tied to the embeddings) every logit is its bias alone
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tiny_tokenizer)))
        model.lm_head.bias.data[yes_id] = bias
        rates = false_yes_rates(model, tiny_tokenizer, World(), n=8)
        assert set(rates) == {f"{s}_{k}_yes_rate" for s in ("train", "heldout") for k in ("present", "hard", "random")}
        assert all(v == expected for v in rates.values()), (bias, rates)


def test_symbolic_documents_tell_the_scene_then_ask():
    import random

    world = World()
    rng = random.Random(0)
    msgs = symbolic_conversation(rng, world, world.sample_scene(rng, "s", held_out=False))
    assert msgs[0].role == "user" and msgs[0].content.startswith("scene: ")
    assert [m.role for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)


def test_the_scene_names_each_object_with_one_token_of_the_shipped_lm():
    """The symbolic scene gives one token per object (as the image gives one token per object cell) and the
    shipped LM's tokenizer has every one of them; questions still name the object in words."""
    import random

    from transformers import AutoTokenizer

    from lmmkit.data.shapes.text import OBJECT_TOKENS, symbolic_scene
    from lmmkit.models.parts import PARTS_DIR

    world = World()
    scene = world.sample_scene(random.Random(3), "s", held_out=False, min_objects=3)
    text = symbolic_scene(scene)
    assert text.startswith("scene: " + OBJECT_TOKENS[scene.names[0]])
    tok = AutoTokenizer.from_pretrained(PARTS_DIR / "lm")
    for name, token in OBJECT_TOKENS.items():
        assert tok.tokenize(token) == [token], name  # one token, not pieces
        assert token in tok.tokenize(f"scene: {token}, x"), name  # kept whole inside a scene too
    assert len(set(OBJECT_TOKENS.values())) == 64
