"""VisionLanguageModel: encode images -> bridge -> splice into the text embeddings -> LLM.

This file is the whole forward pass. The processor side (chat template, `<image>` expanded to
one placeholder token per visual token) lives in lmmkit.data; here every placeholder is
replaced by one bridged image feature, after checking that the counts agree.

Most bridges give every image the same number of tokens (`tokens_per_image`). A bridge that sets
`variable_tokens` (AnyRes: `models/anyres_tower.py`) gives each image as many as its size asks
for: `tokens_per_image` is then None, `image_token_counts(images)` says how many, and every call
that bridges features passes the images' (height, width) as `image_sizes`, as HF LlavaNext does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from lmmkit import IMAGE_TOKEN
from lmmkit.data.images import image_size
from lmmkit.models.bridges import MLPBridge
from lmmkit.models.vision import VisionTower

Size = tuple[int, int]  # (height, width)
ImageEmbeds = torch.Tensor | Sequence[torch.Tensor]  # (n_images, N, D), (total tokens, D) or per image (n_i, D)


class ImageTokenMismatchError(ValueError):
    """The text holds a different number of image placeholders than there are image features."""


class VisionLanguageModel(nn.Module):
    def __init__(self, vision: VisionTower, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 bridge: nn.Module | None = None, bridge_layers: int = 2) -> None:
        super().__init__()
        self.vision = vision
        self.llm = llm
        self.tokenizer = tokenizer
        self.bridge = bridge or MLPBridge(vision.hidden_size, llm.config.hidden_size, bridge_layers)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.variable_tokens = bool(getattr(self.bridge, "variable_tokens", False))
        # None: each image's count depends on its size (image_token_counts).
        self.tokens_per_image: int | None = None if self.variable_tokens else \
            self.bridge.num_output_tokens(vision.num_tokens())

    # ---- images ---------------------------------------------------------------------------
    def image_sizes(self, images: Sequence, where: str = "") -> list[Size] | None:
        """(height, width) per image (paths: read from the header) when the model's features depend on it,
        else None, and no file is opened."""
        if not self.variable_tokens:
            return None
        return [image_size(im, where) for im in images]

    def image_token_counts(self, images: Sequence, where: str = "") -> list[int]:
        """Visual tokens each image (path or PIL image) takes: the `<image>` expansion counts."""
        if not self.variable_tokens:
            return [self.tokens_per_image] * len(images)
        return [self.bridge.token_count(size) for size in self.image_sizes(images, where)]

    def split_features(self, features: torch.Tensor, image_sizes: Sequence[Size] | None = None
                       ) -> list[torch.Tensor]:
        """Tower output -> one tensor per image (what a feature cache keeps): (N, D) rows of a (B, N, D)
        batch, or for AnyRes the (views_i, N, D) block of each image in the flat batch of views."""
        if not self.variable_tokens:
            return list(features)
        return list(torch.split(features, self.vision.views_per_image(_need_sizes(image_sizes))))

    def join_features(self, per_image: Sequence[torch.Tensor]) -> torch.Tensor:
        """The inverse of split_features: a batch of tower features the bridge takes."""
        return torch.cat(list(per_image)) if self.variable_tokens else torch.stack(list(per_image))

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tower output (n_images, tokens_per_image, vision_dim), for AnyRes (total views, N, vision_dim);
        cacheable while the tower is frozen."""
        return self.vision(pixel_values.to(self.vision.dtype))

    def encode_images(self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
                      image_sizes: Sequence[Size] | torch.Tensor | None = None) -> ImageEmbeds:
        """Bridged image embeddings (n_images, tokens_per_image, llm_dim), from pixels or cached features;
        with variable counts (AnyRes) a list of (tokens_i, llm_dim), one per image of `image_sizes`."""
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("encode_images needs pixel_values or vision_features")
            vision_features = self.vision_features(pixel_values)
        if self.variable_tokens:
            return self.bridge(vision_features.to(self.bridge_dtype), _need_sizes(image_sizes))
        return self.bridge(vision_features.to(self.bridge_dtype))

    @property
    def bridge_dtype(self) -> torch.dtype:
        return next(self.bridge.parameters()).dtype

    # ---- splicing -------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_embeds: ImageEmbeds | None,
              sample_ids: Sequence[str] | None = None) -> torch.Tensor:
        """Text embeddings with each image placeholder replaced by one image feature, in order.

        image_embeds: (n_images, N, D) (fixed counts), one (total tokens, D) tensor, or a list of
        per-image (n_i, D) tensors (variable counts), images in placeholder order."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        n_slots = int(is_image.sum())
        per_image = _per_image_lengths(image_embeds)
        batched = image_embeds is None or (isinstance(image_embeds, torch.Tensor) and image_embeds.dim() == 3)
        if n_slots != sum(per_image):
            if self.tokens_per_image is not None and batched:  # fixed counts: say how many images' worth
                raise ImageTokenMismatchError(self._mismatch_message(is_image, image_embeds, sample_ids))
            raise ImageTokenMismatchError(_variable_mismatch_message(is_image.sum(1).tolist(), per_image, sample_ids))
        if not isinstance(image_embeds, torch.Tensor) and image_embeds is not None:
            # Per-image lengths differ, so equal totals can still hide images in the wrong rows: each row's
            # placeholders must be filled exactly by the next images in order.
            per_row = is_image.sum(1).tolist()
            if _first_misfit(per_row, per_image, [str(i) for i in range(len(per_row))]):
                raise ImageTokenMismatchError(_variable_mismatch_message(per_row, per_image, sample_ids))
        if n_slots == 0:
            return embeds
        if isinstance(image_embeds, torch.Tensor):
            feats = image_embeds.reshape(-1, image_embeds.shape[-1])
        else:
            feats = torch.cat(list(image_embeds))
        return embeds.masked_scatter(is_image.unsqueeze(-1), feats.to(embeds.dtype))

    def _mismatch_message(self, is_image: torch.Tensor, image_embeds: torch.Tensor | None,
                          sample_ids: Sequence[str] | None) -> str:
        per_row = is_image.sum(1).tolist()
        n_images = 0 if image_embeds is None else image_embeds.shape[0]
        total = sum(per_row)
        detail = ", ".join(
            f"{sample_ids[i] if sample_ids else f'row {i}'}: {n} placeholder tokens"
            f" ({n / self.tokens_per_image:g} images' worth)"
            for i, n in enumerate(per_row) if n % self.tokens_per_image
        ) or ", ".join(f"{sample_ids[i] if sample_ids else f'row {i}'}: {n}" for i, n in enumerate(per_row))
        return (f"image token count mismatch: the text has {total} image placeholder tokens but {n_images} images "
                f"give {n_images * self.tokens_per_image} features ({self.tokens_per_image} per image). "
                f"Per sample: {detail}")

    # ---- forward --------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                vision_features: torch.Tensor | None = None, sample_ids: Sequence[str] | None = None,
                image_sizes: Sequence[Size] | torch.Tensor | None = None, **llm_kwargs) -> CausalLMOutputWithPast:
        image_embeds = None
        if pixel_values is not None or vision_features is not None:
            image_embeds = self.encode_images(pixel_values, vision_features, image_sizes)
        inputs_embeds = self.embed(input_ids, image_embeds, sample_ids)
        if torch.is_grad_enabled():
            # Training never reads a KV cache; HF LLMs build one by default (config.use_cache), and its per-layer
            # state breaks torch.compile's guards (a recompile per layer). Generation asks for one explicitly.
            llm_kwargs.setdefault("use_cache", False)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **llm_kwargs)

    # ---- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
                 image_embeds: ImageEmbeds | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None,
                 image_sizes: Sequence[Size] | torch.Tensor | None = None) -> list[list[int]]:
        """Batched generation with a KV cache. Prompts must be left-padded. temperature 0 = greedy.

        Returns the new token ids per row, cut at (and excluding) the end-of-turn token.
        """
        if image_embeds is None and (pixel_values is not None or vision_features is not None):
            image_embeds = self.encode_images(pixel_values, vision_features, image_sizes)
        return decode(self.llm, {"inputs_embeds": self.embed(input_ids, image_embeds)}, attention_mask,
                      self.tokenizer.eos_token_id, max_new_tokens, temperature, top_p, generator)


def _need_sizes(image_sizes: Sequence[Size] | torch.Tensor | None) -> list[Size]:
    """(height, width) tuples from a list or an (n, 2) tensor; a variable-count model cannot go without."""
    if image_sizes is None:
        raise ValueError("this model's visual tokens depend on each image's size (AnyRes): pass image_sizes, "
                         "the (height, width) of every image, in order")
    rows = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes
    return [(int(h), int(w)) for h, w in rows]


def _per_image_lengths(image_embeds: ImageEmbeds | None) -> list[int]:
    if image_embeds is None:
        return []
    if isinstance(image_embeds, torch.Tensor):
        if image_embeds.dim() == 3:
            return [image_embeds.shape[1]] * image_embeds.shape[0]
        return [image_embeds.shape[0]]  # one flat (total tokens, D) block
    return [e.shape[0] for e in image_embeds]


def _variable_mismatch_message(per_row: list[int], per_image: list[int], sample_ids: Sequence[str] | None) -> str:
    name = [sample_ids[i] if sample_ids else f"row {i}" for i in range(len(per_row))]
    detail = ", ".join(f"{name[i]}: {n}" for i, n in enumerate(per_row))
    return (f"image token count mismatch: the text has {sum(per_row)} image placeholder tokens but the images give "
            f"{sum(per_image)} features ({len(per_image)} image(s): {', '.join(map(str, per_image)) or 'none'}). "
            f"Per sample, placeholder tokens: {detail}. {_first_misfit(per_row, per_image, name)}"
            "Expand each <image> with model.image_token_counts(images).")


def _first_misfit(per_row: list[int], per_image: list[int], name: list[str]) -> str:
    """Images are one flat list in row order: give each row the next images that fill its slots exactly; the
    first row they cannot fill is where the text and the images part ways (later rows may be fine)."""
    k = 0
    for i, slots in enumerate(per_row):
        start, filled = k, 0
        while filled < slots and k < len(per_image):
            filled, k = filled + per_image[k], k + 1
        if filled != slots:
            given = ", ".join(map(str, per_image[start:k])) or "none left"
            return f"First sample that does not fit: {name[i]} ({slots} placeholders; its images give {given}). "
    return f"{len(per_image) - k} image(s) have no placeholders left. " if k < len(per_image) else ""


def decode(llm: PreTrainedModel, prompt: dict[str, torch.Tensor], attention_mask: torch.Tensor, eos: int,
           max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None,
           after_prefill: Callable[[], None] | None = None, cache: DynamicCache | None = None) -> list[list[int]]:
    """The KV-cache decoding loop: prefill the left-padded prompt (`prompt` holds input_ids or
    inputs_embeds), then one token per step until every row has produced `eos` or max_new_tokens.
    `after_prefill` runs once between the two (the cross-attention model switches its media mask there).
    `cache` may already hold the start of every row (shared prompt prefixes); `attention_mask` then covers
    the cached positions and the prompt. Returns the new token ids per row, cut at (and excluding) eos."""
    mask = attention_mask.clone()
    width = next(iter(prompt.values())).shape[1]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
    cache = cache if cache is not None else DynamicCache()
    out = llm(**prompt, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True)
    if after_prefill is not None:
        after_prefill()
    batch = mask.shape[0]
    done = torch.zeros(batch, dtype=torch.bool)
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    next_pos = position_ids[:, -1:] + 1
    for step in range(max_new_tokens):
        token = _pick(out.logits[:, -1].float(), temperature, top_p, generator)
        for i in range(batch):
            if not done[i]:
                if token[i].item() == eos:
                    done[i] = True
                else:
                    new_tokens[i].append(token[i].item())
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        out = llm(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=next_pos, cache=cache,
                  use_cache=True)
        next_pos = next_pos + 1
    return new_tokens


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
