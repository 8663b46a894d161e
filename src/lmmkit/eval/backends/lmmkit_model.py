"""The harness backend for lmmkit checkpoints: batched, each image encoded once per run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from lmmkit.data.collate import pad_batch
from lmmkit.data.schema import DataError
from lmmkit.eval.backends.base import (
    BackendError,
    GenerationSettings,
    Request,
    fingerprint_files,
    fingerprint_folder,
)
from lmmkit.eval.generation import generate_multi, prompt_ids
from lmmkit.eval.shared_prefix import generate_sharing_prefixes
from lmmkit.models.build import resolve_part
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.train.features import FeatureCache, image_key


class LmmkitBackend:
    """Answers with a VisionLanguageModel (any number of images per prompt, or none)."""

    def __init__(self, model: VisionLanguageModel, fingerprint: str, name: str = "lmmkit", batch_size: int = 64,
                 progress: bool = True, features: FeatureCache | None = None) -> None:
        self.model = model
        self.name = name
        self._fingerprint = fingerprint
        self.batch_size = batch_size
        self.progress = progress
        # Lives as long as the backend: an image shared by tasks is encoded once. Pass one in to share it
        # between backends over the same frozen tower (e.g. one per training stage).
        self.features = features if features is not None else FeatureCache()

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> LmmkitBackend:
        from lmmkit.train.checkpoint import checkpoint_chain, load_model

        chain, configs = checkpoint_chain(path)
        files = [p for ckpt in chain for p in ckpt.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json")]
        m = configs[0]["model"]
        base = [fingerprint_folder(Path(resolve_part(m[k]))) if Path(resolve_part(m[k])).is_dir() else str(m[k])
                for k in ("llm", "vision")]
        fingerprint = fingerprint_files(files) + ":" + ":".join(base)
        return cls(load_model(path), fingerprint, name=f"lmmkit:{Path(path).name}", **kwargs)

    def fingerprint(self) -> str:
        return self._fingerprint

    def generate(self, requests: Sequence[Request], settings: GenerationSettings) -> list[str | BackendError]:
        out: list[str | BackendError | None] = [None] * len(requests)
        ready = list(range(len(requests)))
        try:  # all images in big batches; only when one fails to load, find which, one by one
            self.features.fill(self.model, [im for i in ready for im in requests[i].images])
        except DataError:
            for i in list(ready):
                try:
                    self.features.fill(self.model, requests[i].images)
                except DataError as err:
                    out[i] = BackendError(str(err))
                    ready.remove(i)
        # Several images per prompt (e.g. the image-order attack twins): one placeholder per image, in order.
        multi = [i for i in ready if len(requests[i].images) > 1]
        if multi:
            answers = generate_multi(self.model, [(requests[i].images, requests[i].prompt) for i in multi],
                                     self.features, settings.max_new_tokens, settings.temperature, self.batch_size)
            for i, a in zip(multi, answers, strict=True):
                out[i] = a
            ready = [i for i in ready if len(requests[i].images) <= 1]
        # Questions about one image together (their shared prompt start runs once: eval/shared_prefix.py), then
        # similar prompt lengths: less padding, same answers (left padding is exact).
        ready.sort(key=lambda i: (image_key(requests[i].images[0]) if requests[i].images else "",
                                  len(requests[i].prompt)))
        model = self.model
        model.eval()
        steps = math.ceil(len(ready) / self.batch_size)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for b in tqdm(range(steps), desc=f"generate ({self.name})", unit="batch", disable=not self.progress):
                chunk = ready[b * self.batch_size:(b + 1) * self.batch_size]
                for with_image in (True, False):
                    rows = [i for i in chunk if bool(requests[i].images) == with_image]
                    if not rows:
                        continue
                    images = [requests[i].images[0] for i in rows] if with_image else []
                    ids = [prompt_ids(model, requests[i].prompt, with_image=with_image,
                                      image=images[k] if with_image else None) for k, i in enumerate(rows)]
                    new = generate_sharing_prefixes(model, images, ids, self.features, settings.max_new_tokens,
                                                    settings.temperature) if with_image else None
                    if new is None:
                        batch = pad_batch([(x, x) for x in ids], model.tokenizer.pad_token_id, side="left")
                        inputs = self.features.inputs(model, images) if with_image else {}
                        new = model.generate(batch["input_ids"], batch["attention_mask"], **inputs,
                                             max_new_tokens=settings.max_new_tokens, temperature=settings.temperature)
                    for i, t in zip(rows, new, strict=True):
                        out[i] = model.tokenizer.decode(t, skip_special_tokens=True).strip()
        return [o if o is not None else BackendError("no answer produced") for o in out]
