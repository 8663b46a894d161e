"""`lmmkit train --config C`: build the model a config names, load its data, run its stage."""

from __future__ import annotations

from pathlib import Path

from lmmkit.config import Config, config_to_dict
from lmmkit.data.check import BadRecordCounter
from lmmkit.data.dataset import EncodedSample, ImageTokens, encode_records
from lmmkit.data.formats.llava import read_llava
from lmmkit.data.formats.preference import read_preferences
from lmmkit.data.mixture_spec import parse_mixture
from lmmkit.data.preference import EncodedPair, encode_preferences
from lmmkit.models.build import build_from_spec
from lmmkit.models.lora import add_lora
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.train.batches import SampleEncoder, StreamBatches
from lmmkit.train.checkpoint import load_model
from lmmkit.train.compiled import compile_decoder_layers
from lmmkit.train.dpo import DPOObjective, DPOSettings
from lmmkit.train.features import FeatureCache
from lmmkit.train.loop import StageResult, run_stage
from lmmkit.train.packing import PackedLMObjective
from lmmkit.train.stages import trainable_parts
from lmmkit.train.varlen import use_varlen_attention, varlen_available


class ModelBuildError(ValueError):
    """The config's model cannot be built from the parts it names (e.g. fused towers with different grids)."""


def image_tokens(model: VisionLanguageModel) -> ImageTokens:
    """The model's one count per image, or (AnyRes) its per-image counting function."""
    return model.image_token_counts if model.tokens_per_image is None else model.tokens_per_image


def load_samples(model: VisionLanguageModel, path: str | Path, image_folder: str | Path | None, max_length: int,
                 policy: str = "skip") -> tuple[list[EncodedSample], BadRecordCounter]:
    """Read a LLaVA JSON / JSONL file and encode it; bad records are counted (or raise, under 'stop')."""
    counter = BadRecordCounter()
    records = read_llava(Path(path), Path(image_folder) if image_folder else None, policy=policy, counter=counter)
    samples = encode_records(records, model.tokenizer, model.image_token_id, image_tokens(model), max_length,
                             counter, policy)
    return samples, counter


def load_preference_pairs(model: VisionLanguageModel, path: str | Path, image_folder: str | Path | None,
                          max_length: int, policy: str = "skip", fmt: str = "auto"
                          ) -> tuple[list[EncodedPair], BadRecordCounter]:
    """Read a preference file (chosen/rejected pairs or VLFeedback) and encode each pair's two sequences."""
    counter = BadRecordCounter()
    records = read_preferences(Path(path), Path(image_folder) if image_folder else None, fmt=fmt, policy=policy,
                               counter=counter)
    pairs = encode_preferences(records, model.tokenizer, model.image_token_id, image_tokens(model), max_length,
                               counter, policy)
    return pairs, counter


def train_from_config(cfg: Config, resume: bool = False) -> StageResult:
    t = cfg.train
    if not (cfg.data.train or cfg.data.mixture):
        what = "a preference file (chosen/rejected pairs or VLFeedback)" if t.stage == "dpo" else \
            "a LLaVA JSON / JSONL file"
        raise ValueError(f"data.train is not set: name {what} to train on" +
                         ("" if t.stage == "dpo" else ", or a mixture of sources as data.mixture"))
    try:
        model = load_model(t.init_from) if t.init_from else build_from_spec(cfg.model, seed=t.seed)
    except ValueError as err:  # parts that do not fit the chosen architecture: say so before any data is read
        raise ModelBuildError(str(err)) from err
    model.train()
    if t.lora_rank:
        wrapped = add_lora(model.llm, rank=t.lora_rank, alpha=t.lora_alpha, seed=t.seed)
        print(f"LoRA rank {t.lora_rank}, alpha {t.lora_alpha:g} on {len(wrapped)} LLM projections")
    attention = model.llm.config._attn_implementation
    if t.packing and t.precision == "bf16" and varlen_available():
        use_varlen_attention(model.llm)  # a GPU: flash varlen, one unpadded row per step, no dense mask
    if t.packing:
        print(f"packing with {model.llm.config._attn_implementation} attention")
    if t.compile:
        print(f"torch.compile: {compile_decoder_layers(model.llm)} LLM decoder layers")
    # Checked here, before any data is read: an LLM (or bridge) that cannot take the packed mask says so now.
    objective = PackedLMObjective(model, cfg.data.max_length) if t.packing else None
    if t.stage == "dpo":
        samples, counter = load_preference_pairs(model, cfg.data.train, cfg.data.image_folder, cfg.data.max_length,
                                                 cfg.data.bad_records, cfg.data.preference_format)
        print(f"{cfg.data.train}: {len(samples)} preference pairs; {counter.summary()}")
        settings = DPOSettings(beta=t.dpo_beta, loss_type=t.dpo_loss, sft_weight=t.dpo_sft_weight,
                               reference=t.dpo_reference)
        objective = DPOObjective(model, settings, tower_frozen=not t.trains_vision_tower)
    elif cfg.data.mixture:
        samples = stream_batches(model, cfg)
    else:
        samples, counter = load_samples(model, cfg.data.train, cfg.data.image_folder, cfg.data.max_length,
                                        cfg.data.bad_records)
        print(f"{cfg.data.train}: {len(samples)} samples; {counter.summary()}")
    frozen_tower = "vision" not in trainable_parts(t.stage, t.train_vision_tower)
    cache = None
    if t.cache_vision_features and frozen_tower and isinstance(samples, list):
        cache = FeatureCache()
        cache.fill(model, [im for s in samples for im in s.images])
    result = run_stage(
        model, samples, stage=t.stage, output_dir=Path(t.output_dir), config=config_to_dict(cfg),
        batch_size=t.batch_size, grad_accum=t.grad_accum, lr=t.lr, max_steps=t.max_steps, epochs=t.epochs,
        warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        precision=t.precision, seed=t.seed, save_every=t.save_every, log_every=t.log_every,
        train_vision_tower=t.train_vision_tower, cache=cache, resume=resume, objective=objective,
    )
    model.llm.set_attn_implementation(attention)  # varlen attention cannot generate: hand back the model as built
    if isinstance(samples, StreamBatches):
        bad = samples.bad_records()
        print(f"mixture: {samples.consumed * samples.global_batch} samples streamed in all; bad records skipped: "
              + (", ".join(f"{n} {reason}" for reason, n in bad.items()) or "none"))
    return result


def stream_batches(model: VisionLanguageModel, cfg: Config) -> StreamBatches:
    """data.mixture as global batches: `data.workers` processes read, decode, preprocess and tokenize."""
    spec = parse_mixture(cfg.data.mixture, seed=cfg.train.seed)
    encoder = SampleEncoder(model.tokenizer, model.image_token_id, image_tokens(model), cfg.data.max_length,
                            model.vision.preprocess, model.variable_tokens)
    names = ", ".join(f"{s.name} ({s.weight:g})" for s in spec.sources)
    print(f"mixture of {len(spec.sources)} sources: {names}; seed {spec.seed}, {cfg.data.workers} workers")
    # Per process: the loop multiplies by the number of processes. (Asking accelerate here would create its
    # process state before the Accelerator does, and every rank of a launch would then run as a single process.)
    return StreamBatches(spec, encoder, cfg.train.batch_size, cfg.data.workers, cfg.data.bad_records)
