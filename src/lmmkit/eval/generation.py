"""Batched question answering for evaluation: each image encoded once, prompts left-padded."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm import tqdm

from lmmkit import IMAGE_TOKEN
from lmmkit.data.collate import expand_image_tokens, pad_batch
from lmmkit.data.dataset import EncodedSample
from lmmkit.data.schema import Message
from lmmkit.data.templates import encode_prompt
from lmmkit.eval.shared_prefix import generate_sharing_prefixes
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.train.features import FeatureCache
from lmmkit.train.loop import make_batch


def prompt_ids(model: VisionLanguageModel, question: str, with_image: bool = True, image: object = None) -> list[int]:
    """The generation prompt "<image>\n{question}" with the image's placeholder tokens expanded.

    `image` (a path or PIL image) is needed only when the model's token count depends on the image's
    size (AnyRes); a fixed-count model expands to `tokens_per_image` without it."""
    if with_image and model.tokens_per_image is None and image is None:
        raise ValueError("this model's visual tokens depend on the image's size (AnyRes): pass image= to prompt_ids")
    return images_prompt_ids(model, question, [image] if with_image else [])


def images_prompt_ids(model: VisionLanguageModel, question: str, images: Sequence) -> list[int]:
    """The generation prompt with one "<image>\n" per image, in order, then the question; every placeholder
    expanded to its image's token count (a fixed-count model needs no image, only one entry per placeholder)."""
    content = "\n".join([IMAGE_TOKEN] * len(images) + [question])
    ids = encode_prompt(model.tokenizer, [Message("user", content)])
    if not images:
        return ids
    counts = model.tokens_per_image if model.tokens_per_image is not None else model.image_token_counts(list(images))
    ids, _ = expand_image_tokens(ids, ids, model.image_token_id, counts)
    return ids


def answer_questions(model: VisionLanguageModel, items: Sequence[tuple[object, str]], batch_size: int = 128,
                     max_new_tokens: int = 16, cache: FeatureCache | None = None, desc: str = "answer",
                     progress: bool = True, share_prefixes: bool = True, temperature: float = 0.0,
                     top_p: float = 1.0, generator: torch.Generator | None = None) -> list[str]:
    """Answers to (image, question) pairs: greedy, or sampled with temperature > 0 (top_p, `generator`).
    Images (paths or PIL) are encoded once each; with `share_prefixes` (greedy only), the prompt start shared
    by the questions about one image (chat header and image tokens) also goes through the LLM once per batch
    (eval/shared_prefix.py): same answers, less work."""
    share_prefixes = share_prefixes and temperature <= 0
    model.eval()
    cache = cache if cache is not None else FeatureCache()
    cache.fill(model, [im for im, _ in items])
    answers: list[str] = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", disable=not progress,
                      total=math.ceil(len(items) / batch_size)):
            chunk = items[i:i + batch_size]
            ids = [prompt_ids(model, q, image=im) for im, q in chunk]
            images = [im for im, _ in chunk]
            out = generate_sharing_prefixes(model, images, ids, cache, max_new_tokens) if share_prefixes else None
            if out is None:
                batch = pad_batch([(x, x) for x in ids], model.tokenizer.pad_token_id, side="left")
                out = model.generate(batch["input_ids"], batch["attention_mask"], **cache.inputs(model, images),
                                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     generator=generator)
            answers += [model.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out]
    return answers


def generate_multi(model: VisionLanguageModel, requests: Sequence[tuple[Sequence, str]], features: FeatureCache,
                   max_new_tokens: int, temperature: float = 0.0, batch_size: int = 64) -> list[str]:
    """Answers to prompts with any number of images each ("<image>\\n" per image, in order, then the
    question): the VLM splices each placeholder's features in order, so several images per sample work
    as in training. Greedy by default; the tower's features come from (and go into) `features`."""
    features.fill(model, [im for ims, _ in requests for im in ims])
    out: list[str] = [""] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][1]))
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for b in range(0, len(order), batch_size):
            chunk = order[b:b + batch_size]
            ids = [images_prompt_ids(model, requests[i][1], requests[i][0]) for i in chunk]
            batch = pad_batch([(x, x) for x in ids], model.tokenizer.pad_token_id, side="left")
            images = [im for i in chunk for im in requests[i][0]]
            inputs = features.inputs(model, images) if images else {}
            new = model.generate(batch["input_ids"], batch["attention_mask"], **inputs,
                                 max_new_tokens=max_new_tokens, temperature=temperature)
            for i, t in zip(chunk, new, strict=True):
                out[i] = model.tokenizer.decode(t, skip_special_tokens=True).strip()
    return out


def lm_loss(model: VisionLanguageModel, samples: Sequence[EncodedSample], batch_size: int = 64,
            cache: FeatureCache | None = None) -> dict:
    """Mean token cross-entropy on answer tokens only, and perplexity (the seed paper's LM metric)."""
    model.eval()
    cache = cache if cache is not None else FeatureCache()
    cache.fill(model, [im for s in samples for im in s.images])
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(samples), batch_size):
            batch = make_batch(model, list(samples[i:i + batch_size]), cache, model.tokenizer.pad_token_id)
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            mask = shift_labels != -100
            ce = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
            total += ce.item()
            count += int(mask.sum())
    mean = total / max(1, count)
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count}
