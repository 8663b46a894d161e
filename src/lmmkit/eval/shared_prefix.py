"""Greedy answers for prompts that share their start: each shared prefix goes through the LLM once.

Why: benchmarks ask several questions about one image (POPE asks six), and every prompt opens with the same
chat header and the image's placeholder tokens, most of its length. The feature cache already encodes each
image once; this also runs the LLM over that common start once per image, then copies its KV cache to the
rows that continue it, so each question costs only its own tokens. The answers are the ones the unshared
batch gives (`tests/eval/test_shared_prefix.py`): the same positions, the same keys and values, only
computed in another batch (so equal up to the rounding any change of batch composition brings).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from lmmkit.data.collate import pad_batch
from lmmkit.models.vlm import VisionLanguageModel, decode
from lmmkit.train.features import FeatureCache, image_key


def shared_prefixes(ids: Sequence[list[int]], groups: Sequence[list[int]], image_token_id: int
                    ) -> list[int] | None:
    """Per group of rows (the questions about one image), the length of the prefix its rows all share, capped so
    that every row keeps at least its last token to prefill; None when an image token would fall outside it."""
    lengths = []
    for rows in groups:
        first = ids[rows[0]]
        n = min(len(ids[r]) for r in rows) - 1
        for r in rows[1:]:
            n = next((k for k in range(n) if ids[r][k] != first[k]), n)
        if any(t == image_token_id for r in rows for t in ids[r][n:]):
            return None  # the image must be spliced in the prefix pass, the only one that sees features
        lengths.append(n)
    return lengths


@torch.no_grad()
def generate_sharing_prefixes(model: VisionLanguageModel, images: Sequence, ids: Sequence[list[int]],
                              cache: FeatureCache, max_new_tokens: int, temperature: float = 0.0
                              ) -> list[list[int]] | None:
    """New token ids per row, like `model.generate` on the left-padded `ids`, or None when sharing does not apply
    (no image asked about twice, or a model that decodes its own way, such as cross-attention)."""
    if type(model).generate is not VisionLanguageModel.generate:
        return None
    by_image: dict[str, list[int]] = {}
    for row, image in enumerate(images):
        by_image.setdefault(image_key(image), []).append(row)
    groups = list(by_image.values())
    if len(groups) == len(ids):
        return None
    lengths = shared_prefixes(ids, groups, model.image_token_id)
    if lengths is None:
        return None
    pad = model.tokenizer.pad_token_id
    prefix = pad_batch([(ids[rows[0]][:n],) * 2 for rows, n in zip(groups, lengths, strict=True)], pad, side="left")
    inputs = cache.inputs(model, [images[rows[0]] for rows in groups])
    embeds = model.embed(prefix["input_ids"], model.encode_images(**inputs))
    kv = DynamicCache()
    mask = prefix["attention_mask"]
    model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
              cache=kv, use_cache=True)
    owner = [0] * len(ids)
    for g, rows in enumerate(groups):
        for r in rows:
            owner[r] = g
    index = torch.tensor(owner)
    kv.batch_select_indices(index)  # each row starts from its image's prefix
    rest = pad_batch([(ids[r][lengths[owner[r]]:],) * 2 for r in range(len(ids))], pad, side="left")
    full_mask = torch.cat([mask[index], rest["attention_mask"]], dim=1)
    return decode(model.llm, {"input_ids": rest["input_ids"]}, full_mask, model.tokenizer.eos_token_id,
                  max_new_tokens, temperature, cache=kv)


__all__ = ["generate_sharing_prefixes", "shared_prefixes"]
