"""CrossAttentionVLM: a Flamingo-style model with the VisionLanguageModel interface.

The text keeps one `<image>` marker token per image (tokens_per_image = 1; the marker's own
embedding stays in the sequence). Image features reach the LLM only through the gated
cross-attention blocks of the bridge (lmmkit.models.bridges.cross_attention), which every
forward/generate call switches on for its own duration. Each text token sees the images whose
marker is at or before it; tokens generated after a prompt see all of their row's images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from lmmkit.models.bridges.cross_attention import GatedCrossAttentionBridge, decoder_layers
from lmmkit.models.vision import VisionTower
from lmmkit.models.vlm import ImageTokenMismatchError, VisionLanguageModel, decode


class CrossAttentionVLM(VisionLanguageModel):
    """Vision tower + frozen-friendly LLM + a GatedCrossAttentionBridge hooked into the LLM's layers."""

    def __init__(self, vision: VisionTower, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 every: int = 1, heads: int = 4, ff_mult: int = 4,
                 bridge: GatedCrossAttentionBridge | None = None) -> None:
        if bridge is None:
            bridge = GatedCrossAttentionBridge(vision.hidden_size, llm.config.hidden_size,
                                               len(decoder_layers(llm)), every=every, heads=heads, ff_mult=ff_mult)
        super().__init__(vision, llm, tokenizer, bridge=bridge)
        # One marker per image: the processor side (expand_image_tokens) then keeps `<image>` as is.
        self.tokens_per_image = 1
        self.bridge.attach(llm)

    def remove_hooks(self) -> None:
        """Detach the bridge from the LLM (the model can no longer see images until bridge.attach(llm))."""
        self.bridge.detach()

    # ---- media ----------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
              sample_ids: Sequence[str] | None = None) -> torch.Tensor:
        """The LLM's token embeddings (markers included). Images are never spliced into them, so
        callers that drive `model.llm` themselves (the splice model's recipe) would silently drop
        the images: refuse that; use forward/generate, or prepare_media + bridge.attend."""
        if image_embeds is not None:
            raise ValueError("CrossAttentionVLM does not splice images into the embeddings: call forward/"
                             "generate, or wrap the LLM calls in bridge.attend(*model.prepare_media(...))")
        self.prepare_media(input_ids, None, sample_ids)  # count check: markers without images fail here
        return self.llm.get_input_embeddings()(input_ids)

    def prepare_media(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
                      sample_ids: Sequence[str] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Check markers against images and lay the images out per row.

        image_embeds: (n_images, tokens, llm_dim), the images of all rows in marker order (row-major),
        as `encode_images` returns them. Returns (features (B, M, T, D) zero padded, counts (B, L) =
        markers at or before each position, totals (B,)), the arguments of `bridge.attend`; None when
        there are neither markers nor images.
        """
        is_image = input_ids == self.image_token_id
        totals = is_image.sum(1)
        n_images = 0 if image_embeds is None else image_embeds.shape[0]
        if int(totals.sum()) != n_images:
            raise ImageTokenMismatchError(_mismatch_message(totals.tolist(), n_images, sample_ids))
        if n_images == 0:
            return None
        batch, most = input_ids.shape[0], int(totals.max())
        # Image i of the flat list belongs to row row[i], as that row's slot[i]-th image.
        row = torch.repeat_interleave(torch.arange(batch, device=input_ids.device), totals)
        first = totals.cumsum(0) - totals
        slot = torch.arange(n_images, device=input_ids.device) - first[row]
        features = image_embeds.new_zeros(batch, most, *image_embeds.shape[1:])
        features = features.index_put((row, slot), image_embeds)  # out of place: keeps the autograd graph simple
        return features, is_image.cumsum(1), totals

    # ---- forward --------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                vision_features: torch.Tensor | None = None, sample_ids: Sequence[str] | None = None,
                image_sizes: object = None, **llm_kwargs) -> CausalLMOutputWithPast:
        del image_sizes  # one marker per image whatever its size: accepted for the common interface only
        image_embeds = None
        if pixel_values is not None or vision_features is not None:
            image_embeds = self.encode_images(pixel_values, vision_features)
        media = self.prepare_media(input_ids, image_embeds, sample_ids)
        if media is None:
            return self.llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **llm_kwargs)
        with self.bridge.attend(*media):
            return self.llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **llm_kwargs)

    # ---- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
                 image_embeds: torch.Tensor | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None,
                 image_sizes: object = None) -> list[list[int]]:
        """Batched generation with a KV cache, as VisionLanguageModel.generate (left-padded prompts,
        temperature 0 = greedy, rows cut at the end-of-turn token). image_sizes is not needed."""
        if image_embeds is None and (pixel_values is not None or vision_features is not None):
            image_embeds = self.encode_images(pixel_values, vision_features)
        media = self.prepare_media(input_ids, image_embeds)
        if media is None:
            return self._decode(input_ids, attention_mask, None, max_new_tokens, temperature, top_p, generator)
        with self.bridge.attend(*media) as current:
            return self._decode(input_ids, attention_mask, current.for_new_tokens, max_new_tokens, temperature,
                                top_p, generator)

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                after_prefill: Callable[[], None] | None,
                max_new_tokens: int, temperature: float, top_p: float,
                generator: torch.Generator | None) -> list[list[int]]:
        # The text keeps its <image> markers as tokens: the LLM embeds them itself; images arrive via the hooks.
        return decode(self.llm, {"input_ids": input_ids}, attention_mask, self.tokenizer.eos_token_id,
                      max_new_tokens, temperature, top_p, generator, after_prefill)


def _mismatch_message(per_row: list[int], n_images: int, sample_ids: Sequence[str] | None) -> str:
    # Images come as one flat list, so a wrong total cannot be pinned on one row: name every row
    # with its marker count, which is what the caller has to compare with its images.
    detail = ", ".join(f"{sample_ids[i] if sample_ids else f'row {i}'}: {n} <image> marker{'s' * (n != 1)}"
                       for i, n in enumerate(per_row))
    return (f"image token count mismatch: the text has {sum(per_row)} <image> markers but there are {n_images} "
            f"images (cross-attention: one marker per image). Per sample: {detail}")


__all__ = ["CrossAttentionVLM"]
