"""The Flamingo bridge: gated cross-attention blocks that let a frozen LLM look at image features.

Unlike the LLaVA bridge, nothing is spliced into the text: each `<image>` marker stays one text
token, and before every `every`-th decoder layer a gated block lets the text hidden states attend
to the image features. The blocks run as forward pre-hooks on the LLM's decoder layers, so the
LLM's classes are untouched and its module tree never registers the bridge's parameters; all new
weights (projection + blocks) live here, in one module that lmmkit freezes, trains and saves as
the `bridge` part.

The hooks need to know the current images, which a decoder layer's call does not carry. The
model hands them over explicitly with `with bridge.attend(features, counts): llm(...)`; outside
such a block the hooks do nothing, so the LLM called on its own is exactly the bare LLM.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# Where decoder layers live in the LLM layouts we support (Llama-like, GPT-2).
LAYER_PATHS = ("model.layers", "transformer.h")


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The LLM's list of decoder layers (`llm.model.layers` or `llm.transformer.h`)."""
    for path in LAYER_PATHS:
        obj: Any = llm
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(llm).__name__}: cross-attention supports LLMs "
                     f"whose layers are at {' or '.join('llm.' + p for p in LAYER_PATHS)}")


@dataclass
class Media:
    """The images of one forward/generate call.

    features: (batch, max_images, tokens, dim), each row's images in marker order, zero padded.
    counts: (batch, queries) or (batch, 1): how many of its row's images each query position may
        see, i.e. how many `<image>` markers are at or before it. (batch, 1) is broadcast over the
        queries (cached decoding: every new token sees all its row's images).
    totals: (batch,) images per row.
    """

    features: torch.Tensor
    counts: torch.Tensor
    totals: torch.Tensor

    def for_new_tokens(self) -> None:
        """Switch to cached decoding: tokens after the prompt see every image in their row."""
        self.counts = self.totals[:, None]


