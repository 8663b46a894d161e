"""torch.compile for the LLM's decoder layers: fuses the memory-bound glue around the matmuls (RMSNorm in fp32,
rotary embeddings, SiLU x up, residual adds), which eager mode runs as separate kernels.

Why per layer and not the whole model: every decoder layer runs the same code, so one compiled graph serves
them all (dynamo guards on the code, not on each layer's weights), compile time stays that of one layer, and
the Python around the layers (image splicing, the loss) stays eager and debuggable. `dynamic=True` because
packed rows change length every step; a graph per length would recompile without end.
"""

from __future__ import annotations

from torch import nn

from lmmkit.models.bridges.cross_attention import decoder_layers


def compile_decoder_layers(llm: nn.Module) -> int:
    """Compile every decoder layer of `llm` in place; returns how many."""
    layers = decoder_layers(llm)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


__all__ = ["compile_decoder_layers"]
