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
    lmloss/conversations.json                          lmloss/images/test/<name>.png

Every task folder holds copies of the images it uses, so it is self-contained like a downloaded
benchmark. Everything is decided by `seed` (one random stream per task), every file is written
atomically, and images a task no longer uses are removed from its folder.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from lmmkit.atomic import atomic_write
from lmmkit.data.english import article, plural
from lmmkit.data.shapes.charts import QUESTION_KINDS as CHART_KINDS
from lmmkit.data.shapes.charts import mathvista_record
from lmmkit.data.shapes.generate import POPE_SPLITS, load_scenes
from lmmkit.data.shapes.text import NUMBER_WORDS, detailed_caption
from lmmkit.data.shapes.world import CLASSES, COLOURS, IMAGE_SIZE, OBJECT_AREA_HEIGHT, SHAPES, WORDS, Scene
from lmmkit.eval.pope import OFFICIAL_KEYS, read_pope_jsonl, write_pope_jsonl

TASKS: tuple[str, ...] = ("pope", "mme", "mmmu", "mathvista", "mmvet", "mmhal", "lmloss")
DEFAULT_SIZES: dict[str, int] = {"mme": 100, "mmmu": 120, "mathvista": 100, "mmvet": 60, "mmhal": 48}
MME_SUBTASKS: tuple[str, ...] = ("existence", "count", "position", "color")
MME_SUFFIX = " Please answer yes or no."
MMMU_SUBJECTS: dict[str, str] = {"Shapes_Colour": "Colour recognition", "Shapes_Count": "Counting",
                                 "Shapes_Word": "Text recognition"}
MMMU_OPEN_SHARE = 0.2
MMHAL_TYPES: tuple[str, ...] = ("attribute", "adversarial", "comparison", "counting", "relation", "environment",
                                "holistic", "other")
SIDE_WORDS: dict[str, str] = {"left": "on the left of", "right": "on the right of", "top": "at the top of",
                              "bottom": "at the bottom of"}
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
SIDE_MARGIN = 3  # px an object's centre keeps from a third's boundary before we ask which side it is on
MIN_GAP = 10  # px apart two objects must be before MMHal asks which is higher / further left

README = """# ShapesWorld benchmark twins (lmmkit)

These are lmmkit's ShapesWorld twins, **not** the real POPE, MME, MMMU, MathVista, MM-Vet or
MMHal-Bench: synthetic questions about held-out ShapesWorld test scenes (MathVista: small bar charts)
in each benchmark's official file format, so every task runs offline. Scores on them say nothing
about the real benchmarks. Written by `lmmkit.data.shapes.bench.write_bench` with seed {seed}.
"""


# ---- Files ----

def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, data)


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


class _Images:
    """One task's image folder: each image is written once; `prune` drops files this run did not write."""

    def __init__(self, folder: Path, source: Path | None = None) -> None:
        self.folder, self.source, self.written = folder, source, set[str]()

    def copy(self, rel: str, name: str | None = None) -> str:
        """Copy source/rel to folder/name (default: its basename); returns the name."""
        name = name or Path(rel).name
        if name not in self.written:
            assert self.source is not None
            _write_bytes(self.folder / name, (self.source / rel).read_bytes())
            self.written.add(name)
        return name

    def save(self, img: Image.Image, name: str) -> None:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        _write_bytes(self.folder / name, buf.getvalue())
        self.written.add(name)

    def prune(self) -> None:
        if self.folder.is_dir():
            for p in sorted(self.folder.rglob("*")):
                if p.is_file() and p.relative_to(self.folder).as_posix() not in self.written:
                    p.unlink()


class _Stream:
    """The scenes in a fresh random order on every pass; `take` returns the next one a builder accepts."""

    def __init__(self, rng: random.Random, scenes: list[Scene]) -> None:
        self.rng, self.scenes, self.queue = rng, scenes, list[Scene]()

    def take(self, build: Callable[[random.Random, Scene], Any]) -> tuple[Scene, Any] | None:
        for _ in range(len(self.scenes)):
            if not self.queue:
                self.queue = self.rng.sample(self.scenes, len(self.scenes))
            scene = self.queue.pop()
            item = build(self.rng, scene)
            if item is not None:
                return scene, item
        return None


# ---- Scene facts ----

def _unique(scene: Scene, attr: str) -> list[str]:
    """Shapes (attr "shape") or colours that appear exactly once in the scene, in first-seen order."""
    counts = Counter(getattr(o, attr) for o in scene.objects)
    return [v for v in counts if counts[v] == 1]


def _absent(rng: random.Random, scene: Scene) -> str:
    """An object not in the scene, sharing a colour or shape with one that is (the hard kind)."""
    present = set(scene.names)
    anchor = rng.choice(scene.objects)
    pool = [c for c in CLASSES if c not in present and (c.startswith(anchor.colour + " ")
                                                         or c.endswith(" " + anchor.shape))]
    return rng.choice(pool or [c for c in CLASSES if c not in present])


def sides(x: int, y: int) -> list[str]:
    """The sides ("left", "right", "top", "bottom") an object centre is clearly on (SceneObject.position
    thirds, with SIDE_MARGIN px to spare)."""
    out = []
    if x < IMAGE_SIZE / 3 - SIDE_MARGIN:
        out.append("left")
    elif x >= 2 * IMAGE_SIZE / 3 + SIDE_MARGIN:
        out.append("right")
    if y < OBJECT_AREA_HEIGHT / 3 - SIDE_MARGIN:
        out.append("top")
    elif y >= 2 * OBJECT_AREA_HEIGHT / 3 + SIDE_MARGIN:
        out.append("bottom")
    return out


def _number(n: int, noun: str) -> str:
    return f"{NUMBER_WORDS[n]} {noun if n == 1 else plural(noun)}"


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


