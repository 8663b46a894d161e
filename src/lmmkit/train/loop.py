"""The training loop: one stage over encoded samples, launched through accelerate.

AdamW, linear warmup + cosine decay, gradient accumulation, bf16 autocast or fp32, gradient
clipping, atomic checkpoints, exact resume (same data order), a progress bar with loss,
tokens/s and ETA, and metrics as JSON lines. `accelerate launch` runs it on several processes
unchanged: each process takes its share of every global batch, and its loss is weighted so that the
gradient is the one a single process would compute on the whole global batch (train/distributed.py).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from lmmkit.data.collate import pad_batch
from lmmkit.data.dataset import EncodedSample
from lmmkit.data.templates import IGNORE_INDEX
from lmmkit.models.lora import has_lora
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.train.batches import BatchSource, EpochBatches, StreamBatches
from lmmkit.train.checkpoint import latest_checkpoint, load_trained_parts, read_state, save_checkpoint
from lmmkit.train.distributed import fsdp_plugin, gathered_model, sync_loss
from lmmkit.train.features import FeatureCache, open_image
from lmmkit.train.stages import apply_stage, trainable_parts


@dataclass
class StageResult:
    stage: str
    steps: int
    seconds: float
    final_loss: float
    tokens_per_second: float
    checkpoint: Path | None
    losses: list[tuple[int, float]] = field(default_factory=list)
    data_seconds: float = 0.0  # spent building batches (the step waits on them: they are made in this process)

    @property
    def data_share(self) -> float:
        """Share of the stage's time the steps waited for their data."""
        return self.data_seconds / max(1e-9, self.seconds)


class Objective(Protocol):
    """What a stage optimises: how long a sample is (for batching), how samples become a batch, and
    the batch's loss plus extra metrics to log. `LMObjective` is next-token loss on the labels; DPO
    (train/dpo.py) compares chosen and rejected answers.

    Optional: `loss_units(batch) -> int`, how many things the loss is a mean over (LMObjective: labelled
    target tokens). Under several processes each rank's loss is weighted by its share of the global units, so
    the gradient is the global batch's; an objective without it weighs every rank the same, which is exact
    when every rank's loss is a mean over equally many things (DPO: batch_size pairs on every rank)."""

    def length(self, sample: Any) -> int: ...

    def batch(self, model: VisionLanguageModel, samples: list, cache: FeatureCache | None, pad_id: int) -> dict: ...

    def loss(self, wrapped: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]: ...


