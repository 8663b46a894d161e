"""Modality bridges: how image features enter the language model.

Every bridge maps (B, N, vision_dim) tower features to (B, num_output_tokens(N), llm_dim) word
embeddings; VisionLanguageModel asks it how many placeholder tokens one image takes.
"""

from lmmkit.models.bridges.mlp import MLPBridge
from lmmkit.models.bridges.pixel_shuffle import PixelShuffleBridge, pixel_shuffle
from lmmkit.models.bridges.resampler import PerceiverResampler, QFormerBridge, ResamplerBridge

__all__ = ["MLPBridge", "PerceiverResampler", "PixelShuffleBridge", "QFormerBridge", "ResamplerBridge",
           "pixel_shuffle"]
