"""Several processes, one result: the loss weighting that makes data-parallel training compute the
single-process gradient of the same global batch, and FSDP for a VisionLanguageModel (the wrapping policy,
the plugin run_stage hands accelerate, and checkpoints of the gathered weights). docs/distributed.md has the
launch commands.

Why the weighting: DDP (and FSDP) average the ranks' gradients, so each rank's loss counts 1/world. An
objective whose loss is a mean over units that ranks hold unequal numbers of (the LM loss: labelled tokens;
answers differ in length) then weighs a token on a rank with few tokens more than one on a rank with many:
the mean of per-rank means is not the global mean. Scaling rank r's loss by world * n_r / N (n_r its units,
N all ranks' units) makes the average exactly the gradient of the global mean, sum_r n_r / N * grad(mean_r).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from torch import nn
from transformers import PreTrainedModel

from lmmkit.models.bridges.cross_attention import decoder_layers


@dataclass
class SyncedLoss:
    """One micro-batch across all ranks: the loss to backpropagate on this rank, and what to log."""

    loss: torch.Tensor  # this rank's loss, weighted so the ranks' gradient average is the global mean's
    value: float  # the global mean loss (what one process on the whole batch would report)
    extra: dict[str, float]  # the objective's metrics, averaged with the same weights
    tokens: int  # tokens of the whole global micro-batch (all ranks)


def sync_loss(accelerator: Accelerator, loss: torch.Tensor, extra: dict[str, float], units: int | None,
              tokens: int) -> SyncedLoss:
    """All-reduce one micro-batch's loss statistics (one small collective) and weight the loss.

    `units` is how many things the loss is a mean over on this rank (`Objective.loss_units`); None means the
    objective did not say, and every rank weighs the same (DDP's plain average: right when each rank's loss
    is a mean over equally many things, e.g. DPO's per-pair mean with batch_size pairs per rank)."""
    weight = 1.0 if units is None else float(units)
    local = loss.detach().float().item()
    # A rank with no units has a NaN mean (0/0): it contributes nothing, to the value or (below) the gradient.
    stats = [weight, float(tokens), local * weight if weight else 0.0, *(v * weight for v in extra.values())]
    total = accelerator.reduce(torch.tensor(stats, dtype=torch.float64, device=accelerator.device), "sum")
    total_weight, total_tokens, weighted_loss, *weighted_extra = total.tolist()
    if not total_weight:  # no rank has a unit: NaN, as one process on the whole batch would give
        return SyncedLoss(loss, float("nan"), dict(extra), int(total_tokens))
    if units is not None:
        # x 0 on an empty rank: the NaN forward value is never used, and its backward only multiplies by 0.
        loss = loss * (accelerator.num_processes * weight / total_weight)
    extra = {k: v / total_weight for k, v in zip(extra, weighted_extra, strict=True)}
    return SyncedLoss(loss, weighted_loss / total_weight, extra, int(total_tokens))


# ---- FSDP ------------------------------------------------------------------------------------------------


def fsdp_requested() -> bool:
    """True under `accelerate launch` with an FSDP config (it exports ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_wrap_classes(model: nn.Module) -> list[str]:
    """The class names FSDP should shard as one unit each: the LLM's decoder layer and the vision tower's
    block (a ViT's encoder layer, a ResNet / ConvNeXt stage; each tower's, for fused towers). One unit per
    block means one block's weights are gathered at a time; the rest (embeddings, bridge, norms, LM head) is
    the root unit."""
    names = [type(decoder_layers(model.llm)[0]).__name__]
    names += [type(block).__name__ for block in vision_blocks(model.vision)]
    return list(dict.fromkeys(names))


def vision_blocks(vision: nn.Module) -> Iterator[nn.Module]:
    """The first block of each HF model inside a vision side: the element of its longest list of same-class
    modules (CLIP / SigLIP encoder.layers, DINOv2 / ViT encoder.layer, ResNet / ConvNeXt encoder.stages).
    Nothing for a tower without an HF model (the Fuyu patch tower)."""
    for hf in _outermost(vision, PreTrainedModel):
        stacks = [m for m in hf.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                  and len({type(x) for x in m}) == 1 and any(True for _ in m[0].parameters())]
        if stacks:
            yield max(stacks, key=len)[0]  # max keeps the first (outermost) of equally long stacks


def _outermost(module: nn.Module, kind: type) -> Iterator[nn.Module]:
    if isinstance(module, kind):
        yield module
        return
    for child in module.children():
        yield from _outermost(child, kind)


def fsdp_plugin(model: nn.Module) -> FullyShardedDataParallelPlugin | None:
    """The FSDP plugin for `model` under an FSDP launch (None otherwise): the launch config's settings, with
    the wrap policy defaulting to one unit per decoder layer and vision block (`fsdp_wrap_classes`). A config
    that names its own classes (fsdp_transformer_layer_cls_to_wrap) or another policy keeps them."""
    if not fsdp_requested():
        return None
    if os.environ.get("FSDP_VERSION", "1") != "2":
        # FSDP1 flattens parameters, so the optimizer run_stage builds before `prepare` would hold stale ones;
        # accelerate remaps them for FSDP2 only.
        raise ValueError("lmmkit trains with FSDP2: set fsdp_version: 2 in the accelerate config "
                         "(docs/distributed.md has one)")
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").upper()
    if policy != "TRANSFORMER_BASED_WRAP":
        return FullyShardedDataParallelPlugin()
    named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    return FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap",
                                          transformer_cls_names_to_wrap=named.split(",") if named
                                          else fsdp_wrap_classes(model))


class GatheredPart(nn.Module):
    """A part's full weights gathered from the shards, standing in for the part where save_checkpoint
    reads its state dict (FSDP's own modules hand out shards)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.tensors = tensors

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self.tensors)


class GatheredModel:
    """What save_checkpoint reads of a model (its parts and tokenizer), with the parts gathered."""

    def __init__(self, parts: dict[str, GatheredPart], tokenizer: object) -> None:
        self.__dict__.update(parts)
        self.tokenizer = tokenizer


def gathered_model(full: dict[str, torch.Tensor], model: nn.Module, parts: tuple[str, ...]) -> GatheredModel:
    """`full` (accelerator.get_state_dict of the sharded model) split into `parts`. Tied weights (an LM head
    sharing the embedding) share one tensor again, so the checkpoint stores them as an unsharded one would."""
    out: dict[str, GatheredPart] = {}
    for part in parts:
        tensors = {k[len(part) + 1:]: v for k, v in full.items() if k.startswith(part + ".")}
        first: dict[int, str] = {}
        for name, param in getattr(model, part).named_parameters(remove_duplicate=False):
            alias = first.setdefault(id(param), name)
            if alias != name and alias in tensors:
                tensors[name] = tensors[alias]
        out[part] = GatheredPart(tensors)
    return GatheredModel(out, model.tokenizer)


def end_distributed() -> None:
    """Tear down the process group once a distributed job is done. A rank that exits with gloo's threads still
    running can abort ("terminate called without an active exception"), failing a run that trained fine."""
    # No barrier: on an error path one rank may never reach it. The training loop's last checkpoint already waited.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
