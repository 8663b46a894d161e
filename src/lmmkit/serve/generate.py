"""Step-wise batched generation for the server, and incremental detokenization with stop strings.

`generate_steps` is VisionLanguageModel.generate's KV-cache loop (same prefill, positions, mask
growth and greedy pick, so greedy answers are the same tokens), turned into a generator that
yields one token per row per step, so answers can stream. Unlike generate, each row has its own
max_new_tokens, temperature, top_p and random generator, and the caller can finish a row early
(a stop string matched, the client went away).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from lmmkit.models.vlm import VisionLanguageModel


@dataclass
class RowSettings:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None


def pick_tokens(logits: torch.Tensor, settings: Sequence[RowSettings]) -> torch.Tensor:
    """Greedy rows take the argmax (as VisionLanguageModel.generate); sampling rows use their own generator,
    so a seeded request samples the same tokens whichever batch it lands in."""
    token = logits.argmax(-1)
    for i, s in enumerate(settings):
        if s.temperature > 0:
            probs = torch.softmax(logits[i] / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_p, idx = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # always keeps the most likely token
                probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
            token[i] = torch.multinomial(probs, 1, generator=s.generator)[0]
    return token


@torch.no_grad()
def generate_steps(model: VisionLanguageModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_embeds: torch.Tensor | None, settings: Sequence[RowSettings],
                   finished: list[bool]) -> Iterator[list[tuple[int | None, str | None]]]:
    """Per step, one (token, finish_reason) per row: token None once a row has ended; finish_reason
    "stop" at the end-of-turn token (not yielded as a token), "length" with the row's last token.

    Prompts must be left-padded. The caller may set finished[i] = True at any time to end row i.
    """
    eos = model.tokenizer.eos_token_id
    batch = input_ids.shape[0]
    embeds = model.embed(input_ids, image_embeds)
    mask = attention_mask.clone()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    # logits_to_keep=1: only the last position's logits are used; the others would cost vocab x length.
    out = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, cache=cache,
                    use_cache=True, logits_to_keep=1)
    counts = [0] * batch
    next_pos = position_ids[:, -1:] + 1
    while not all(finished):
        token = pick_tokens(out.logits[:, -1].float(), settings)
        step: list[tuple[int | None, str | None]] = []
        for i in range(batch):
            t = int(token[i])
            if finished[i]:
                step.append((None, None))
            elif t == eos:
                finished[i] = True
                step.append((None, "stop"))
            else:
                counts[i] += 1
                finished[i] = counts[i] >= settings[i].max_new_tokens
                step.append((t, "length" if finished[i] else None))
        yield step
        if all(finished):
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        out = model.llm(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=next_pos, cache=cache,
                        use_cache=True)
        next_pos = next_pos + 1


class TextStream:
    """Token ids in, text deltas out; never emits text that a stop string could still claim."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already emitted

    def add(self, token: int) -> tuple[str, bool]:
        """The new text that is safe to emit, and whether a stop string ended the answer."""
        self.ids.append(token)
        # Decoding the whole answer each step keeps merges and multi-byte characters right.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[:min(hits)]
            return self.flush(), True
        self.text = text
        safe = len(text.rstrip("\ufffd"))  # a character split across tokens decodes to U+FFFD until complete
        for k in range(min(max((len(s) for s in self.stop), default=1) - 1, safe - self.sent), 0, -1):
            if any(s.startswith(text[safe - k:safe]) for s in self.stop):
                safe -= k  # could be the start of a stop string: hold it back
                break
        delta, self.sent = text[self.sent:safe], max(self.sent, safe)
        return delta, False

    def flush(self) -> str:
        """Whatever is held back, at the end of the answer."""
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta
