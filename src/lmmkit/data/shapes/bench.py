"""ShapesWorld twins of six benchmarks, each written in the benchmark's official released file format.

`write_bench` reads a ShapesWorld dataset's held-out test scenes (object pairs never seen in
training) and writes, under `out` (default `data_dir/bench`)::

    README.md
    pope/coco_pope_{random,popular,adversarial}.json   pope/images/<name>.png
    mme/eval_tool/Your_Results/{existence,count,position,color}.txt
    mme/MME_Benchmark_release_version/<subtask>/images/<name>.png
    mmmu/validation.jsonl                              mmmu/images/<name>.png
    mathvista/testmini.json                            mathvista/images/<pid>.png   (bar charts)
    mmvet/mm-vet.json                                  mmvet/images/v1_<k>.png
    mmhal/response_template.json                       mmhal/images/<name>.png
    chair/captions.jsonl  chair/vocabulary.json        chair/images/<name>.png
    lmloss/conversations.json                          lmloss/images/test/<name>.png

Every task folder holds copies of the images it uses, so it is self-contained like a downloaded
benchmark. Everything is decided by `seed` (one random stream per task), every file is written
atomically, and images a task no longer uses are removed from its folder.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from lmmkit.data.english import article, plural
from lmmkit.data.shapes.bench_common import (
    DEFAULT_SIZES,
    MME_SUBTASKS,
    MME_SUFFIX,
    MMMU_OPEN_SHARE,
    MMMU_SUBJECTS,
    OPPOSITE,
    README,
    SIDE_WORDS,
    TASKS,
    _absent,
    _Images,
    _number,
    _Stream,
    _unique,
    _write_bytes,
    _write_json,
    sides,
)
from lmmkit.data.shapes.bench_judged import _write_mmhal, _write_mmvet
from lmmkit.data.shapes.charts import QUESTION_KINDS as CHART_KINDS
from lmmkit.data.shapes.charts import mathvista_record
from lmmkit.data.shapes.generate import POPE_SPLITS, load_scenes
from lmmkit.data.shapes.world import CLASSES, COLOURS, WORDS, Scene
from lmmkit.eval.pope import OFFICIAL_KEYS, read_pope_jsonl, write_pope_jsonl

# ---- MME: (yes question, no question) per image, or None where the subtask cannot ask about it ----

def _mme_existence(rng: random.Random, scene: Scene) -> tuple[str, str]:
    name, absent = rng.choice(scene.names), _absent(rng, scene)
    return (f"Is there {article(name)} {name} in this image?", f"Is there {article(absent)} {absent} in this image?")


def _mme_count(rng: random.Random, scene: Scene) -> tuple[str, str]:
    questions = []
    for truth in (True, False):
        if rng.random() < 0.5:
            n = len(scene.objects)
            k = n if truth else rng.choice([m for m in range(2, 7) if m != n])
            questions.append(f"Is there a total of {_number(k, 'object')} in this image?")
        else:
            shape = rng.choice(sorted({o.shape for o in scene.objects}))
            n = sum(o.shape == shape for o in scene.objects)
            k = n if truth else rng.choice([m for m in range(1, 6) if m != n])
            questions.append(f"{'Is' if k == 1 else 'Are'} there {_number(k, shape)} in this image?")
    return questions[0], questions[1]


def _mme_position(rng: random.Random, scene: Scene) -> tuple[str, str] | None:
    candidates = [(o.name, side) for o in scene.objects for side in sides(o.x, o.y)]
    if not candidates:
        return None
    (name, side), (other, other_side) = rng.choice(candidates), rng.choice(candidates)
    return (f"Is the {name} {SIDE_WORDS[side]} the image?",
            f"Is the {other} {SIDE_WORDS[OPPOSITE[other_side]]} the image?")


def _mme_color(rng: random.Random, scene: Scene) -> tuple[str, str] | None:
    shapes = _unique(scene, "shape")
    if not shapes:
        return None
    shape, other = rng.choice(shapes), rng.choice(shapes)
    colour = next(o.colour for o in scene.objects if o.shape == shape)
    true_other = next(o.colour for o in scene.objects if o.shape == other)
    in_scene = sorted({o.colour for o in scene.objects} - {true_other})
    wrong = rng.choice(in_scene or [c for c in COLOURS if c != true_other])
    return f"Is the {shape} {colour}?", f"Is the {other} {wrong}?"


MME_BUILDERS: dict[str, Callable[[random.Random, Scene], tuple[str, str] | None]] = {
    "existence": _mme_existence, "count": _mme_count, "position": _mme_position, "color": _mme_color}


def _write_mme(seed: int, scenes: list[Scene], source: Path, folder: Path, n_images: int) -> None:
    per_subtask = -(-n_images // len(MME_SUBTASKS))
    for sub in MME_SUBTASKS:
        rng = random.Random(f"{seed}/bench/mme/{sub}")
        images = _Images(folder / "MME_Benchmark_release_version" / sub / "images", source)
        lines = []
        for scene in rng.sample(scenes, len(scenes)):
            if len(images.written) >= per_subtask:
                break
            pair = MME_BUILDERS[sub](rng, scene)
            if pair is None:
                continue
            name = images.copy(scene.extra["image"])
            rows = [(pair[0], "Yes"), (pair[1], "No")]
            if rng.random() < 0.5:
                rows.reverse()
            lines += [f"{name}\t{q}{MME_SUFFIX}\t{a}\n" for q, a in rows]
        _write_bytes(folder / "eval_tool" / "Your_Results" / f"{sub}.txt", "".join(lines).encode("utf-8"))
        images.prune()


# ---- MMMU: (question, answer, the other possible answers) or None ----

def _mmmu_question(subject: str, rng: random.Random, scene: Scene, open_: bool) -> tuple[str, str, list[str]] | None:
    """(question, answer, the other possible answers) for an MMMU `subject`, or None if it does not fit."""
    if subject == "Shapes_Colour":
        shapes = _unique(scene, "shape")
        if open_ or not shapes:
            return None
        shape = rng.choice(shapes)
        colour = next(o.colour for o in scene.objects if o.shape == shape)
        return f"What colour is the {shape}?", colour, [c for c in COLOURS if c != colour]
    if subject == "Shapes_Word":
        if not scene.text:
            return None
        question = "What word is written in the image?" if open_ else "Which word is written in the image?"
        return question, scene.text, [w for w in WORDS if w != scene.text]
    if rng.random() < 0.5:
        question, n = "How many objects are there in the image?", len(scene.objects)
    else:
        shape = rng.choice(sorted({o.shape for o in scene.objects}))
        question, n = f"How many {plural(shape)} are there in the image?", sum(o.shape == shape for o in scene.objects)
    return question, str(n), [str(k) for k in range(1, 8) if k != n]


def _write_mmmu(seed: int, scenes: list[Scene], source: Path, folder: Path, n: int) -> None:
    rng = random.Random(f"{seed}/bench/mmmu")
    stream, images = _Stream(rng, scenes), _Images(folder / "images", source)
    open_items = set(rng.sample(range(n), round(MMMU_OPEN_SHARE * n)))
    counters: Counter[str] = Counter()
    records = []
    for i in range(n):
        open_ = i in open_items
        subjects = [s for s in MMMU_SUBJECTS if not (open_ and s == "Shapes_Colour")]
        for subject in rng.sample(subjects, len(subjects)):
            got = stream.take(lambda r, s, subject=subject, open_=open_: _mmmu_question(subject, r, s, open_))
            if got is not None:
                break
        else:  # pragma: no cover - counting always applies
            raise ValueError("no test scene suits any MMMU subject")
        scene, (question, value, others) = got
        if open_:
            options, answer = [], value
        else:
            k = rng.randrange(4)
            distractors = rng.sample(others, 3)
            options, answer = [*distractors[:k], value, *distractors[k:]], "ABCD"[k]
        counters[subject] += 1
        image = images.copy(scene.extra["image"])
        record = {"id": f"validation_{subject}_{counters[subject]}", "question": f"<image 1> {question}",
                  "options": str(options), "explanation": "", "image_1": f"images/{image}"}
        record.update({f"image_{j}": None for j in range(2, 8)})
        record.update({"img_type": "['Diagrams']", "answer": answer, "topic_difficulty": "Easy",
                       "question_type": "open" if open_ else "multiple-choice", "subfield": MMMU_SUBJECTS[subject]})
        records.append((list(MMMU_SUBJECTS).index(subject), counters[subject], record))
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for *_, r in sorted(records, key=lambda t: t[:2])]
    _write_bytes(folder / "validation.jsonl", "".join(lines).encode("utf-8"))
    images.prune()


# ---- MathVista (bar charts), MM-Vet, MMHal-Bench ----

def _write_mathvista(seed: int, folder: Path, n: int) -> None:
    rng = random.Random(f"{seed}/bench/mathvista")
    images, data = _Images(folder / "images"), {}
    for i in range(n):
        pid = str(i + 1)
        data[pid], img = mathvista_record(rng, pid, CHART_KINDS[i % len(CHART_KINDS)])
        images.save(img, f"{pid}.png")
    _write_json(folder / "testmini.json", data)
    images.prune()


# ---- POPE and LM loss: the question files generate_shapes already wrote ----

def _write_pope(data_dir: Path, folder: Path) -> None:
    images = _Images(folder / "images", data_dir / "images")
    for split in POPE_SPLITS:
        rows = read_pope_jsonl(data_dir / "test" / f"pope_{split}.jsonl")
        for row in rows:
            missing = [k for k in OFFICIAL_KEYS if k not in row]
            if missing:
                raise ValueError(f"{data_dir}/test/pope_{split}.jsonl: a row lacks {missing}")
        write_pope_jsonl(({**row, "image": images.copy(row["image"])} for row in rows),
                         folder / f"coco_pope_{split}.json", extra_keys=False)
    images.prune()


def _write_lmloss(data_dir: Path, folder: Path) -> None:
    raw = (data_dir / "test" / "conversations.json").read_bytes()
    images = _Images(folder / "images", data_dir / "images")
    for record in json.loads(raw):
        rels = record.get("image") or []
        for rel in [rels] if isinstance(rels, str) else rels:
            images.copy(rel, rel)
    _write_bytes(folder / "conversations.json", raw)
    images.prune()


def _write_chair(seed: int, scenes: list[Scene], source: Path, folder: Path, n: int) -> None:
    """CHAIR: held-out images with their true object lists; the vocabulary is every ShapesWorld class."""
    rng = random.Random(f"chair-{seed}")
    images = _Images(folder / "images", source)
    rows = []
    for scene in rng.sample(scenes, min(n, len(scenes))):
        name = images.copy(scene.extra["image"])
        rows.append(json.dumps({"image_id": scene.id, "image": name, "objects": sorted(set(scene.names))}))
    _write_bytes(folder / "captions.jsonl", ("\n".join(rows) + "\n").encode("utf-8"))
    _write_json(folder / "vocabulary.json", {"objects": {c: [c] for c in CLASSES}})
    images.prune()


def write_bench(data_dir: Path, out: Path | None = None, seed: int = 0, n_images: int | None = None) -> dict[str, Path]:
    """Write the ShapesWorld benchmark twins of a dataset from its test scenes (module docstring).

    `n_images` overrides the default size of every generated task (DEFAULT_SIZES: MME images, split
    evenly across its 4 subtasks and capped by the test scenes that suit each, MMMU items, MathVista
    charts, MM-Vet items, MMHal items); POPE and LM-loss reuse the dataset's own files. Deterministic
    by `seed`. Returns {task: folder}.
    """
    data_dir = Path(data_dir)
    out = Path(out) if out is not None else data_dir / "bench"
    if n_images is not None and n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    scenes_path = data_dir / "test" / "scenes.jsonl"
    if not scenes_path.is_file():
        raise FileNotFoundError(f"{scenes_path} not found: is {data_dir} a ShapesWorld dataset (generate_shapes)?")
    scenes = load_scenes(scenes_path)
    if not scenes:
        raise ValueError(f"{scenes_path} holds no scenes")
    size = {task: n_images or default for task, default in DEFAULT_SIZES.items()}
    source = data_dir / "images"
    folders = {task: out / task for task in TASKS}
    _write_pope(data_dir, folders["pope"])
    _write_mme(seed, scenes, source, folders["mme"], size["mme"])
    _write_mmmu(seed, scenes, source, folders["mmmu"], size["mmmu"])
    _write_mathvista(seed, folders["mathvista"], size["mathvista"])
    _write_mmvet(seed, scenes, source, folders["mmvet"], size["mmvet"])
    _write_mmhal(seed, scenes, source, folders["mmhal"], size["mmhal"])
    _write_chair(seed, scenes, source, folders["chair"], size["chair"])
    _write_lmloss(data_dir, folders["lmloss"])
    _write_bytes(out / "README.md", README.format(seed=seed).encode("utf-8"))
    return folders
