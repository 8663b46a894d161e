"""Pretrain the tiny ShapesWorld language model, text only.

The LM reads symbolic scene descriptions ("scene: <red_circle>, <blue_square>; text DOG.": one token per
object, as the VLM gets one image token per object cell) where the VLM will later see the image,
followed by the same kinds of questions and answers the VLM is fine-tuned on (mostly "is there a
<colour> <shape>?"). So before it ever sees an image, the LM knows how to answer about a scene it is
told; the bridge then has to make image features read like that description. Measured here: an
untrained LM inside the VLM binds question words to image tokens far too slowly for a minutes-long
demo. See docs/parts.md for what was tried.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmmkit.data.collate import pad_batch
from lmmkit.data.schema import Message
from lmmkit.data.shapes.text import (
    OBJECT_TOKENS,
    QUESTION_KINDS,
    SYMBOLIC_QUESTION_KINDS,
    conversation,
    symbolic_scene,
)
from lmmkit.data.shapes.world import Scene, World
from lmmkit.data.templates import encode_conversation, encode_prompt
from lmmkit.models.tokenizer import train_tokenizer


def tiny_lm_config(vocab_size: int, pad_token_id: int, eos_token_id: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       tie_word_embeddings=True, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                       bos_token_id=None, rope_theta=10000.0)


def symbolic_conversation(rng: random.Random, world: World, scene: Scene) -> list[Message]:
    """One training document: the scene told in words, then questions about it."""
    return conversation(rng, world, scene, turns=rng.randint(2, 6), image_slot=symbolic_scene(scene),
                        kinds=SYMBOLIC_QUESTION_KINDS)


def false_yes_rates(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, world: World, n: int = 400,
                    seed: int = 5) -> dict[str, float]:
    """How often the text-only LM says "yes" about a scene it is told, by kind of object asked about:
    present, hard absent (sharing a colour or a shape with a present object: the binding test that
    POPE's adversarial split sets) and random absent; on training-like and on held-out scenes.
    This is the VLM's dominant error measured in minutes, before any image is involved."""
    from lmmkit.data.english import article
    from lmmkit.data.shapes.text import SHORT_ANSWER
    from lmmkit.data.shapes.world import CLASSES

    rng = random.Random(seed)
    yes_id = tok.convert_tokens_to_ids(tok.tokenize("Yes"))[0]
    no_id = tok.convert_tokens_to_ids(tok.tokenize("No"))[0]
    rates: dict[str, float] = {}
    model.eval()
    for held_out in (False, True):
        prompts: dict[str, list[list[int]]] = {"present": [], "hard": [], "random": []}
        for k in range(n):
            scene = world.sample_scene(rng, f"b{k}", held_out=held_out, min_objects=3)
            anchor = rng.choice(scene.objects)
            hard = [c for c in CLASSES if c not in scene.names
                    and (c.startswith(anchor.colour + " ") or c.endswith(" " + anchor.shape))]
            asked = {"present": rng.choice(scene.names), "hard": rng.choice(hard),
                     "random": rng.choice([c for c in CLASSES if c not in scene.names])}
            for kind, name in asked.items():
                q = f"{symbolic_scene(scene)}\nIs there {article(name)} {name} in the image?\n{SHORT_ANSWER}"
                prompts[kind].append(encode_prompt(tok, [Message("user", q)]))
        for kind, ids in prompts.items():
            said_yes = 0
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                for i in range(0, len(ids), 128):
                    batch = pad_batch([(p, p) for p in ids[i:i + 128]], tok.pad_token_id, side="left")
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1]
                    said_yes += int((logits[:, yes_id] > logits[:, no_id]).sum())
            rates[f"{'heldout' if held_out else 'train'}_{kind}_yes_rate"] = round(said_yes / len(ids), 4)
    model.train()
    return rates


