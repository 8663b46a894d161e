"""Self-generated preference pairs: sample the model's own captions and rank them against the truth.

For each image the model writes `samples` captions at temperature > 0; each caption's object
mentions (eval/chair.py) are checked against the scene: fewer hallucinated objects is better, then
more of the true objects. The best caption is `chosen`, the worst `rejected`; an image whose
samples all tie gives no pair. Unlike the injected pairs (data/shapes/preferences.py), these are
the errors this model actually makes (RLHF-V / self-rewarding style), ranked with no judge.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lmmkit import IMAGE_TOKEN
from lmmkit.data.preference import PreferenceRecord
from lmmkit.data.schema import Message
from lmmkit.eval.chair import ObjectVocabulary
from lmmkit.eval.generation import answer_questions
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.train.features import FeatureCache

CAPTION_PROMPT = "Describe the image in detail."


def caption_rank(caption: str, truth: Sequence[str], vocab: ObjectVocabulary) -> tuple[int, int]:
    """Sort key, smaller is better: (hallucinated objects, -true objects mentioned)."""
    named = vocab.mentions(caption)
    truth_set = set(truth)
    return (sum(n not in truth_set for n in named), -sum(n in truth_set for n in named))


def sample_answers(model: VisionLanguageModel, images: Sequence[Path], prompt: str, samples: int,
                   temperature: float = 1.0, top_p: float = 0.95, max_new_tokens: int = 64, seed: int = 0,
                   batch_size: int = 64, cache: FeatureCache | None = None) -> list[list[str]]:
    """`samples` sampled answers per image (seeded), each image's tower features computed once."""
    flat = [(im, prompt) for im in images for _ in range(samples)]
    texts = answer_questions(model, flat, batch_size=batch_size, max_new_tokens=max_new_tokens, cache=cache,
                             desc="sample answers", temperature=temperature, top_p=top_p,
                             generator=torch.Generator().manual_seed(seed))
    return [texts[k * samples:(k + 1) * samples] for k in range(len(images))]


def self_generated_pairs(model: VisionLanguageModel, images: Sequence[Path], truths: Sequence[Sequence[str]],
                         vocab: ObjectVocabulary, samples: int = 4, prompt: str = CAPTION_PROMPT,
                         temperature: float = 1.0, seed: int = 0, ids: Sequence[str] | None = None,
                         **kwargs) -> list[PreferenceRecord]:
    """One pair per image whose sampled captions differ in rank (best chosen, worst rejected)."""
    if samples < 2:
        raise ValueError(f"self-generated pairs need at least 2 samples per image, got {samples}")
    answers = sample_answers(model, images, prompt, samples, temperature=temperature, seed=seed, **kwargs)
    pairs = []
    for k, (image, truth, options) in enumerate(zip(images, truths, answers, strict=True)):
        ranked = sorted(options, key=lambda c: caption_rank(c, truth, vocab))
        best, worst = ranked[0], ranked[-1]
        if caption_rank(best, truth, vocab) == caption_rank(worst, truth, vocab) or best.strip() == worst.strip():
            continue
        rec_id = ids[k] if ids is not None else f"self-{k}"
        pairs.append(PreferenceRecord(rec_id, [Message("user", f"{IMAGE_TOKEN}\n{prompt}")], best, worst,
                                      images=[image]))
    return pairs
