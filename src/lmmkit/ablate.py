"""`lmmkit ablate`: the bridge designs side by side, on the same ShapesWorld data and the same budget.

Every design starts from the same shipped parts, trains align (bridge only, on captions) then SFT
(bridge + LLM, on conversations) for the same number of optimizer steps, with the same batch size and
learning-rate schedule, and is scored on the same held-out POPE questions through the eval harness
(`evaluate_stage`, as the demo does). What differs between designs, and is therefore recorded, is what
each step costs: visual tokens per image, training tokens consumed, parameters, wall time. POPE F1 on a
fixed subset is measured a few times during SFT, so score can be plotted against training tokens.

Each design's result is written to OUT/designs/NAME.json when it finishes; a rerun with the same
settings skips the designs already there (a killed run resumes per design). The tables and plot are
written by `lmmkit.ablate_report`; `lmmkit.ablate_cli` holds the subcommand.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmmkit.atomic import atomic_write
from lmmkit.config import ConfigError, config_from_dict, config_to_dict
from lmmkit.data.dataset import EncodedSample
from lmmkit.data.shapes.bench import write_bench
from lmmkit.data.shapes.generate import ShapesDataset, generate_shapes
from lmmkit.eval.generation import lm_loss
from lmmkit.eval.pope import SPLITS
from lmmkit.eval.shapes import evaluate_stage, pope_by_split
from lmmkit.models.build import build_from_spec
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.train.features import FeatureCache
from lmmkit.train.loop import LMObjective, run_stage
from lmmkit.train.run import load_samples
from lmmkit.train.stages import trainable_parts

# The model-section keys each design sets on top of the shared parts (llm, vision). Kept at the
# library's defaults where one exists, so a design here is what `bridge: NAME` gives a user.
DESIGNS: dict[str, dict[str, Any]] = {
    "mlp": {"bridge": "mlp", "bridge_layers": 2},  # LLaVA: image tokens as word embeddings, 1 per tower cell
    "resampler": {"bridge": "resampler", "bridge_queries": 32},  # Flamingo's Perceiver: 32 learned queries
    "qformer": {"bridge": "qformer", "bridge_queries": 32},  # BLIP-2
    # Flamingo: gated cross-attention before every 2nd layer of the 4-layer shipped LM; 1 marker token
    "cross-attention": {"bridge": "cross-attention", "cross_attention_every": 2},
    "fuyu": {"vision": "patch", "bridge": "fuyu", "patch_size": 8},  # no encoder: 8x8 patches + row breaks
    "fused": {"vision_extra": "shipped:vision"},  # Prismatic-style fusion (the shipped tower twice)
    "pixel-shuffle": {"bridge": "mlp", "pixel_shuffle": 2},  # SmolVLM: 2x2 cells -> 1 token (16 per image)
}
DEFAULT_DESIGNS = "mlp,resampler,qformer,cross-attention,fuyu"
MAX_LENGTH = 512


class AblationError(ValueError):
    """A design that is unknown or cannot be built, or data that does not match the settings."""


@dataclass
class AblateSettings:
    designs: tuple[str, ...] = tuple(DEFAULT_DESIGNS.split(","))
    out: Path = Path("runs/ablate")
    data: Path | None = None  # an existing ShapesWorld folder; None = generate OUT/data
    seed: int = 0
    # Defaults sized so that the five default designs finish in under 20 minutes on 2 shared CPU cores
    # (docs/ablation.md has the measured run).
    n_train: int = 4000
    n_test: int = 400
    n_pope_images: int = 200
    align_steps: int = 50
    sft_steps: int = 150
    batch_size: int = 64
    align_lr: float = 2e-3  # the demo's learning rates, for every design alike
    sft_lr: float = 2e-3
    warmup_ratio: float = 0.03
    probes: int = 4  # POPE-subset measurements during SFT: every sft_steps / probes steps
    probe_questions: int = 150  # per split, whole images (6 questions each) from the top of each file
    llm: str = "shipped:lm"
    vision: str = "shipped:vision"
    workers: int = 2  # image rendering processes
    threads: int = 0  # 0 = torch's default
    progress: bool = True

    def budget(self) -> dict[str, Any]:
        """What a design's result depends on: a stored result is reused only when this is unchanged."""
        keys = ("seed", "n_train", "n_test", "n_pope_images", "align_steps", "sft_steps", "batch_size", "align_lr",
                "sft_lr", "warmup_ratio", "probes", "probe_questions", "llm", "vision")
        return {k: getattr(self, k) for k in keys} | {"data": str(self.data_dir)}

    @property
    def data_dir(self) -> Path:
        return self.data if self.data is not None else self.out / "data"