class LMObjective:
    """Next-token cross-entropy on the labelled (assistant) tokens: the align and sft stages."""

    def length(self, sample: EncodedSample) -> int:
        return len(sample.input_ids)

    def batch(self, model: VisionLanguageModel, samples: list[EncodedSample], cache: FeatureCache | None,
              pad_id: int) -> dict:
        return make_batch(model, samples, cache, pad_id)

    def loss_units(self, batch: dict) -> int:
        return labelled_targets(batch)

    def loss(self, wrapped: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        # The LLM's own loss, on purpose: `target_loss` computes the same value along another numeric path
        # (bf16), which changed the demo's trajectory for no measurable speed gain at this vocabulary size.
        return wrapped(**batch).loss, {}


def labelled_targets(batch: dict) -> int:
    """Next-token targets with a label (position 0 predicts nothing): what the LM loss is a mean over."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def target_loss(wrapped: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The LLM's mean next-token loss over the labelled tokens, with logits computed only at positions that
    predict one (any row's): the LM head and the fp32 softmax over every position cost positions x vocab,
    and with assistant-only labels most positions are never scored. The same loss as `model(**batch).loss`;
    an LLM without transformers' `logits_to_keep` gets exactly that."""
    llm = getattr(getattr(wrapped, "module", wrapped), "llm", None)
    if llm is None or "logits_to_keep" not in inspect.signature(llm.forward).parameters:
        return wrapped(**batch).loss
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    logits = wrapped(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets[:, keep].flatten(),
                                             ignore_index=IGNORE_INDEX)


def make_batch(model: VisionLanguageModel, samples: list[EncodedSample], cache: FeatureCache | None,
               pad_id: int) -> dict:
    batch = pad_batch([(s.input_ids, s.labels) for s in samples], pad_id)
    batch.update(image_inputs(model, samples, cache))
    batch["sample_ids"] = [s.id for s in samples]
    return batch


def image_inputs(model: VisionLanguageModel, samples: list[EncodedSample], cache: FeatureCache | None) -> dict:
    """The model's image arguments for these samples' images, in sample order (the order their placeholders
    take in the batch): cached tower features, or pixels; plus image_sizes for AnyRes. Empty without images."""
    if samples and all(s.pixels is not None or not s.images for s in samples) and any(
            s.pixels is not None for s in samples):  # preprocessed by stream workers: stack them
        out = {"pixel_values": torch.cat([s.pixels for s in samples if s.pixels is not None])}
        if model.variable_tokens:
            out["image_sizes"] = [size for s in samples for size in (s.image_sizes or [])]
        return out
    images = [im for s in samples for im in s.images]
    if not images:
        return {}
    if cache is not None:
        return cache.inputs(model, images)
    opened = [open_image(im, s.where) for s in samples for im in s.images]
    out: dict = {"pixel_values": model.vision.preprocess(opened)}
    if model.variable_tokens:  # AnyRes packs each image by its size
        out["image_sizes"] = [(im.height, im.width) for im in opened]
    return out


def run_stage(model: VisionLanguageModel, samples: list | StreamBatches, *, stage: str, output_dir: Path,
              config: dict, batch_size: int = 16, grad_accum: int = 1, lr: float = 1e-3, max_steps: int = 0,
              epochs: float = 1.0, warmup_ratio: float = 0.03, weight_decay: float = 0.0,
              max_grad_norm: float = 1.0, precision: str = "bf16", seed: int = 0, save_every: int = 0,
              log_every: int = 10, train_vision_tower: bool = False, cache: FeatureCache | None = None,
              resume: bool = False, progress: bool = True, objective: Objective | None = None) -> StageResult:
    """Train `model` in place on `samples` for one stage; checkpoints go to output_dir/checkpoint-<step>.
    `objective` defaults to the LM loss (`LMObjective`); samples are whatever it batches, as a list (epochs in
    `batch_order`) or a `StreamBatches` (a data mixture, streamed; train/batches.py). An objective may set
    `length_group` (batch_order's group; 1 = plain shuffle) and put the real token count of a batch under
    "num_tokens" when its attention mask is not the 2D padding mask (packing, train/packing.py)."""
    objective = objective or LMObjective()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fsdp = fsdp_plugin(model)  # None unless launched with an FSDP accelerate config
    if fsdp is not None and (resume or has_lora(model.llm)):
        raise ValueError("FSDP runs save the gathered weights only: no --resume (the optimizer state is sharded) "
                         "and no LoRA adapters; use DDP (a launch without the FSDP config) for those")
    # split_batches: the loop splits each global batch over the processes itself, so the prepared scheduler must
    # step once per optimizer step; by default accelerate steps it once per process (schedule `world` x too fast).
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no",
                              gradient_accumulation_steps=grad_accum, fsdp_plugin=fsdp,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    parts = trainable_parts(stage, train_vision_tower)
    apply_stage(model, stage, train_vision_tower, verbose=accelerator.is_main_process and progress)
    if cache is not None and "vision" in parts:
        raise ValueError("cached vision features need a frozen tower, but this stage trains it")

    world, rank = accelerator.num_processes, accelerator.process_index
    loss_units = getattr(objective, "loss_units", None)
    if isinstance(samples, StreamBatches):
        batches: BatchSource = samples
    else:
        batches = EpochBatches(samples, batch_size * world, seed, [objective.length(s) for s in samples],
                               getattr(objective, "length_group", 32))
    steps = batches.steps(max_steps, epochs, grad_accum)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(warmup_ratio * steps), steps)
    start_step = 0
    if resume and (ckpt := latest_checkpoint(output_dir)) is not None:
        load_trained_parts(model, ckpt)
        opt_state = torch.load(ckpt / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
        saved = read_state(ckpt)
        start_step = saved["step"]
        batches.load_state_dict(saved.get("data"))
        if accelerator.is_main_process:
            print(f"resuming {stage} from {ckpt} at step {start_step}/{steps}")
    wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if accelerator.distributed_type == DistributedType.FSDP:
        # FSDP replaced the parameters with sharded ones (prepare remapped the optimizer): clip those.
        params = [p for p in wrapped.parameters() if p.requires_grad]

    metrics_path = output_dir / "metrics.jsonl"
    losses: list[tuple[int, float]] = []
    pad_id = model.tokenizer.pad_token_id
    micro = start_step * grad_accum  # micro-batches already consumed: resume continues the same order
    start = time.time()
    tokens_seen = 0
    data_seconds = 0.0
    loss_value = float("nan")
    bar = tqdm(total=steps, initial=start_step, desc=stage, unit="step", disable=not (progress and accelerator.is_main_process))
    step = start_step
    with metrics_path.open("a") as metrics, contextlib.closing(batches):
        while step < steps:
            window_loss = 0.0
            window_extra: dict[str, float] = {}
            for _ in range(grad_accum):
                fetch_start = time.perf_counter()
                batch = objective.batch(model, batches.get(micro, rank, world), cache, pad_id)
                n_tokens = batch.pop("num_tokens", None)
                n_tokens = int(batch["attention_mask"].sum()) if n_tokens is None else int(n_tokens)
                units = loss_units(batch) if world > 1 and loss_units is not None else None
                batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                data_seconds += time.perf_counter() - fetch_start
                with accelerator.accumulate(wrapped), accelerator.autocast():
                    loss, extra = objective.loss(wrapped, batch)
                    if world > 1:  # one process: the loss is left exactly as the objective computed it
                        synced = sync_loss(accelerator, loss, extra, units, n_tokens)
                        loss, extra = synced.loss, synced.extra
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                window_loss += (loss.item() if world == 1 else synced.value) / grad_accum
                for k, v in extra.items():
                    window_extra[k] = window_extra.get(k, 0.0) + v / grad_accum
                tokens_seen += n_tokens if world == 1 else synced.tokens
                micro += 1
            step += 1
            loss_value = window_loss
            losses.append((step, loss_value))
            elapsed = max(1e-9, time.time() - start)
            rate = tokens_seen / elapsed
            bar.update(1)
            # The objective's first two metrics ride along (DPO: reward margin and accuracy).
            shown = {k: f"{v:.3f}" for k, v in list(window_extra.items())[:2]}
            bar.set_postfix(loss=f"{loss_value:.4f}", **shown, tok_s=f"{rate:,.0f}", data=f"{data_seconds / elapsed:.0%}")
            if accelerator.is_main_process and (step % log_every == 0 or step == steps):
                metrics.write(json.dumps({"stage": stage, "step": step, "loss": round(loss_value, 5),
                                          **{k: round(v, 5) for k, v in window_extra.items()},
                                          "lr": scheduler.get_last_lr()[0], "tokens": tokens_seen,
                                          "tokens_per_second": round(rate, 1),
                                          "data_share": round(data_seconds / elapsed, 4),
                                          "elapsed": round(elapsed, 2)}) + "\n")
                metrics.flush()
            if save_every and step % save_every == 0 and step < steps:
                _save(accelerator, model, wrapped, parts, output_dir / f"checkpoint-{step}", config, stage, step,
                      steps, optimizer, scheduler, batches.state_dict())
        data_state = batches.state_dict()
    bar.close()
    final = _save(accelerator, model, wrapped, parts, output_dir / f"checkpoint-{step}", config, stage, step, steps,
                  optimizer, scheduler, data_state)
    seconds = time.time() - start
    return StageResult(stage, steps, seconds, loss_value, tokens_seen / max(1e-9, seconds), final, losses,
                       data_seconds)


def _save(accelerator: Accelerator, model: VisionLanguageModel, wrapped: torch.nn.Module, parts: tuple[str, ...],
          path: Path, config: dict, stage: str, step: int, steps: int, optimizer, scheduler,
          data_state: dict | None) -> Path | None:
    accelerator.wait_for_everyone()
    source: Any = model
    if accelerator.distributed_type == DistributedType.FSDP:
        # Every rank joins the gather of the full weights; the optimizer state stays sharded (not saved).
        source = gathered_model(accelerator.get_state_dict(wrapped), model, parts)
        optimizer = scheduler = None
    if not accelerator.is_main_process:
        return None
    state = {"stage": stage, "step": step, "total_steps": steps}
    if data_state is not None:  # a stream's position: --resume continues with exactly the next samples
        state["data"] = data_state
    return save_checkpoint(path, source, parts, config, state, optimizer, scheduler)
