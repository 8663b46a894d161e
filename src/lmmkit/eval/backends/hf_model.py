"""Backend for any Hugging Face image-text-to-text folder (Llava, LlavaNext, ...): processor + model.

The prompt is built with the processor's own chat template, so each model places its image tokens
the way it was trained; the harness only hands over plain (images, prompt) requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from lmmkit.eval.backends.base import BackendError, GenerationSettings, Request, fingerprint_folder


def load_image(image: Path | str | Image.Image) -> Image.Image:
    """An RGB PIL image; `convert` forces the full decode, so truncated files fail here, not in the batch."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def load_images(images: Sequence[Path | str | Image.Image], index: int) -> list[Image.Image] | BackendError:
    """The request's images, or a BackendError naming the request and the file that failed."""
    loaded = []
    for image in images:
        try:
            loaded.append(load_image(image))
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # missing, unreadable, truncated
            where = "in-memory image" if isinstance(image, Image.Image) else str(image)
            return BackendError(f"request {index}: cannot load image {where}: {e}")
    return loaded


class HFImageTextBackend:
    """Answers requests with an `AutoModelForImageTextToText` folder, in left-padded batches.

    `dtype` None keeps the checkpoint's own dtype; `device` None picks CUDA when there is one.
    """

    def __init__(self, path: str | Path, batch_size: int = 8, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> None:
        self.path = Path(path)
        self.name = f"hf:{self.path.name}"
        self.batch_size = batch_size
        # Check the config before touching weights, so a plain LM folder fails fast and clearly.
        config = AutoConfig.from_pretrained(self.path)
        if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
            raise ValueError(f"{self.path} is not an image-text-to-text model (config {type(config).__name__}, "
                             f"model_type {config.model_type!r}); HFImageTextBackend needs e.g. a Llava folder")
        self.processor = AutoProcessor.from_pretrained(self.path)
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"the processor in {self.path} has no chat template; add chat_template.jinja "
                             "(or chat_template.json) so prompts can be built the way the model expects")
        tokenizer = self.processor.tokenizer
        # Left padding: every prompt ends at the same column, so generation continues each one directly
        # and the new tokens start at the same index in every row.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=dtype).eval()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(device)
        # Hashed once, at load, from the files just loaded. The response cache keys on this, so retrained
        # weights in the same folder get a new key and never reuse stale answers; caching it saves
        # re-reading gigabytes of weights every time the harness asks.
        # Weights, config, tokenizer files and chat template, plus the dtype: anything that changes answers.
        self._fingerprint = f"{fingerprint_folder(self.path)}:{self.model.dtype}"

    def fingerprint(self) -> str:
        """Digest of the folder's config, tokenizer, template and weight files + the dtype, computed at load."""
        return self._fingerprint

    def prompt_text(self, request: Request) -> str:
        """The chat-templated prompt: one image entry per image, then the text, then the assistant turn."""
        content = [{"type": "image"} for _ in request.images] + [{"type": "text", "text": request.prompt}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def generate(self, requests: Sequence[Request], settings: GenerationSettings) -> list[str | BackendError]:
        """One answer per request, in order; an unreadable image gives a BackendError in its slot."""
        answers: dict[int, str | BackendError] = {}
        for start in range(0, len(requests), self.batch_size):
            batch: list[tuple[int, str, list[Image.Image]]] = []
            for i in range(start, min(start + self.batch_size, len(requests))):
                images = load_images(requests[i].images, i)
                if isinstance(images, BackendError):
                    answers[i] = images  # the rest of the batch still answers
                else:
                    batch.append((i, self.prompt_text(requests[i]), images))
            if batch:
                texts = self._generate_batch([text for _, text, _ in batch],
                                             [im for _, _, ims in batch for im in ims], settings)
                for (i, _, _), text in zip(batch, texts, strict=True):
                    answers[i] = text
        return [answers[i] for i in range(len(requests))]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[str], images: list[Image.Image],
                        settings: GenerationSettings) -> list[str]:
        tokenizer = self.processor.tokenizer
        # A template that already writes BOS must not get a second one from the tokenizer.
        bos = tokenizer.bos_token
        add_special = not (bos is not None and prompts[0].startswith(bos))
        inputs = self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt",
                                add_special_tokens=add_special)
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        sampling = settings.temperature > 0
        # Greedy is requested explicitly (and temperature/top_p/top_k cleared) so a generation_config.json
        # that enables sampling cannot make benchmark answers random.
        decode = ({"do_sample": True, "temperature": settings.temperature} if sampling
                  else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
        output = self.model.generate(**inputs, max_new_tokens=settings.max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, **decode)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
