"""Direct preference optimisation for LMMs: the losses, the reference model, and one batch's loss.

Per pair, with log-probabilities summed over the answer tokens only,

    h = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected))

* ``sigmoid`` (DPO, Rafailov et al. 2023):  -log sigmoid(beta * h)
* ``ipo``     (Azar et al. 2023):           (h' - 1 / (2 beta))^2, where h' uses log-probs averaged
                                            per answer token (as TRL does; sums would make the
                                            target depend on answer length)
* ``hinge``   (SLiC, Zhao et al. 2023):     max(0, 1 - beta * h)

plus an optional SFT term, ``sft_weight`` x the chosen answer's mean token NLL. The reference is a
frozen copy of the starting model, or, when the LLM carries LoRA adapters, the same model with the
adapters switched off (no second copy in memory). Reference log-probs are computed once per batch
under no_grad. Chosen and rejected rows share each image's tower features: the tower runs once per
pair.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmmkit.data.collate import pad_batch
from lmmkit.data.preference import EncodedPair
from lmmkit.data.templates import IGNORE_INDEX
from lmmkit.models.lora import LoRALinear, has_lora
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.train.features import FeatureCache, open_image

LossType = Literal["sigmoid", "ipo", "hinge"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge")
ReferenceKind = Literal["copy", "adapters-off"]


@dataclass(frozen=True)
class DPOSettings:
    beta: float = 0.1
    loss_type: LossType = "sigmoid"
    sft_weight: float = 0.0
    reference: ReferenceKind = "copy"

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"dpo beta must be > 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"dpo loss {self.loss_type!r} is unknown; choose one of {', '.join(LOSS_TYPES)}")
        if self.sft_weight < 0:
            raise ValueError(f"dpo sft_weight must be >= 0, got {self.sft_weight}")
        if self.reference not in ("copy", "adapters-off"):
            raise ValueError(f"dpo reference {self.reference!r} is unknown; choose copy or adapters-off")


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of the labelled tokens (next-token shift applied), and
    how many tokens were labelled."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, n_chosen: torch.Tensor, n_rejected: torch.Tensor,
                    beta: float, loss_type: str) -> torch.Tensor:
    """Per-pair loss (see the module docstring) from summed answer log-probs and answer lengths."""
    if loss_type == "ipo":
        h = ((policy_chosen - ref_chosen) / n_chosen.clamp(min=1)
             - (policy_rejected - ref_rejected) / n_rejected.clamp(min=1))
        return (h - 1 / (2 * beta)) ** 2
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"unknown dpo loss {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Inside the block every LoRALinear computes its base layer only (scaling 0)."""
    loras = [m for m in module.modules() if isinstance(m, LoRALinear)]
    saved = [m.scaling for m in loras]
    for m in loras:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, s in zip(loras, saved, strict=True):
            m.scaling = s


class ReferenceModel:
    """Reference log-probs: a frozen deep copy, or the policy itself with its LoRA adapters off."""

    def __init__(self, policy: VisionLanguageModel, kind: ReferenceKind = "copy") -> None:
        self.kind = kind
        if kind == "adapters-off":
            if not has_lora(policy.llm):
                raise ValueError("dpo reference 'adapters-off' needs LoRA adapters on the LLM (set train.lora_rank); "
                                 "use reference 'copy' for full fine-tuning")
            self.model = policy
        else:
            self.model = copy.deepcopy(policy)
            self.model.requires_grad_(False)
            self.model.eval()

    @torch.no_grad()
    def logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        off = adapters_disabled(self.model.llm) if self.kind == "adapters-off" else nullcontext()
        was_training = self.model.training
        self.model.eval()  # no dropout in the reference
        try:
            with off:
                out = self.model(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            self.model.train(was_training)
        return answer_logps(out.logits, batch["labels"])


def make_pair_batch(model: VisionLanguageModel, pairs: list[EncodedPair], cache: FeatureCache | None,
                    pad_id: int, tower_frozen: bool = True) -> dict:
    """Chosen rows then rejected rows, padded together; the images' tower features once per pair,
    repeated for the rejected half (the tower is not run twice)."""
    rows = [(p.chosen.input_ids, p.chosen.labels) for p in pairs] + [(p.rejected.input_ids, p.rejected.labels)
                                                                     for p in pairs]
    batch = pad_batch(rows, pad_id)
    images = [im for p in pairs for im in p.images]
    if images:
        if cache is not None:
            cached = cache.inputs(model, images)
            feats, sizes = cached["vision_features"], cached.get("image_sizes")
        else:
            opened = [open_image(im, p.where) for p in pairs for im in p.images]
            sizes = [(im.height, im.width) for im in opened] if model.variable_tokens else None
            pixels = model.vision.preprocess(opened)
            if not tower_frozen:
                batch["pixel_values"] = torch.cat([pixels, pixels])
                feats = None
            else:
                with torch.no_grad():
                    feats = model.vision_features(pixels)
        if feats is not None:
            # Images (and AnyRes views) are batched along the first axis, so the rejected half repeats it.
            batch["vision_features"] = torch.cat([feats, feats])
        if sizes is not None:
            batch["image_sizes"] = sizes + sizes
    batch["sample_ids"] = [p.chosen.id for p in pairs] + [p.rejected.id for p in pairs]
    return batch


def dpo_batch_loss(policy: nn.Module, reference: ReferenceModel, batch: dict, settings: DPOSettings
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's mean loss, and what to log: reward margin, implicit-reward accuracy, KL proxy."""
    ref_logps, _ = reference.logps(batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = policy(**inputs)
    logps, counts = answer_logps(out.logits, batch["labels"])
    n = logps.shape[0] // 2
    pc, pr, rc, rr, nc, nr = logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], counts[:n], counts[n:]
    losses = preference_loss(pc, pr, rc, rr, nc, nr, settings.beta, settings.loss_type)
    loss = losses.mean()
    if settings.sft_weight > 0:
        loss = loss + settings.sft_weight * (-(pc / nc.clamp(min=1))).mean()
    chosen_reward = settings.beta * (pc - rc).detach()
    rejected_reward = settings.beta * (pr - rr).detach()
    tokens = counts.sum().clamp(min=1)
    metrics = {
        "reward_margin": (chosen_reward - rejected_reward).mean().item(),
        "reward_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
        "reward_chosen": chosen_reward.mean().item(),
        "reward_rejected": rejected_reward.mean().item(),
        # Per-token mean of log pi - log ref over both answers: a cheap proxy for the drift from the reference.
        "kl_proxy": ((logps - ref_logps).detach().sum() / tokens).item(),
    }
    return loss, metrics


class DPOObjective:
    """The loop's objective for the dpo stage (see train/loop.py `Objective`)."""

    def __init__(self, policy: VisionLanguageModel, settings: DPOSettings, tower_frozen: bool = True) -> None:
        self.settings = settings
        self.tower_frozen = tower_frozen
        self.reference = ReferenceModel(policy, settings.reference)

    def length(self, pair: EncodedPair) -> int:
        return max(len(pair.chosen.input_ids), len(pair.rejected.input_ids))

    def batch(self, model: VisionLanguageModel, pairs: list[EncodedPair], cache: FeatureCache | None,
              pad_id: int) -> dict:
        return make_pair_batch(model, pairs, cache, pad_id, self.tower_frozen)

    def loss(self, wrapped: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return dpo_batch_loss(wrapped, self.reference, batch, self.settings)
