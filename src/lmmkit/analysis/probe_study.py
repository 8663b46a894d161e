"""Do the probes separate hallucinated from grounded objects? A ShapesWorld study with exact truth.

Two kinds of object mention, both labelled against the scene graph:

* caption: the model's greedy detailed caption ("Describe the image in detail."); every object the
  CHAIR vocabulary finds in it (each object once per caption, at its first mention, as CHAIR counts
  it) is grounded if the scene holds it, hallucinated otherwise;
* existence: "Is there a <object> in the image?" (the short-answer form the model was trained on) for
  objects in the scene and for hard absent ones (sharing a colour or a shape with a present object,
  POPE's adversarial kind). Only "Yes" answers are mentions: a wrong Yes is hallucinated, a right
  one grounded; the score is that of the "Yes" token.

A caption mention spans several tokens, so its score is aggregated three ways: ``colour`` (the first
token of the colour word, where the object starts), ``shape`` (the first token of the shape word,
where a colour seen elsewhere gets bound to a wrong shape) and ``mean`` (over all its tokens).
AUROC is P(a grounded mention scores higher than a hallucinated one), so 0.5 is chance and values
above it mean grounded mentions depend on / look at the image more. Intervals are percentile
bootstrap intervals with whole images resampled (mentions in one caption are not independent).
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lmmkit.analysis.probe import SIGNALS, ProbeResult, auroc, char_spans, probe_answer, roc_curve
from lmmkit.data.english import article
from lmmkit.data.shapes.generate import load_scenes
from lmmkit.data.shapes.render import render_scene
from lmmkit.data.shapes.text import SHORT_ANSWER
from lmmkit.data.shapes.world import CLASSES, Scene
from lmmkit.eval.chair import ObjectVocabulary
from lmmkit.eval.stats import bootstrap_ci
from lmmkit.models.vlm import VisionLanguageModel

CAPTION_PROMPT = "Describe the image in detail."
AGGREGATIONS: dict[str, tuple[str, ...]] = {"caption": ("colour", "shape", "mean"), "existence": ("yes",)}
VOCABULARY = ObjectVocabulary({name: (name,) for name in CLASSES})


def existence_prompt(name: str) -> str:
    return f"Is there {article(name)} {name} in the image?\n{SHORT_ANSWER}"


def hard_absent(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """Up to n absent objects sharing a colour or a shape with a present one: the ones a model that
    half-sees the image is most tempted to confirm."""
    present = set(scene.names)
    pool = sorted(c for c in CLASSES if c not in present
                  and any(c.split(" ")[0] == o.colour or c.split(" ")[1] == o.shape for o in scene.objects))
    return rng.sample(pool, min(n, len(pool)))


def error_type(name: str, truth: Sequence[str]) -> str | None:
    """None for a grounded object; else what the scene holds of it: "binding" (its colour and its shape,
    on other objects), "colour" or "shape" (only one of them), "neither"."""
    if name in truth:
        return None
    colour, shape = name.split(" ")
    has_colour = any(t.split(" ")[0] == colour for t in truth)
    has_shape = any(t.split(" ")[1] == shape for t in truth)
    return {(True, True): "binding", (True, False): "colour", (False, True): "shape"}.get(
        (has_colour, has_shape), "neither")


def _token_at(spans: Sequence[tuple[int, int]], char: int) -> int:
    return next(i for i, (s, e) in enumerate(spans) if s <= char < e)


def caption_mentions(model: VisionLanguageModel, result: ProbeResult, truth: Sequence[str]) -> list[dict]:
    """One record per object the caption names (first mention), with its label and aggregated scores."""
    text = model.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    spans = char_spans(model, result.token_ids)
    signals = {s: result.signal(s) for s in SIGNALS}
    records = []
    for rank, name in enumerate(VOCABULARY.mentions(text)):
        # The vocabulary's own rule (word boundaries, optional plural), to find where the name is.
        m = re.search(rf"\b{re.escape(name)}(?:e?s)?\b", text, re.IGNORECASE)
        if m is None:  # pragma: no cover - mentions() found it with the same rule
            continue
        tokens = [i for i, (s, e) in enumerate(spans) if e > s and s < m.end() and e > m.start()]
        colour_tok = _token_at(spans, m.start())
        shape_tok = _token_at(spans, m.start() + len(name.split(" ")[0]) + 1)
        scores = {}
        for signal, values in signals.items():
            scores[f"{signal}/colour"] = values[colour_tok]
            scores[f"{signal}/shape"] = values[shape_tok]
            scores[f"{signal}/mean"] = float(np.mean([values[i] for i in tokens]))
        records.append({"kind": "caption", "name": name, "rank": rank, "hallucinated": name not in truth,
                        "error": error_type(name, truth), "tokens": [result.tokens[i] for i in tokens],
                        "scores": scores})
    return records


def existence_mentions(model: VisionLanguageModel, image: Image.Image, scene: Scene, rng: random.Random,
                       n_present: int, n_absent: int) -> tuple[list[dict], list[dict]]:
    """(mention records for the Yes answers, every question asked with its answer)."""
    present = rng.sample(scene.names, min(n_present, len(scene.names)))
    asked, records = [], []
    for name, in_scene in [(n, True) for n in present] + [(n, False) for n in hard_absent(scene, rng, n_absent)]:
        result = probe_answer(model, image, existence_prompt(name), max_new_tokens=3)
        says_yes = result.answer.strip().lower().startswith("yes")
        asked.append({"name": name, "present": in_scene, "answer": result.answer})
        if says_yes and result.token_ids:
            records.append({"kind": "existence", "name": name, "hallucinated": not in_scene,
                            "tokens": result.tokens[:1],
                            "scores": {f"{s}/yes": result.signal(s)[0] for s in SIGNALS}})
    return records, asked


def scene_image(scene: Scene, data_dir: Path) -> Image.Image:
    """The dataset's image file when present, else the scene rendered again (PNG: the same pixels)."""
    ref = scene.extra.get("image")
    path = Path(data_dir) / "images" / ref if ref else None
    return Image.open(path).convert("RGB") if path and path.is_file() else render_scene(scene)


