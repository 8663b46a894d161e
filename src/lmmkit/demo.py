"""`lmmkit demo`: the main job on the built-in default, the way real LMMs are made.

ShapesWorld data -> the shipped pretrained LM and vision tower -> align (bridge only, on
captions) -> SFT (bridge + LLM, tower frozen with cached features, on instruction
conversations) -> POPE on held-out images with a blind control, the LM loss, a sample
conversation -> a results table, results.json and report.html.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from lmmkit.config import config_from_dict, config_to_dict
from lmmkit.data.shapes.bench import write_bench
from lmmkit.data.shapes.generate import generate_shapes, load_scenes
from lmmkit.data.shapes.text import SHORT_ANSWER
from lmmkit.eval.generation import answer_questions, lm_loss
from lmmkit.eval.report import format_table, write_report
from lmmkit.eval.shapes import CONTROLS, TWIN_TASKS, evaluate_stage, pope_by_split
from lmmkit.eval.summary import format_benchmarks, format_stage_effects, headline
from lmmkit.eval.task_stats import compare_runs
from lmmkit.models.build import build_vlm, describe
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.train.features import FeatureCache, open_image
from lmmkit.train.loop import StageResult, run_stage
from lmmkit.train.run import load_samples


@dataclass
class DemoSettings:
    out: Path = Path("runs/demo")
    seed: int = 0
    n_train: int = 8000
    n_test: int = 600
    n_pope_images: int = 300
    align_steps: int = 100
    sft_steps: int = 500
    batch_size: int = 64
    align_lr: float = 2e-3
    sft_lr: float = 2e-3
    warmup_ratio: float = 0.03
    llm: str = "shipped:lm"
    vision: str = "shipped:vision"
    from_scratch: bool = False  # pretrain the LM and tower first, instead of using llm / vision
    lm_pretrain_steps: int = 1500
    vision_pretrain_steps: int = 1200
    threads: int = 0  # 0 = torch's default


class StageSettings(Protocol):
    """What train_demo_stage reads of a run's settings (DemoSettings and the studies built on the demo)."""

    seed: int
    batch_size: int
    align_steps: int
    sft_steps: int
    align_lr: float
    sft_lr: float
    warmup_ratio: float


def train_demo_stage(model: VisionLanguageModel, s: StageSettings, stage: str, samples: list, data_file: Path,
                     image_folder: Path, out_dir: Path, init_from: Path | str | None, cache: FeatureCache,
                     source: str = "lmmkit demo", llm: str = "shipped:lm", vision: str = "shipped:vision",
                     progress: bool = True) -> StageResult:
    """One demo stage (align: bridge on captions; sft: bridge + LLM on conversations) in place on `model`,
    with the frozen tower's cached features; the checkpoint's config says how it was made (`source`)."""
    steps, lr = (s.align_steps, s.align_lr) if stage == "align" else (s.sft_steps, s.sft_lr)
    cfg = config_to_dict(config_from_dict({
        "model": {"llm": llm, "vision": vision},
        "data": {"train": str(data_file), "image_folder": str(image_folder)},
        "train": {"stage": stage, "max_steps": steps, "batch_size": s.batch_size, "lr": lr, "seed": s.seed,
                  "output_dir": str(out_dir), "init_from": str(init_from) if init_from else None},
    }, source=source, base=Path.cwd()))
    return run_stage(model, samples, stage=stage, output_dir=out_dir, config=cfg, batch_size=s.batch_size, lr=lr,
                     max_steps=steps, seed=s.seed, cache=cache, warmup_ratio=s.warmup_ratio, progress=progress)


