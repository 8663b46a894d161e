"""Packed training without a mask: every sample of a step in one row, attention by flash-attention's
variable-length kernel (`torch.nn.attention.varlen.varlen_attn`, CUDA only).

Why: the dense block-diagonal mask of train/packing.py computes attention over a whole row and then masks
it, and a bool mask rules out the flash kernel on a GPU. The varlen kernel takes the samples' boundaries
(`cu_seq_lens`: cumulative lengths) and computes each sample's causal attention only, so a packed row costs
what its samples cost, with no padding at all. transformers passes `cu_seq_lens_q` / `max_length_q` from
the model's forward down to the attention function (its FlashAttentionKwargs), and builds no mask for an
attention implementation it does not know, so lmmkit registers one (`AttentionInterface.register`, the
public extension point) instead of patching the model.

The rest is packing.py's contract: position ids restart per sample, the first token of every sample is
never a target, images are given in the samples' order, and the loss is the same as unpacked (tested on a
GPU in tests/train/test_varlen.py; CPUs have no such kernel, so there the dense mask is the packing path).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from lmmkit.data.dataset import EncodedSample
from lmmkit.data.templates import IGNORE_INDEX

VARLEN_ATTENTION = "lmmkit_varlen"  # the attn_implementation name an LLM gets for packed rows
HALF_DTYPES = (torch.bfloat16, torch.float16)


class VarlenError(RuntimeError):
    """The varlen kernel cannot run here or on this input; the message says why and what can."""


def varlen_available() -> bool:
    """True where the flash varlen kernel can run: a CUDA device and a torch that ships varlen_attn."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def register_varlen_attention() -> str:
    """Make `VARLEN_ATTENTION` a valid attn_implementation for transformers models; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    return VARLEN_ATTENTION


def use_varlen_attention(llm: nn.Module) -> None:
    """Switch an HF LLM to the varlen kernel (training on packed rows only: generation has no boundaries)."""
    if not varlen_available():
        raise VarlenError("the flash-attention varlen kernel needs a CUDA device and torch>=2.10 "
                          "(torch.nn.attention.varlen); on a CPU packed rows use the dense block-diagonal mask")
    llm.set_attn_implementation(register_varlen_attention())


def _kernel_kwargs(kernel, scaling: float | None, head_dim: int) -> dict:
    """Causal attention at the model's scale, in the kernel's own terms: torch 2.10 takes is_causal and no
    scale (always 1/sqrt(head_dim)); later versions take a (left, right) window, (-1, 0) being causal."""
    params = inspect.signature(kernel).parameters
    kwargs: dict = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - head_dim ** -0.5) > 1e-9 * scaling:
        raise VarlenError(f"this torch's varlen kernel has no scale argument and the LLM scales attention by "
                          f"{scaling:g}, not 1/sqrt({head_dim}); use torch>=2.11 or train.packing with the mask")
    return kwargs


def varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (1, Hq, T, D), key / value (1, Hkv, T, D) -> output
    (1, T, Hq, D). All samples are one row; `cu_seq_lens_q` (int32, n+1) gives their boundaries."""
    from torch.nn.attention.varlen import varlen_attn

    if cu_seq_lens_q is None or max_length_q is None:
        raise VarlenError(f"{VARLEN_ATTENTION} attention runs packed training rows only: the batch has no "
                          "cu_seq_lens_q / max_length_q (train.packing lays them out: varlen_layout); load the model with "
                          "attn_implementation='sdpa' to generate")
    if query.shape[0] != 1:
        raise VarlenError(f"{VARLEN_ATTENTION} attention takes one packed row, got a batch of {query.shape[0]}")
    if dropout and module.training:
        raise VarlenError(f"{VARLEN_ATTENTION} attention has no dropout; the LLM asks for {dropout}")
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if dtype not in HALF_DTYPES:
        raise VarlenError(f"the flash varlen kernel computes in bf16 or fp16, not {dtype}: train with "
                          "bf16 autocast (train.precision=bf16) or bf16 weights")
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # (T, H, D)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves a group of query heads
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    out = varlen_attn(q, k, v, cu, cu, int(max_length_q), int(max_length_q),
                      **_kernel_kwargs(varlen_attn, scaling, q.shape[-1]))
    return out.unsqueeze(0), None


def varlen_layout(samples: Sequence[EncodedSample]) -> dict:
    """The text side of one packed row holding every sample back to back: input_ids and labels (1, T), position
    ids restarting per sample, the boundaries (`cu_seq_lens_q`/`_k`, int32) and the longest sample
    (`max_length_q`/`_k`), as transformers' FlashAttentionKwargs name them; `num_tokens` = T (no padding)."""
    lengths = [len(s.input_ids) for s in samples]
    if not lengths or min(lengths) == 0:
        raise VarlenError("varlen_layout needs at least one sample and no empty sample")
    input_ids = torch.tensor([t for s in samples for t in s.input_ids]).unsqueeze(0)
    labels = torch.tensor([t for s in samples for t in s.labels]).unsqueeze(0)
    starts = torch.tensor([0, *lengths]).cumsum(0)
    labels[0, starts[:-1]] = IGNORE_INDEX  # else the previous sample's last token learns to predict it
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = starts.to(torch.int32)
    longest = max(lengths)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest, "num_tokens": int(starts[-1])}


__all__ = ["VARLEN_ATTENTION", "VarlenError", "register_varlen_attention", "use_varlen_attention",
           "varlen_attention", "varlen_available", "varlen_layout"]