def parse_designs(text: str) -> tuple[str, ...]:
    """"mlp, fuyu" -> ("mlp", "fuyu"); unknown or repeated names are an AblationError listing the known ones."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in DESIGNS]
    if unknown or not names:
        raise AblationError(f"unknown design(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                            f"choose from: {', '.join(DESIGNS)}")
    if len(set(names)) != len(names):
        raise AblationError(f"a design is named twice in {text!r}")
    return names


def design_model_section(name: str, llm: str = "shipped:lm", vision: str = "shipped:vision") -> dict[str, Any]:
    """The config's model section for design `name` on the given parts."""
    if name not in DESIGNS:
        raise AblationError(f"unknown design {name!r}; choose from: {', '.join(DESIGNS)}")
    return {"llm": llm, "vision": vision, **DESIGNS[name]}


def build_design(name: str, llm: str, vision: str, seed: int) -> VisionLanguageModel:
    """Validate the design's model section like a config, then build it; any failure names the design."""
    section = design_model_section(name, llm, vision)
    try:
        return build_from_spec(config_from_dict({"model": section}, source=f"design {name}").model, seed=seed)
    except (ConfigError, ValueError, OSError, RuntimeError) as err:
        raise AblationError(f"design {name!r} ({section}) cannot be built: {err}") from err


def _tower_key(section: dict[str, Any]) -> str:
    """Designs that share a tower share its cached features (the same frozen encoder, the same images)."""
    keys = ("vision", "vision_extra", "vision_select_layer", "vision_drop_cls", "patch_size")
    return json.dumps({k: section.get(k) for k in keys}, sort_keys=True)