@dataclass
class LMPretrainResult:
    steps: int
    seconds: float
    final_loss: float
    existence_f1: float  # yes/no existence questions about held-out symbolic scenes
    false_yes: dict[str, float]  # `false_yes_rates`: the binding errors the VLM inherits


def existence_f1(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, world: World, n: int = 400,
                 seed: int = 99) -> float:
    """F1 of greedy first-token Yes/No answers on held-out symbolic scenes (yes = positive)."""
    rng = random.Random(seed)
    only_existence = {"existence": QUESTION_KINDS["existence"]}
    prompts, truth = [], []
    for k in range(n):
        scene = world.sample_scene(rng, f"h{k}", held_out=True, min_objects=3)
        msgs = conversation(rng, world, scene, 1, image_slot=symbolic_scene(scene), kinds=only_existence)
        prompts.append(encode_prompt(tok, msgs[:1]))
        truth.append(msgs[1].content.lower().startswith("yes"))
    yes_id = tok.convert_tokens_to_ids(tok.tokenize("Yes"))[0]
    no_id = tok.convert_tokens_to_ids(tok.tokenize("No"))[0]
    model.eval()
    preds = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, n, 128):
            batch = pad_batch([(p, p) for p in prompts[i:i + 128]], tok.pad_token_id, side="left")
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1]
            preds += (logits[:, yes_id] > logits[:, no_id]).tolist()
    model.train()
    tp = sum(p and t for p, t in zip(preds, truth, strict=True))
    fp = sum(p and not t for p, t in zip(preds, truth, strict=True))
    fn = sum(t and not p for p, t in zip(preds, truth, strict=True))
    return 2 * tp / max(1, 2 * tp + fp + fn)


def pretrain_lm(out: Path, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                vocab_size: int = 768, eval_every: int = 250) -> LMPretrainResult:
    """Train tokenizer + LM on symbolic ShapesWorld text; save an HF folder (model + tokenizer)."""
    world = World()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tok_docs = [symbolic_conversation(rng, world, world.sample_scene(rng, f"t{k}", held_out=False))
                for k in range(3000)]
    tok = train_tokenizer(_chat_texts(tok_docs), vocab_size=vocab_size)
    tok.add_tokens(list(OBJECT_TOKENS.values()))  # one token per object in the symbolic scenes
    model = LlamaForCausalLM(tiny_lm_config(len(tok), tok.pad_token_id, tok.eos_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    start = time.time()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc="pretrain lm", unit="step")
    pending: list[list[tuple[list[int], list[int]]]] = []
    for step in bar:
        if not pending:
            pending = _length_grouped_batches(rng, world, tok, batch_size, step)
        batch = pad_batch(pending.pop(), tok.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            bar.write(f"step {step + 1}: held-out symbolic existence F1 {existence_f1(model, tok, world, n=256):.3f}")
    f1 = existence_f1(model, tok, world)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return LMPretrainResult(steps, time.time() - start, loss_value, f1, false_yes_rates(model, tok, world))


def _length_grouped_batches(rng: random.Random, world: World, tok: PreTrainedTokenizerFast, batch_size: int,
                            step: int, group: int = 16) -> list[list[tuple[list[int], list[int]]]]:
    """Draw `group` batches of documents at once and batch similar lengths together (less padding)."""
    docs = [encode_conversation(tok, symbolic_conversation(rng, world, world.sample_scene(rng, f"s{step}-{k}", False)))
            for k in range(batch_size * group)]
    docs.sort(key=lambda d: len(d[0]))
    batches = [docs[i:i + batch_size] for i in range(0, len(docs), batch_size)]
    rng.shuffle(batches)
    return batches


def _chat_texts(docs: list[list[Message]]) -> list[str]:
    from lmmkit.models.tokenizer import CHAT_TEMPLATE  # noqa: F401  (the corpus is rendered with it)

    texts = []
    for msgs in docs:
        for m in msgs:
            texts.append(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n")
    return texts
