"""A text-only backend over any HF causal LM folder (AutoModelForCausalLM + its chat template):
the local-model option for LLM judges."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmmkit.eval.backends.base import BackendError, GenerationSettings, Request, fingerprint_folder


class HFTextBackend:
    def __init__(self, path: str | Path, batch_size: int = 8) -> None:
        self.path = Path(path)
        self.name = f"hf-text:{self.path.name}"
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.path}: the tokenizer has no chat template; a judge needs one")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.path).eval()
        self.batch_size = batch_size
        self._fingerprint = f"{fingerprint_folder(self.path)}:{self.model.dtype}"

    def fingerprint(self) -> str:
        return self._fingerprint

    def generate(self, requests: Sequence[Request], settings: GenerationSettings) -> list[str | BackendError]:
        out: list[str | BackendError] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}], tokenize=False,
                                                        add_generation_prompt=True) for r in chunk]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            sample = settings.temperature > 0
            with torch.no_grad():
                ids = self.model.generate(**enc, max_new_tokens=settings.max_new_tokens, do_sample=sample,
                                          temperature=settings.temperature if sample else None, top_p=None, top_k=None,
                                          pad_token_id=self.tokenizer.pad_token_id)
            new = ids[:, enc["input_ids"].shape[1]:]
            for r, row in zip(chunk, new, strict=True):
                out.append(BackendError("a text-only judge cannot see images") if r.images
                           else self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return out