class GatedCrossAttentionBlock(nn.Module):
    """LayerNorm -> cross-attention -> tanh(alpha_attn) residual, LayerNorm -> FFW -> tanh(alpha_ffw) residual.

    Both alphas start at 0, so at initialisation the block is exactly the identity. Unlike
    Flamingo, the feed-forward residual is also masked to tokens that see at least one image: a
    token with no image before it passes through unchanged, so text-only inputs always give the
    LLM's own outputs, trained bridge or not.
    """

    def __init__(self, dim: int, heads: int = 4, ff_mult: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"cross-attention: llm hidden size {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        # Bias-free projections as in Flamingo; tokens that see no image are zeroed explicitly in forward.
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim), nn.GELU(),
                                nn.Linear(ff_mult * dim, dim))
        self.alpha_attn = nn.Parameter(torch.zeros(1))
        self.alpha_ffw = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) text hidden states; media (B, M, T, D); counts (B, L) or (B, 1). Returns (B, L, D)."""
        b, length, dim = x.shape
        n_img, n_tok = media.shape[1], media.shape[2]
        h, dh = self.heads, dim // self.heads
        dtype = self.to_q.weight.dtype
        q = self.to_q(self.attn_norm(x.to(dtype))).view(b, length, h, dh).transpose(1, 2)
        k, v = self.to_kv(media.reshape(b, n_img * n_tok, dim).to(dtype)).view(b, -1, 2, h, dh).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * dh ** -0.5  # (B, H, L, M*T)
        # Key k belongs to image k // T of its row; a query sees image j iff j < its count, which
        # also hides the zero padding (j >= the row's total >= any count in the row).
        image_of_key = torch.arange(n_img, device=x.device).repeat_interleave(n_tok)
        visible = image_of_key[None, None, :] < counts[:, :, None]  # (B, L|1, M*T)
        # A finite fill, not -inf: a row that sees nothing must not turn into NaN (0/0 softmax);
        # its output is zeroed below instead.
        scores = scores.masked_fill(~visible[:, None], torch.finfo(scores.dtype).min)
        out = (scores.softmax(-1).to(v.dtype) @ v).transpose(1, 2).reshape(b, length, dim)
        sees_image = (counts > 0)[..., None]  # (B, L|1, 1)
        out = torch.where(sees_image, self.to_out(out), 0.0)
        x = x + (torch.tanh(self.alpha_attn) * out).to(x.dtype)
        ff = torch.where(sees_image, self.ff(x.to(dtype)), 0.0)
        return x + (torch.tanh(self.alpha_ffw) * ff).to(x.dtype)


class GatedCrossAttentionBridge(nn.Module):
    """Image projection + one gated cross-attention block per `every` decoder layers (before 0, N, 2N...).

    `forward` projects tower features (n_images, tokens, vision_dim) to (n_images, tokens, llm_dim),
    so `VisionLanguageModel.encode_images` works unchanged; `attach` hooks the blocks into an LLM.
    """

    def __init__(self, vision_dim: int, llm_dim: int, num_layers: int, every: int = 1, heads: int = 4,
                 ff_mult: int = 4) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"cross-attention every must be >= 1, got {every}")
        self.every = every
        self.num_layers = num_layers
        self.layer_indices: list[int] = list(range(0, num_layers, every))
        # A Linear to the LLM width and a LayerNorm (Flamingo normalises its media too): the keys
        # and values then start on the scale of the text's normalised hidden states.
        self.proj = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.LayerNorm(llm_dim))
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(llm_dim, heads, ff_mult) for _ in self.layer_indices)
        self._handles: list[RemovableHandle] = []
        self._media: Media | None = None

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        return self.proj(vision_features)

    def num_output_tokens(self, n_in: int) -> int:
        """Text tokens one image takes: its single `<image>` marker, whatever the tower's `n_in`
        (the features themselves enter through the hooks, not the sequence)."""
        return 1

    # ---- hooks ----------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, llm: nn.Module) -> None:
        """Register one forward pre-hook per block on the LLM's decoder layers (handles kept for detach)."""
        if self.attached:
            raise RuntimeError("this cross-attention bridge is already attached to an LLM; detach() it first")
        layers = decoder_layers(llm)
        if len(layers) != self.num_layers:
            raise ValueError(f"bridge built for {self.num_layers} decoder layers, the LLM has {len(layers)}")
        for block_index, layer_index in enumerate(self.layer_indices):
            # A partial of a bound method, not a closure: deepcopy/pickle of the model then maps the
            # hook to the copied bridge.
            hook = functools.partial(self._pre_hook, block_index)
            self._handles.append(layers[layer_index].register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        """Remove every hook: the LLM is the bare LLM again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        """Whether a media context is set (only inside `attend`)."""
        return self._media is not None

    @contextmanager
    def attend(self, features: torch.Tensor, counts: torch.Tensor, totals: torch.Tensor) -> Iterator[Media]:
        """Make the hooks cross-attend to `features` for the LLM calls inside the block (see Media).

        The yielded Media may be updated between calls (`for_new_tokens()` after a prefill). It is
        cleared on exit, also on error, so no later call sees stale images.
        """
        if not self.attached:
            raise RuntimeError("the cross-attention bridge is not attached to an LLM; call attach(llm)")
        if self._media is not None:
            raise RuntimeError("cross-attention media already set: nested attend() calls are not supported")
        self._media = Media(features, counts, totals)
        try:
            yield self._media
        finally:
            self._media = None

    def _pre_hook(self, block_index: int, _layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        media = self._media
        if media is None:
            return None  # no images in this call: the layer runs as in the bare LLM
        in_args = bool(args)
        hidden = args[0] if in_args else kwargs["hidden_states"]
        if media.counts.shape[0] != hidden.shape[0] or media.counts.shape[1] not in (1, hidden.shape[1]):
            raise ValueError(f"cross-attention media for {tuple(media.counts.shape)} (batch, queries) but the "
                             f"layer got hidden states {tuple(hidden.shape)}")
        hidden = self.blocks[block_index](hidden, media.features, media.counts)
        if in_args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