def _stat(scores: np.ndarray, fake: np.ndarray, strata: np.ndarray | None = None
          ) -> Callable[[Sequence[int]], float]:
    """AUROC (grounded vs hallucinated) of the records whose indices it is given; with `strata`, over
    pairs in the same stratum only (pooled Mann-Whitney counts), so a confound like the mention's place
    in the caption drops out. Indices, not records, are resampled: numpy indexing keeps 2000
    bootstrap replicates of a thousand mentions at about a second."""
    def statistic(indices: Sequence[int]) -> float:
        idx = np.asarray(indices, dtype=np.intp)
        groups = [idx] if strata is None else [idx[strata[idx] == v] for v in np.unique(strata[idx])]
        wins = pairs = 0.0
        for g in groups:
            grounded, hallucinated = scores[g[~fake[g]]], scores[g[fake[g]]]
            if len(grounded) and len(hallucinated):
                wins += auroc(grounded, hallucinated) * len(grounded) * len(hallucinated)
                pairs += len(grounded) * len(hallucinated)
        return wins / pairs if pairs else float("nan")
    return statistic


def separation(records: Sequence[dict], kind: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """AUROC with a bootstrap 95% interval (clustered by image) per signal and aggregation, and counts.

    Captions also get the AUROC within mentions of the same rank (first object named, second, ...) and
    a position control, the AUROC of the rank alone (earlier = grounded): hallucinations come late in a
    caption and attention to the image fades along it, so position alone separates them somewhat."""
    recs = [r for r in records if r["kind"] == kind]
    out: dict = {"grounded": sum(not r["hallucinated"] for r in recs),
                 "hallucinated": sum(r["hallucinated"] for r in recs),
                 "images": len({r["image"] for r in recs}), "auroc": {}}
    if not out["grounded"] or not out["hallucinated"]:
        out["note"] = "needs both grounded and hallucinated mentions"
        return out
    clusters = [r["image"] for r in recs]
    fake = np.array([bool(r["hallucinated"]) for r in recs])
    ranked = kind == "caption"
    ranks = np.array([r["rank"] for r in recs]) if ranked else None

    def interval(scores: np.ndarray, strata: np.ndarray | None = None) -> dict:
        ci = bootstrap_ci(list(range(len(recs))), _stat(scores, fake, strata), clusters=clusters,
                          n_boot=n_boot, seed=seed)
        return {"estimate": ci["estimate"], "low": ci["low"], "high": ci["high"]}

    if ranks is not None:
        out["within_rank"] = {}
        out["position_control"] = interval(-ranks.astype(float))
    for signal in SIGNALS:
        for agg in AGGREGATIONS[kind]:
            key = f"{signal}/{agg}"
            scores = np.array([r["scores"][key] for r in recs], dtype=float)
            out["auroc"][key] = {**interval(scores), "mean_grounded": float(scores[~fake].mean()),
                                 "mean_hallucinated": float(scores[fake].mean()),
                                 "roc": roc_curve(scores[~fake], scores[fake])}
            if ranks is not None:
                out["within_rank"][key] = interval(scores, ranks)
    return out


def run_study(model: VisionLanguageModel, data_dir: Path, n_images: int = 50, max_new_tokens: int = 96,
              n_present: int = 2, n_absent: int = 3, n_boot: int = 2000, seed: int = 0,
              progress: Callable[[int, int], None] | None = None) -> dict:
    """Probe the first `n_images` held-out scenes (captions and existence questions); AUROCs per signal."""
    scenes_path = Path(data_dir) / "test" / "scenes.jsonl"
    if not scenes_path.is_file():
        raise FileNotFoundError(f"{scenes_path}: no held-out scenes (pass a ShapesWorld data folder, "
                                "as written by `lmmkit data shapes`)")
    scenes = load_scenes(scenes_path)[:n_images]
    rng = random.Random(seed)
    start = time.perf_counter()
    records: list[dict] = []
    captions, questions, example = [], [], None
    for k, scene in enumerate(scenes):
        image = scene_image(scene, data_dir)
        result = probe_answer(model, image, CAPTION_PROMPT, max_new_tokens=max_new_tokens)
        example = example or {"image": scene.extra.get("image"), "truth": scene.names, **result.to_json()}
        mentions = caption_mentions(model, result, scene.names)
        ex_records, asked = existence_mentions(model, image, scene, rng, n_present, n_absent)
        for r in mentions + ex_records:
            r["image"] = scene.id
        records += mentions + ex_records
        captions.append({"image": scene.id, "truth": scene.names, "caption": result.answer,
                         "mentioned": [r["name"] for r in mentions],
                         "hallucinated": [r["name"] for r in mentions if r["hallucinated"]],
                         "greedy_agrees": all(result.greedy_agrees)})
        questions += [{"image": scene.id, **q} for q in asked]
        if progress:
            progress(k + 1, len(scenes))
    probe_seconds = time.perf_counter() - start
    n_mentions = sum(len(c["mentioned"]) for c in captions)
    absent = [q for q in questions if not q["present"]]
    present = [q for q in questions if q["present"]]
    return {
        "n_images": len(scenes), "settings": {"max_new_tokens": max_new_tokens, "n_present": n_present,
                                              "n_absent": n_absent, "n_boot": n_boot, "seed": seed},
        "chair_i": sum(len(c["hallucinated"]) for c in captions) / max(1, n_mentions),
        "chair_s": sum(bool(c["hallucinated"]) for c in captions) / max(1, len(captions)),
        "false_yes_rate": sum(q["answer"].strip().lower().startswith("yes") for q in absent) / max(1, len(absent)),
        "true_yes_rate": sum(q["answer"].strip().lower().startswith("yes") for q in present) / max(1, len(present)),
        "caption_error_types": dict(Counter(r["error"] for r in records if r["kind"] == "caption"
                                            and r["hallucinated"]).most_common()),
        "greedy_agreement": sum(c["greedy_agrees"] for c in captions) / max(1, len(captions)),
        "caption": separation(records, "caption", n_boot, seed),
        "existence": separation(records, "existence", n_boot, seed),
        "probe_seconds": probe_seconds, "example": example,
        "captions": captions, "questions": questions, "mentions": records,
    }


def _cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    return f"{entry['estimate']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def markdown_table(study: dict) -> str:
    """Rows: prompt kind x aggregation (captions also within the same mention rank); columns: the three
    signals as AUROC [95% CI]; then the position control."""
    lines = ["| mentions | score taken at | grounded / hallucinated | "
             + " | ".join(f"{s} AUROC [95% CI]" for s in SIGNALS) + " |",
             "|---|---|---|" + "---|" * len(SIGNALS)]
    for kind, aggs in AGGREGATIONS.items():
        part = study[kind]
        for table, label in (("auroc", ""), ("within_rank", ", same-rank pairs")):
            if table not in part:
                continue
            for agg in aggs:
                cells = [_cell(part[table].get(f"{s}/{agg}")) for s in SIGNALS]
                where = "all tokens (mean)" if agg == "mean" else f"{agg} token"
                lines.append(f"| {kind}{label} | {where} | {part['grounded']} / {part['hallucinated']} | "
                             + " | ".join(cells) + " |")
    if "position_control" in study["caption"]:
        lines.append(f"\nPosition control (captions): AUROC of the mention's rank alone, earlier = grounded: "
                     f"{_cell(study['caption']['position_control'])}")
    return "\n".join(lines)


def means_table(study: dict) -> str:
    """Mean score of grounded vs hallucinated mentions per signal: which way, and how far apart."""
    lines = ["| mentions | score taken at | " + " | ".join(f"{s} (grounded / hallucinated)" for s in SIGNALS) + " |",
             "|---|---|" + "---|" * len(SIGNALS)]
    for kind, aggs in AGGREGATIONS.items():
        for agg in aggs:
            cells = []
            for s in SIGNALS:
                e = study[kind]["auroc"].get(f"{s}/{agg}")
                cells.append(f"{e['mean_grounded']:.3f} / {e['mean_hallucinated']:.3f}" if e else "-")
            lines.append(f"| {kind} | {agg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
