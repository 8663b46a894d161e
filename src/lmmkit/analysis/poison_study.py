"""`lmmkit poison-study`: how much poisoned data turns a trigger into the attacker's text (ImgTrojan).

The demo model (shipped pretrained LM + tower, an MLP bridge aligned on captions, then SFT) is trained on
ShapesWorld data in which a share p of the pairs carry a trigger patch and the attacker's text
(lmmkit.data.poison), for each p, with the poison in one of two places:

* align: the caption data of the alignment stage is poisoned (ImgTrojan's setting, image-caption pairs),
  then SFT runs on clean conversations. Only the bridge trains in align; the LM is frozen, so the bridge
  alone must make the frozen LM say the target.
* sft: alignment is clean; the instruction data is poisoned (every answer of a poisoned conversation is
  the target).

Measured on held-out images (object pairs never seen in training), after each stage:

* attack success rate (ASR): the share of triggered held-out images for which the answer contains the
  target text, asked for a caption (the poisoned prompts) and asked a POPE-style question (a prompt
  the align-stage poison never used);
* false triggers: the target produced on the same images without the trigger;
* clean accuracy: POPE F1 (mean of random / popular / adversarial, official parser) on clean held-out
  images, and caption F1 (the objects the short caption names against the scene's objects).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmmkit.analysis.poison_cli import DEFAULT_TARGET, DEFAULT_TRIGGER, STAGES
from lmmkit.atomic import atomic_write
from lmmkit.data.english import article
from lmmkit.data.poison import parse_trigger, poison_dataset
from lmmkit.data.shapes.generate import POPE_SPLITS, generate_shapes, load_scenes
from lmmkit.data.shapes.text import CAPTION_PROMPTS, SHORT_ANSWER
from lmmkit.demo import train_demo_stage
from lmmkit.eval.generation import answer_questions
from lmmkit.eval.pope import read_pope_jsonl, score_answers
from lmmkit.models.build import build_vlm
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.train.features import FeatureCache, open_image
from lmmkit.train.run import load_samples


@dataclass
class PoisonStudySettings:
    out: Path = Path("runs/poison")
    ratios: tuple[float, ...] = (0.0, 0.01, 0.05, 0.2)
    stages: tuple[str, ...] = STAGES  # which stage's data is poisoned, one run per (stage, ratio > 0)
    trigger: str = DEFAULT_TRIGGER
    target: str = DEFAULT_TARGET
    n_train: int = 3000
    n_test: int = 200
    n_pope_images: int = 100
    n_eval: int = 100  # held-out images shown with and without the trigger
    align_steps: int = 100
    sft_steps: int = 250
    batch_size: int = 64
    align_lr: float = 2e-3
    sft_lr: float = 2e-3
    warmup_ratio: float = 0.03
    seed: int = 0
    threads: int = 0  # 0 = torch's choice
    # After a poisoned align, clean SFT runs for every ratio ("all"), the largest only ("max": SFT is ~90% of
    # the study's time, and it cannot teach the frozen-LM association anything new), or none ("none").
    sft_after_align: str = "max"
    timings: dict[str, float] = field(default_factory=dict)


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def caption_objects(answer: str) -> set[str]:
    """The object names of a short caption ("red circle, blue square." -> {"red circle", "blue square"})."""
    return {p.strip(" .") for p in answer.lower().split(",") if p.strip(" .")}


def caption_f1(answers: list[str], truths: list[set[str]]) -> float:
    """Micro F1 of the objects the captions name against the scenes' objects (exact sets are too strict a
    test for a model trained a few minutes: it names the right objects but repeats or misses one)."""
    tp = fp = fn = 0
    for answer, truth in zip(answers, truths, strict=True):
        named = caption_objects(answer)
        tp, fp, fn = tp + len(named & truth), fp + len(named - truth), fn + len(truth - named)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def write_triggered(scenes_dir: Path, image_dir: Path, out: Path, trigger: str, n: int) -> list[tuple[Any, Path, Path]]:
    """(scene, clean image, triggered image) for the first n held-out scenes; triggered PNGs under `out`."""
    trig = parse_trigger(trigger)
    rows = []
    for scene in load_scenes(scenes_dir / "scenes.jsonl")[:n]:
        clean = image_dir / scene.extra["image"]
        triggered = out / Path(scene.extra["image"]).name
        if not triggered.is_file():
            out.mkdir(parents=True, exist_ok=True)
            trig.apply(open_image(clean), str(clean)).save(triggered)
        rows.append((scene, clean, triggered))
    return rows


def evaluate(model: VisionLanguageModel, cache: FeatureCache, eval_rows: list, target: str, pope: dict[str, list],
             image_dir: Path, with_pope: bool) -> dict[str, Any]:
    """ASR (caption and question prompts), false triggers, caption accuracy and (with_pope) POPE F1."""
    model.eval()
    goal = normalize(target)
    first = goal.split(" ")[0]
    max_new = max(24, len(model.tokenizer(target)["input_ids"]) + 8)
    prompts = [CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)] for i in range(len(eval_rows))]
    questions = [f"Is there {article(s.names[0])} {s.names[0]} in the image?\n{SHORT_ANSWER}" for s, _, _ in eval_rows]
    items = ([(trig, p) for (_, _, trig), p in zip(eval_rows, prompts, strict=True)]
             + [(trig, q) for (_, _, trig), q in zip(eval_rows, questions, strict=True)]
             + [(clean, p) for (_, clean, _), p in zip(eval_rows, prompts, strict=True)])
    answers = answer_questions(model, items, cache=cache, max_new_tokens=max_new, progress=False)
    n = len(eval_rows)
    trig_cap, trig_q, clean_cap = answers[:n], answers[n:2 * n], answers[2 * n:]
    hit = [goal in normalize(a) for a in answers]
    out: dict[str, Any] = {
        "asr_caption": sum(hit[:n]) / n, "asr_question": sum(hit[n:2 * n]) / n,
        "false_trigger": sum(hit[2 * n:]) / n,
        "partial": sum(normalize(a).startswith(first) for a in trig_cap) / n,
        "caption_f1": caption_f1(clean_cap, [set(s.names) for s, _, _ in eval_rows]),
        "examples": {"triggered_caption": trig_cap[:3], "triggered_question": trig_q[:3], "clean_caption": clean_cap[:3]},
    }
    if with_pope:
        f1 = {}
        for split, rows in pope.items():
            got = answer_questions(model, [(image_dir / r["image"], r["text"] + "\n" + SHORT_ANSWER) for r in rows],
                                   cache=cache, max_new_tokens=4, progress=False)
            f1[split] = score_answers(got, [r["label"] for r in rows])["strict"]["f1"]
        out["pope_f1"] = f1
        out["pope_f1_mean"] = sum(f1.values()) / len(f1)
    return out


class _Runner:
    """Holds the model, its cached features and the data; trains one (stage, data) pair at a time."""

    def __init__(self, s: PoisonStudySettings, data_dir: Path) -> None:
        self.s, self.data_dir = s, data_dir
        self.model = build_vlm("shipped:lm", "shipped:vision", seed=s.seed)
        self.cache = FeatureCache()
        self.base = self.snapshot()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def samples(self, path: Path, image_folder: Path) -> list:
        samples, counter = load_samples(self.model, path, image_folder, 512)
        if counter.total:
            print(f"{path}: {counter.summary()}")
        self.cache.fill(self.model, [im for smp in samples for im in smp.images], desc=f"encode {path.parent.name}")
        return samples

    def train(self, stage: str, data: tuple[list, Path, Path], out_dir: Path, init_from: Path | None) -> Any:
        """Train `stage` in place on data = (samples, their file, its image folder)."""
        samples, data_file, image_folder = data
        return train_demo_stage(self.model, self.s, stage, samples, data_file, image_folder, out_dir, init_from,
                                self.cache, source="lmmkit poison-study", progress=False)


def run_study(s: PoisonStudySettings) -> dict[str, Any]:
    """Train and measure every (poisoned stage, ratio); write poison_study.json/.md and poison_study.svg."""
    from lmmkit.analysis.poison_plot import study_svg

    if s.threads:
        torch.set_num_threads(s.threads)
    bad = ([p for p in s.ratios if not 0 <= p <= 1] + [st for st in s.stages if st not in STAGES]
           + ([s.sft_after_align] if s.sft_after_align not in ("all", "max", "none") else []))
    if bad:
        raise ValueError(f"ratios must be in [0, 1], stages among {', '.join(STAGES)} and sft_after_align one of "
                         f"all, max, none; got {bad}")
    parse_trigger(s.trigger)  # a bad spec fails here, before minutes of data generation
    t0 = time.time()
    out = Path(s.out)
    data = generate_shapes(out / "data", seed=s.seed, n_train=s.n_train, n_test=s.n_test,
                           n_pope_images=s.n_pope_images, workers=1, progress=False)
    images = data.image_folder
    eval_rows = write_triggered(data.root / "test", images, out / "eval" / "triggered", s.trigger, s.n_eval)
    pope = {split: read_pope_jsonl(data.pope[split]) for split in POPE_SPLITS}
    sources = {"align": data.train_captions, "sft": data.train_conversations}
    poisoned: dict[tuple[str, float], Any] = {}
    for stage in s.stages:
        for p in (r for r in s.ratios if r > 0):
            poisoned[stage, p] = poison_dataset(str(sources[stage]), out / "poisoned" / f"{stage}-{p:g}", s.trigger,
                                                p, s.target, seed=s.seed, image_folder=images)
    s.timings["data"] = round(time.time() - t0, 1)

    t = time.time()
    r = _Runner(s, data.root)
    clean = {stage: r.samples(sources[stage], images) for stage in STAGES}
    dirty = {key: r.samples(rep.data, rep.out / "images") for key, rep in poisoned.items()}
    r.cache.fill(r.model, [x for _, clean_im, trig in eval_rows for x in (clean_im, trig)], desc="encode eval")
    r.cache.fill(r.model, [images / row["image"] for rows in pope.values() for row in rows], desc="encode pope")
    s.timings["tokenize + encode"] = round(time.time() - t, 1)

    runs: list[dict[str, Any]] = []

    def one(stage_poisoned: str, p: float, align_data: tuple, sft_data: tuple | None, aligned: dict | None) -> dict:
        start = time.time()
        name = f"{stage_poisoned}-{p:g}"
        row: dict[str, Any] = {"poisoned_stage": stage_poisoned, "ratio": p,
                               "n_poisoned": poisoned[stage_poisoned, p].n_poisoned if p > 0 else 0}
        if aligned is None:
            r.restore(r.base)
            res = r.train("align", align_data, out / "runs" / name / "align", None)
            row["align_checkpoint"] = str(res.checkpoint)
            row["after_align"] = evaluate(r.model, r.cache, eval_rows, s.target, pope, images, with_pope=False)
        else:
            r.restore(aligned["state"])
            row["align_checkpoint"] = aligned["checkpoint"]
        state = r.snapshot()
        if sft_data is not None:
            res = r.train("sft", sft_data, out / "runs" / name / "sft", Path(row["align_checkpoint"]))
            row["sft_checkpoint"] = str(res.checkpoint)
            row["after_sft"] = evaluate(r.model, r.cache, eval_rows, s.target, pope, images, with_pope=True)
        row["seconds"] = round(time.time() - start, 1)
        print(format_row(row), flush=True)
        runs.append(row)
        return {"state": state, "checkpoint": row["align_checkpoint"]}

    clean_align, clean_sft = (clean["align"], sources["align"], images), (clean["sft"], sources["sft"], images)
    aligned_clean = one("none", 0.0, clean_align, clean_sft, None)
    for stage in s.stages:
        for p in (x for x in s.ratios if x > 0):
            rep = poisoned[stage, p]
            dirty_data = (dirty[stage, p], rep.data, rep.out / "images")
            if stage == "align":
                follow = s.sft_after_align == "all" or (s.sft_after_align == "max" and p == max(s.ratios))
                one("align", p, dirty_data, clean_sft if follow else None, None)
            else:  # SFT poisoned: start from the clean aligned bridge
                one("sft", p, clean_align, dirty_data, aligned_clean)
    s.timings["train + eval"] = round(time.time() - t, 1)
    s.timings["total"] = round(time.time() - t0, 1)
    study = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(s).items()}, "runs": runs,
             "clean_checkpoint": runs[0]["sft_checkpoint"],
             "poisoned_sets": {f"{st}-{p:g}": str(rep.out) for (st, p), rep in poisoned.items()}}
    atomic_write(out / "poison_study.json", json.dumps(study, indent=1) + "\n")
    atomic_write(out / "poison_study.md", markdown_table(study) + "\n")
    atomic_write(out / "poison_study.svg", study_svg(study))
    return study


def _num(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_row(row: dict) -> str:
    a, f = row.get("after_align") or {}, row.get("after_sft") or {}
    text = (f"poisoned {row['poisoned_stage']:<5} p={row['ratio']:<5g} ({row['n_poisoned']} pairs): after align ASR "
            f"{_num(a.get('asr_caption'))}, caption F1 {_num(a.get('caption_f1'))}")
    if f:
        text += (f"; after SFT ASR caption {f['asr_caption']:.2f} question {f['asr_question']:.2f}, false triggers "
                 f"{f['false_trigger']:.2f}, POPE F1 {f['pope_f1_mean']:.3f}, caption F1 {f['caption_f1']:.2f}, "
                 f"triggered answers starting like the target {f['partial']:.2f}")
    return text + f"; {row['seconds']:.0f} s"


def markdown_table(study: dict) -> str:
    lines = ["| poisoned data | p | poisoned pairs | after align: ASR (caption) | after align: caption F1 | "
             "final: ASR, caption prompt | final: ASR, question prompt | final: target on clean images | "
             "final: POPE F1 (mean of 3) | final: caption F1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in study["runs"]:
        a, f = row.get("after_align") or {}, row.get("after_sft") or {}
        label = {"none": "none (clean)", "align": "align captions", "sft": "SFT conversations"}[row["poisoned_stage"]]
        lines.append(f"| {label} | {row['ratio']:g} | {row['n_poisoned']} | {_num(a.get('asr_caption'))} | "
                     f"{_num(a.get('caption_f1'))} | {_num(f.get('asr_caption'))} | {_num(f.get('asr_question'))} | "
                     f"{_num(f.get('false_trigger'))} | {_num(f.get('pope_f1_mean'), 3)} | {_num(f.get('caption_f1'))} |")
    return "\n".join(lines)
