"""VisionLanguageModel: encode images -> bridge -> splice into the text embeddings -> LLM.

This file is the whole forward pass. The processor side (chat template, `<image>` expanded to
one placeholder token per visual token) lives in lmmkit.data; here every placeholder is
replaced by one bridged image feature, after checking that the counts agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from lmmkit import IMAGE_TOKEN
from lmmkit.models.bridges import MLPBridge
from lmmkit.models.vision import VisionTower


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
        self.tokens_per_image = self.bridge.num_output_tokens(vision.num_tokens())

    # ---- images ---------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tower output (n_images, tokens_per_image, vision_dim); cacheable while the tower is frozen."""
        return self.vision(pixel_values.to(self.vision.dtype))

    def encode_images(self, pixel_values: torch.Tensor | None = None,
                      vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """Bridged image embeddings (n_images, tokens_per_image, llm_dim), from pixels or cached features."""
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("encode_images needs pixel_values or vision_features")
            vision_features = self.vision_features(pixel_values)
        return self.bridge(vision_features.to(self.bridge_dtype))

    @property
    def bridge_dtype(self) -> torch.dtype:
        return next(self.bridge.parameters()).dtype

    # ---- splicing -------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
              sample_ids: Sequence[str] | None = None) -> torch.Tensor:
        """Text embeddings with each image placeholder replaced by one image feature, in order."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        n_slots = int(is_image.sum())
        n_feats = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_feats:
            raise ImageTokenMismatchError(self._mismatch_message(is_image, image_embeds, sample_ids))
        if n_slots == 0:
            return embeds
        feats = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(is_image.unsqueeze(-1), feats)

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
                **llm_kwargs) -> CausalLMOutputWithPast:
        image_embeds = None
        if pixel_values is not None or vision_features is not None:
            image_embeds = self.encode_images(pixel_values, vision_features)
        inputs_embeds = self.embed(input_ids, image_embeds, sample_ids)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **llm_kwargs)

    # ---- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
                 image_embeds: torch.Tensor | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> list[list[int]]:
        """Batched generation with a KV cache. Prompts must be left-padded. temperature 0 = greedy.

        Returns the new token ids per row, cut at (and excluding) the end-of-turn token.
        """
        if image_embeds is None and (pixel_values is not None or vision_features is not None):
            image_embeds = self.encode_images(pixel_values, vision_features)
        eos = self.tokenizer.eos_token_id
        embeds = self.embed(input_ids, image_embeds)
        mask = attention_mask.clone()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                       cache=cache, use_cache=True)
        batch = input_ids.shape[0]
        done = torch.zeros(batch, dtype=torch.bool)
        new_tokens: list[list[int]] = [[] for _ in range(batch)]
        next_pos = position_ids[:, -1:] + 1
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            token = _pick(logits, temperature, top_p, generator)
            for i in range(batch):
                if not done[i]:
                    if token[i].item() == eos:
                        done[i] = True
                    else:
                        new_tokens[i].append(token[i].item())
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
            out = self.llm(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=next_pos,
                           cache=cache, use_cache=True)
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