def _where_answer(position: str) -> str:
    """SceneObject.position words and their synonyms, joined by MM-Vet's <OR>."""
    extra = {"middle": ["centre", "center"], "left": ["middle left"], "right": ["middle right"]}.get(position, [])
    return "<OR>".join(dict.fromkeys([position, position.replace("top", "upper").replace("bottom", "lower"), *extra]))


def _vet_question(kind: str, rng: random.Random, scene: Scene) -> tuple[str, str, list[str]] | None:
    """(question, answer, capability) of one MMVET_KINDS kind, or None if it does not fit the scene."""
    if kind == "colours":
        return "What colours are the objects?", "<AND>".join(dict.fromkeys(o.colour for o in scene.objects)), ["rec"]
    if kind == "where":
        o = rng.choice(scene.objects)
        return f"Where is the {o.name}?", _where_answer(o.position), ["rec", "spat"]
    if kind == "word":
        return ("What word is written?", scene.text, ["ocr"]) if scene.text else None
    if kind == "count":
        return "How many objects are there in total?", str(len(scene.objects)), ["rec", "math"]
    colours = _unique(scene, "colour")  # shape
    if not colours:
        return None
    colour = rng.choice(colours)
    return f"What shape is the {colour} object?", next(o.shape for o in scene.objects if o.colour == colour), ["rec"]


MMVET_KINDS: tuple[str, ...] = ("colours", "where", "word", "count", "shape")


def _write_mmvet(seed: int, scenes: list[Scene], source: Path, folder: Path, n: int) -> None:
    rng = random.Random(f"{seed}/bench/mmvet")
    stream, images, data = _Stream(rng, scenes), _Images(folder / "images", source), {}
    for k in range(n):
        first = k % len(MMVET_KINDS)
        for kind in MMVET_KINDS[first:] + MMVET_KINDS[:first]:  # colours and count always apply
            got = stream.take(lambda r, s, kind=kind: _vet_question(kind, r, s))
            if got is not None:
                break
        assert got is not None
        scene, (question, answer, capability) = got
        name = images.copy(scene.extra["image"], f"v1_{k}.png")
        data[f"v1_{k}"] = {"imagename": name, "capability": capability, "question": question, "answer": answer}
    _write_json(folder / "mm-vet.json", data)
    images.prune()


def _hal_question(kind: str, rng: random.Random, scene: Scene) -> tuple[str, str] | None:
    """(question, gt_answer) of MMHal-Bench type `kind` about `scene`, or None if it does not fit."""
    if kind == "attribute":
        shapes = _unique(scene, "shape")
        if not shapes:
            return None
        shape = rng.choice(shapes)
        colour = next(o.colour for o in scene.objects if o.shape == shape)
        return f"What colour is the {shape} in the image?", f"The {shape} is {colour}."
    if kind == "adversarial":
        missing = [s for s in SHAPES if s not in {o.shape for o in scene.objects}]
        if rng.random() < 0.5:
            shape = rng.choice(missing)
            return f"What colour is the {shape} in the image?", f"There is no {shape} in the image."
        absent = _absent(rng, scene)
        return f"Where is the {absent} in the image?", f"There is no {absent} in the image."
    if kind in ("comparison", "relation"):
        axis = "y" if kind == "comparison" else "x"  # pairs (higher, lower) or (left, right) by MIN_GAP px
        pairs = [(a.name, b.name) for a in scene.objects for b in scene.objects
                 if getattr(b, axis) - getattr(a, axis) >= MIN_GAP]
        if not pairs:
            return None
        pair = rng.choice(pairs)
        a, b = rng.sample(pair, 2) if kind == "relation" else pair
        if kind == "comparison":
            return f"Which is higher in the image, the {a} or the {b}?", f"The {pair[0]} is higher than the {pair[1]}."
        side = "left" if a == pair[0] else "right"
        return f"Is the {a} to the left or to the right of the {b}?", f"The {a} is to the {side} of the {b}."
    if kind == "counting":
        colour = rng.choice(sorted({o.colour for o in scene.objects}))
        n = sum(o.colour == colour for o in scene.objects)
        return (f"How many {colour} objects are there in the image?",
                f"There {'is' if n == 1 else 'are'} {_number(n, colour + ' object')} in the image.")
    if kind == "environment":
        return "What does the background of the image look like?", "The background is a plain, dark grey colour."
    if kind == "holistic":
        return "Describe the image in detail.", detailed_caption(scene)
    if scene.text:  # other
        return "What word is written at the bottom of the image?", f'The word "{scene.text}" is written there.'
    return "Is any word written in the image?", "No, no word is written in the image."


def _write_mmhal(seed: int, scenes: list[Scene], source: Path, folder: Path, n: int) -> None:
    rng = random.Random(f"{seed}/bench/mmhal")
    stream, images, items = _Stream(rng, scenes), _Images(folder / "images", source), []
    for i in range(n):
        kind = MMHAL_TYPES[i % len(MMHAL_TYPES)]
        got = stream.take(lambda r, s, kind=kind: _hal_question(kind, r, s))
        if got is None:
            raise ValueError(f"no test scene suits an MMHal-Bench {kind!r} question")
        scene, (question, gt) = got
        name = images.copy(scene.extra["image"])
        items.append({"question_type": kind, "question_topic": "Shapes", "image_id": Path(name).stem,
                      "image_src": f"https://example.invalid/shapes/{name}", "image_content": scene.names,
                      "question": question, "gt_answer": gt, "model_answer": ""})
    _write_json(folder / "response_template.json", items)
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
    _write_lmloss(data_dir, folders["lmloss"])
    _write_bytes(out / "README.md", README.format(seed=seed).encode("utf-8"))
    return folders