class _Measured:
    """LMObjective that also counts the tokens each step consumes and, at chosen steps, measures POPE.

    run_stage has no callback, but with grad_accum 1 it calls the objective's `batch` exactly once per
    optimizer step, before that step's forward pass: `batch` call k sees the model after k steps."""

    def __init__(self, model: VisionLanguageModel, probe: Any = None, at: frozenset[int] = frozenset()) -> None:
        self.inner, self.model, self.probe, self.at = LMObjective(), model, probe, at
        self.steps = 0
        self.batch_sizes: set[int] = set()  # samples per step, as measured (not as configured)
        self.tokens = {"total": 0, "visual": 0, "padded": 0}
        self.probe_seconds = 0.0

    def length(self, sample: EncodedSample) -> int:
        return self.inner.length(sample)

    def batch(self, model: VisionLanguageModel, samples: list, cache: FeatureCache | None, pad_id: int) -> dict:
        if self.steps in self.at and self.probe is not None:
            start = time.time()
            modes = [(m, m.training) for m in model.modules()]
            self.probe(self.steps, self.tokens["total"])
            for m, mode in modes:  # evaluation switches to eval mode; training resumes in the stage's modes
                m.train(mode)
            self.probe_seconds += time.time() - start
        batch = self.inner.batch(model, samples, cache, pad_id)
        # Non-pad tokens, as run_stage counts them; visual = image placeholders in the sequence.
        self.tokens["total"] += int(batch["attention_mask"].sum())
        self.tokens["visual"] += int(((batch["input_ids"] == model.image_token_id) & (batch["attention_mask"] > 0)).sum())
        self.tokens["padded"] += batch["input_ids"].numel()
        self.steps += 1
        self.batch_sizes.add(len(samples))
        return batch

    def loss(self, wrapped: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return self.inner.loss(wrapped, batch)


def _pope_metrics(result: dict) -> dict[str, Any]:
    """The harness's POPE result, reduced to what the ablation reports (strict = the official parser)."""
    by_split = pope_by_split(result)
    keep = ("f1", "accuracy", "precision", "recall", "yes_ratio", "n", "unparseable")
    out: dict[str, Any] = {s: {k: by_split[s]["strict"][k] for k in keep} | {"robust_f1": by_split[s]["robust"]["f1"]}
                           for s in SPLITS}
    out["mean_f1"] = sum(out[s]["f1"] for s in SPLITS) / len(SPLITS)
    return out


def prepare_data(s: AblateSettings) -> tuple[ShapesDataset, Path, Path]:
    """(dataset, POPE bench root, POPE probe-subset root): generated once, reused by every design."""
    ds = ShapesDataset.at(s.data_dir)
    if not ds.world_json.is_file():
        if s.data is not None:
            raise AblationError(f"--data {s.data}: not a ShapesWorld dataset (no world.json)")
        ds = generate_shapes(s.data_dir, seed=s.seed, n_train=s.n_train, n_test=s.n_test,
                             n_pope_images=s.n_pope_images, workers=s.workers, progress=s.progress)
    elif s.data is None and (ds.n_train, ds.n_test, ds.n_pope_images) != (s.n_train, s.n_test, s.n_pope_images):
        raise AblationError(f"{s.data_dir} holds {ds.n_train} training / {ds.n_test} test / {ds.n_pope_images} POPE "
                            f"images, not {s.n_train} / {s.n_test} / {s.n_pope_images}: use another --out, or "
                            "pass that folder as --data")
    bench = s.data_dir / "bench"
    if not (bench / "pope").is_dir():
        write_bench(s.data_dir, bench, seed=s.seed)
    subset = s.out / "pope-subset"
    folder = subset / "pope"
    folder.mkdir(parents=True, exist_ok=True)
    per_split = max(6, s.probe_questions // 6 * 6)  # whole images: each has 3 yes and 3 no questions
    for split in SPLITS:
        rows = (bench / "pope" / f"coco_pope_{split}.json").read_text(encoding="utf-8").splitlines()
        atomic_write(folder / f"coco_pope_{split}.json", "\n".join(rows[:per_split]) + "\n")
    images = folder / "images"
    if not images.exists():
        images.symlink_to((bench / "pope" / "images").resolve(), target_is_directory=True)
    return ds, bench, subset


def _stage_config(s: AblateSettings, section: dict, stage: str, ds: ShapesDataset, work: Path,
                  init_from: Path | None) -> dict:
    """The full config a checkpoint carries, so `load_model` / `lmmkit eval` can rebuild it later."""
    align = stage == "align"
    cfg = config_from_dict({
        "model": section,
        "data": {"train": str(ds.train_captions if align else ds.train_conversations),
                 "image_folder": str(ds.image_folder), "max_length": MAX_LENGTH},
        "train": {"stage": stage, "max_steps": s.align_steps if align else s.sft_steps, "batch_size": s.batch_size,
                  "lr": s.align_lr if align else s.sft_lr, "warmup_ratio": s.warmup_ratio, "seed": s.seed,
                  "output_dir": str(work / stage), "init_from": str(init_from) if init_from else None},
    }, source="lmmkit ablate", base=Path.cwd())
    return config_to_dict(cfg)


def _params(model: VisionLanguageModel, stage: str) -> int:
    """Unique parameters a stage trains (tied weights counted once)."""
    seen = {id(p): p.numel() for part in trainable_parts(stage) for p in getattr(model, part).parameters()}
    return sum(seen.values())


def run_design(name: str, model: VisionLanguageModel, s: AblateSettings, ds: ShapesDataset, bench: Path,
               subset: Path, caches: dict[str, FeatureCache]) -> dict[str, Any]:
    """Train one design (align, then SFT with POPE probes), evaluate it, and return its result."""
    section = design_model_section(name, s.llm, s.vision)
    work = s.out / "runs" / name
    shutil.rmtree(work, ignore_errors=True)  # a killed attempt's checkpoints and metrics are not reused
    timings: dict[str, float] = {}
    t = time.time()

    def lap(what: str) -> None:
        nonlocal t
        timings[what] = round(time.time() - t, 1)
        t = time.time()

    captions, bad_c = load_samples(model, ds.train_captions, ds.image_folder, MAX_LENGTH)
    convs, bad_s = load_samples(model, ds.train_conversations, ds.image_folder, MAX_LENGTH)
    held_out, bad_t = load_samples(model, ds.test_conversations, ds.image_folder, MAX_LENGTH)
    lap("tokenize")
    cache = caches.setdefault(_tower_key(section), FeatureCache())
    cache.fill(model, [im for smp in captions + convs + held_out for im in smp.images],
               desc=f"{name}: encode images (frozen tower)")
    lap("encode images")

    align = _Measured(model)
    r_align = run_stage(model, captions, stage="align", output_dir=work / "align", batch_size=s.batch_size,
                        config=_stage_config(s, section, "align", ds, work, None), lr=s.align_lr,
                        max_steps=s.align_steps, warmup_ratio=s.warmup_ratio, seed=s.seed, cache=cache,
                        objective=align, progress=s.progress)
    t = time.time()

    curve: list[dict[str, Any]] = []

    def probe(step: int, sft_tokens: int) -> None:
        pope = _pope_metrics(evaluate_stage(model, subset, f"{name} sft step {step}", features=cache)["model"]["pope"])
        curve.append({"sft_step": step, "tokens": align.tokens["total"] + sft_tokens, "mean_f1": pope["mean_f1"],
                      "f1": {sp: pope[sp]["f1"] for sp in SPLITS},
                      "accuracy": sum(pope[sp]["accuracy"] for sp in SPLITS) / len(SPLITS),
                      "yes_ratio": sum(pope[sp]["yes_ratio"] for sp in SPLITS) / len(SPLITS)})

    every = s.sft_steps / max(1, s.probes)
    sft = _Measured(model, probe, frozenset(round(every * i) for i in range(1, s.probes)) - {0, s.sft_steps})
    probe(0, 0)  # after align, before any SFT step
    first_probe = time.time() - t
    r_sft = run_stage(model, convs, stage="sft", output_dir=work / "sft", batch_size=s.batch_size,
                      config=_stage_config(s, section, "sft", ds, work, r_align.checkpoint), lr=s.sft_lr,
                      max_steps=s.sft_steps, warmup_ratio=s.warmup_ratio, seed=s.seed, cache=cache,
                      objective=sft, progress=s.progress)
    t = time.time()
    probe(s.sft_steps, sft.tokens["total"])
    lap("probes")
    timings["probes"] = round(timings["probes"] + sft.probe_seconds + first_probe, 1)

    model.eval()
    pope = _pope_metrics(evaluate_stage(model, bench, f"{name} final", features=cache)["model"]["pope"])
    lap("eval pope")
    loss = lm_loss(model, held_out, cache=cache)
    lap("eval lm loss")
    key = next(iter(cache.features))
    return {
        "design": name, "model": section, "budget": s.budget(),
        "tokens_per_image": model.tokens_per_image,  # visual tokens in the LLM's sequence
        "image_features_per_image": int(cache.features[key].shape[0]),  # what the bridge reads (tower grid)
        "params": {"total": sum(p.numel() for p in model.parameters()),
                   "bridge": sum(p.numel() for p in model.bridge.parameters()),
                   "trainable_align": _params(model, "align"), "trainable_sft": _params(model, "sft")},
        "steps": {"align": align.steps, "sft": sft.steps},  # batches each stage consumed (counted)
        "batch_size": sorted(align.batch_sizes | sft.batch_sizes),
        "lr": {"align": s.align_lr, "sft": s.sft_lr, "schedule": f"linear warmup {s.warmup_ratio:g} + cosine"},
        "training_tokens": {"align": align.tokens, "sft": sft.tokens,
                            "total": align.tokens["total"] + sft.tokens["total"]},
        "final_loss": {"align": round(r_align.final_loss, 4), "sft": round(r_sft.final_loss, 4)},
        "pope": pope, "curve": curve,
        "lm_loss": {"loss": round(loss["loss"], 4), "perplexity": round(loss["perplexity"], 4), "tokens": loss["tokens"]},
        # Training time only (the probes run inside the SFT loop, so their time is taken out of it).
        "seconds": {"align": round(r_align.seconds, 1), "sft": round(r_sft.seconds - sft.probe_seconds, 1), **timings},
        "sft_tokens_per_second": round(sft.tokens["total"] / max(1e-9, r_sft.seconds - sft.probe_seconds)),
        "bad_records": bad_c.total + bad_s.total + bad_t.total,
    }


def _done(path: Path, budget: dict[str, Any]) -> dict[str, Any] | None:
    """A stored design result made with this budget, or None (absent, unreadable, or other settings)."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("budget") == budget else None


def run_ablation(s: AblateSettings) -> dict[str, Any]:
    """Run (or resume) the ablation and write OUT/ablation.{json,md,html,svg}; returns the JSON's content."""
    from lmmkit.ablate_report import write_outputs

    if s.threads:
        torch.set_num_threads(s.threads)
    start, load_start = time.time(), os.getloadavg()[0]
    names = parse_designs(",".join(s.designs))
    budget = s.budget()
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        if (found := _done(s.out / "designs" / f"{name}.json", budget)) is not None:
            results[name] = found
            print(f"{name}: done in an earlier run with the same settings, skipped")
    todo = [n for n in names if n not in results]
    # Build every remaining design before any data is generated: a bad one fails in seconds, not after hours.
    models = {n: build_design(n, s.llm, s.vision, s.seed) for n in todo}
    ds, bench, subset = prepare_data(s)
    caches: dict[str, FeatureCache] = {}
    for i, name in enumerate(todo):
        elapsed = time.time() - start
        eta = f", ETA {elapsed / i * (len(todo) - i) / 60:.1f} min" if i else ""
        print(f"\n[{i + 1}/{len(todo)}] design {name}: {dict(DESIGNS[name])} (elapsed {elapsed / 60:.1f} min{eta})")
        t = time.time()
        result = run_design(name, models.pop(name), s, ds, bench, subset, caches)
        result["seconds"]["design total"] = round(time.time() - t, 1)
        atomic_write(s.out / "designs" / f"{name}.json", json.dumps(result, indent=1))
        results[name] = result
        print(f"{name}: POPE F1 {result['pope']['mean_f1']:.3f} (mean of 3 splits), "
              f"{result['tokens_per_image']} visual tokens per image, {result['seconds']['design total']:.0f} s")
    summary = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
               "budget": budget, "designs": {n: results[n] for n in names},
               "wall_seconds": round(time.time() - start, 1),
               "designs_run_now": todo, "threads": torch.get_num_threads(),
               # other jobs on the machine change every timing here: record how busy it was
               "load_average": {"start": load_start, "end": os.getloadavg()[0]}}
    paths = write_outputs(summary, s.out)
    print("\n" + paths["table"])
    print(f"wall time {summary['wall_seconds'] / 60:.1f} min; " + ", ".join(str(p) for k, p in paths.items()
                                                                           if k != "table"))
    return summary