def _data_uri(image) -> str:
    buf = io.BytesIO()
    open_image(image).resize((192, 192), 0).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_demo(s: DemoSettings) -> dict:
    if s.threads:
        torch.set_num_threads(s.threads)
    timings: dict[str, float] = {}
    t0 = time.time()

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.time() - since, 1)
        return time.time()

    t = time.time()
    generate_shapes(s.out / "data", seed=s.seed, n_train=s.n_train, n_test=s.n_test,
                           n_pope_images=s.n_pope_images)
    data_dir = s.out / "data"
    bench = write_bench(data_dir)["pope"].parent  # the benchmark twins, in the official formats
    t = lap("generate data", t)

    llm, vision = s.llm, s.vision
    if s.from_scratch:
        from lmmkit.train.pretrain_lm import pretrain_lm
        from lmmkit.train.pretrain_vision import pretrain_vision

        pretrain_vision(s.out / "parts" / "vision", steps=s.vision_pretrain_steps, seed=s.seed)
        t = lap("pretrain vision", t)
        pretrain_lm(s.out / "parts" / "lm", steps=s.lm_pretrain_steps, seed=s.seed)
        t = lap("pretrain lm", t)
        llm, vision = str(s.out / "parts" / "lm"), str(s.out / "parts" / "vision")

    model = build_vlm(llm, vision, seed=s.seed)
    print(f"model: {describe(model)}; {model.tokens_per_image} visual tokens per image")
    images = data_dir / "images"
    captions, bad_c = load_samples(model, data_dir / "train" / "captions.json", images, 512)
    convs, bad_s = load_samples(model, data_dir / "train" / "conversations.json", images, 512)
    test_convs, bad_t = load_samples(model, data_dir / "test" / "conversations.json", images, 512)
    t = lap("load + tokenize", t)

    cache = FeatureCache()
    cache.fill(model, [im for smp in convs + test_convs for im in smp.images], desc="encode images (frozen tower)")
    t = lap("encode images", t)

    stages = []
    r = train_demo_stage(model, s, "align", captions, data_dir / "train" / "captions.json", images, s.out / "align",
                         None, cache, llm=llm, vision=vision)
    stages.append(r)
    t = lap("align", t)
    # Each stage's contribution, measured: POPE right after the bridge-only align stage.
    features = FeatureCache()  # the frozen tower's features of the benchmark images, shared by all evals
    after_align = evaluate_stage(model, bench, "after align", features=features)["model"]["pope"]
    t = lap("eval pope after align", t)
    r = train_demo_stage(model, s, "sft", convs, data_dir / "train" / "conversations.json", images, s.out / "sft",
                         r.checkpoint, cache, llm=llm, vision=vision)
    stages.append(r)
    t = lap("sft", t)

    model.eval()
    final = evaluate_stage(model, bench, "after sft", ("pope", *TWIN_TASKS), features=features, controls=True)
    pope = {"model": pope_by_split(final["model"]["pope"]),
            **{name: pope_by_split(final[name]["pope"]) for name in CONTROLS},
            "after align only": pope_by_split(after_align)}
    # Did SFT change each score significantly? McNemar on the same questions, paired bootstrap interval.
    sft_effect = compare_runs({"tasks": {"pope": after_align}}, {"tasks": {"pope": final["model"]["pope"]}})
    t = lap("eval pope, blind controls, mme, mmmu, mathvista twins", t)
    loss = lm_loss(model, test_convs, cache=cache)
    t = lap("eval lm loss", t)

    scene = load_scenes(data_dir / "test" / "scenes.jsonl")[0]
    image = images / scene.extra["image"]
    absent = next(c for c in ("red circle", "blue square", "green star", "yellow triangle") if c not in scene.names)
    questions = ["Describe the image in detail.", f"Is there a {scene.names[0]} in the image?\n{SHORT_ANSWER}",
                 f"Is there a {absent} in the image?\n{SHORT_ANSWER}", "How many objects are there?"]
    answers = answer_questions(model, [(image, q) for q in questions], cache=cache, max_new_tokens=64,
                               progress=False)
    conversation = [m for q, a in zip(questions, answers, strict=True)
                    for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    wall = round(time.time() - t0, 1)

    results = {
        "pope": pope,
        "targets": {"pope_f1": 0.95, "yes_ratio": [0.45, 0.55]},
        "lm_loss": {k: round(v, 4) if isinstance(v, float) else v for k, v in loss.items()},
        "pope_intervals": final["model"]["pope"]["intervals"],
        "stage_effects": {"align -> sft": [{k: row[k] for k in ("parser", "metric", "a", "b", "difference", "low",
                                                                "high", "test", "p_value", "significant")}
                                           for row in sft_effect["tasks"]["pope"]["rows"]]},
        "benchmarks": {task: {"rows": headline(task, final["model"][task]), "n": final["model"][task]["n_items"],
                              "unparseable": final["model"][task]["unparseable"],
                              "intervals": final["model"][task]["intervals"]}
                       for task in TWIN_TASKS},
        "stages": [{"name": x.stage, "steps": x.steps, "final_loss": round(x.final_loss, 4),
                    "seconds": round(x.seconds, 1), "tokens_per_second": round(x.tokens_per_second),
                    "data_share": round(x.data_share, 4),
                    "checkpoint": str(x.checkpoint)} for x in stages],
        "loss_curves": {x.stage: [[a, round(b, 4)] for a, b in x.losses] for x in stages},
        "timings": timings,
        "wall_seconds": wall,
        "sample": {"image": _data_uri(image), "truth": scene.names, "conversation": conversation},
        "data": {"train_images": s.n_train, "test_images": s.n_test, "pope_images": s.n_pope_images,
                 "bad_records": bad_c.total + bad_s.total + bad_t.total, "folder": str(data_dir)},
        "parts": {"llm": llm, "vision": vision, "from_scratch": s.from_scratch},
        "settings": {k: str(v) for k, v in vars(s).items()},
    }
    paths = write_report(results, s.out / "report", title="lmmkit demo: ShapesWorld")
    print()
    print(format_table(results))
    print(format_stage_effects(results["stage_effects"]))
    print(format_benchmarks(results["benchmarks"]))
    print(f"LM loss on held-out conversations (answer tokens): {loss['loss']:.4f} (perplexity {loss['perplexity']:.3f})")
    print("\nSample conversation about a held-out image (truth: " + ", ".join(scene.names) + ")")
    for m in conversation:
        print(f"  {m['role']:>9}: {m['content']}")
    print("\ntimings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()) + f"; total {wall}")
    print("share of training time spent waiting for data: "
          + ", ".join(f"{x.stage} {x.data_share:.1%}" for x in stages))
    print(f"report: {paths[1]}\nscores: {paths[0]}")
    return results

