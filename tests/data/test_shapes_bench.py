"""ShapesWorld benchmark twins: each task's official file format, true answers, images, determinism."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmmkit.data.english import article, plural
from lmmkit.data.shapes import charts
from lmmkit.data.shapes.bench import write_bench
from lmmkit.data.shapes.bench_common import DEFAULT_SIZES, MME_SUBTASKS, MMHAL_TYPES, TASKS, sides
from lmmkit.data.shapes.charts import BarChart, render_bar_chart
from lmmkit.data.shapes.generate import POPE_SPLITS, generate_shapes, load_scenes
from lmmkit.data.shapes.text import NUMBER_WORDS
from lmmkit.data.shapes.world import COLOURS, SHAPES, WORDS, Scene
from lmmkit.eval.pope import OFFICIAL_KEYS, read_pope_jsonl

N_TEST, N_POPE = 80, 20
SHAPE_OF = {**{s: s for s in SHAPES}, **{plural(s): s for s in SHAPES}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "ds"
    generate_shapes(out, seed=0, n_train=8, n_test=N_TEST, n_pope_images=N_POPE, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def bench(data_dir: Path) -> dict[str, Path]:
    return write_bench(data_dir, seed=0)  # default out: data_dir / "bench"


@pytest.fixture(scope="module")
def scenes(data_dir: Path) -> dict[str, Scene]:
    """Test scenes by image basename."""
    return {Path(s.extra["image"]).name: s for s in load_scenes(data_dir / "test" / "scenes.jsonl")}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _obj(scene: Scene, name: str):
    return next(o for o in scene.objects if o.name == name)


def _only(scene: Scene, shape: str):
    """The one object of `shape` in the scene (fails if there is not exactly one)."""
    (o,) = [o for o in scene.objects if o.shape == shape]
    return o


def test_layout_and_readme(data_dir: Path, bench: dict[str, Path]) -> None:
    root = data_dir / "bench"
    assert list(bench) == list(TASKS) and all(bench[t] == root / t and bench[t].is_dir() for t in TASKS)
    readme = (root / "README.md").read_text()
    assert "ShapesWorld twins" in readme and "not" in readme
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]


def test_pope(data_dir: Path, bench: dict[str, Path]) -> None:
    for split in POPE_SPLITS:
        source = read_pope_jsonl(data_dir / "test" / f"pope_{split}.jsonl")
        rows = read_pope_jsonl(bench["pope"] / f"coco_pope_{split}.json")
        assert len(rows) == len(source) == 6 * N_POPE
        assert all(list(r) == list(OFFICIAL_KEYS) for r in rows)
        assert [r["label"] for r in rows].count("yes") == len(rows) // 2
        for row, src in zip(rows, source, strict=True):
            assert row == {**src, "image": Path(src["image"]).name}
            assert re.fullmatch(r"Is there an? \w+ \w+ in the image\?", row["text"])
            assert (bench["pope"] / "images" / row["image"]).is_file()


def _mme_truth(sub: str, question: str, scene: Scene) -> bool:
    """Whether the answer to an MME question about `scene` is yes, from the scene truth."""
    if sub == "existence":
        m = re.fullmatch(r"Is there (an?) (\w+ \w+) in this image\?", question)
        assert m and m[1] == article(m[2])
        return m[2] in scene.names
    if sub == "count":
        m = re.fullmatch(r"Is there a total of (\w+) objects? in this image\?", question)
        if m:
            return NUMBER_WORDS.index(m[1]) == len(scene.objects)
        m = re.fullmatch(r"(Is|Are) there (\w+) (\w+) in this image\?", question)
        assert m and (m[1] == "Is") == (m[2] == "one")
        return NUMBER_WORDS.index(m[2]) == sum(o.shape == SHAPE_OF[m[3]] for o in scene.objects)
    if sub == "position":
        m = re.fullmatch(r"Is the (\w+ \w+) (?:on|at) the (left|right|top|bottom) of the image\?", question)
        assert m
        o = _obj(scene, m[1])
        opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[m[2]]
        assert m[2] in sides(o.x, o.y) or opposite in sides(o.x, o.y)  # never ambiguous
        return m[2] in o.position.split()
    m = re.fullmatch(r"Is the (\w+) (\w+)\?", question)
    assert m and m[2] in COLOURS
    return _only(scene, m[1]).colour == m[2]


def test_mme(bench: dict[str, Path], scenes: dict[str, Scene]) -> None:
    root = bench["mme"]
    for sub in MME_SUBTASKS:
        text = (root / "eval_tool" / "Your_Results" / f"{sub}.txt").read_text(encoding="utf-8")
        lines = text.split("\n")
        assert lines[-1] == "" and len(lines) % 2 == 1
        rows = [line.split("\t") for line in lines[:-1]]
        assert all(len(r) == 3 for r in rows)
        images = [r[0] for r in rows[::2]]
        assert 20 <= len(images) == len(set(images)) == -(-DEFAULT_SIZES["mme"] // 4)
        for first, second in zip(rows[::2], rows[1::2], strict=True):
            assert first[0] == second[0] and {first[2], second[2]} == {"Yes", "No"}
            assert first[1] != second[1]
        for image, question, gt in rows:
            assert question.endswith("? Please answer yes or no.")
            assert (root / "MME_Benchmark_release_version" / sub / "images" / image).is_file()
            assert _mme_truth(sub, question.removesuffix(" Please answer yes or no."), scenes[image]) == (gt == "Yes")
        assert {r[2] for r in rows[::2]} == {"Yes", "No"}  # the order within a pair varies


def _mmmu_truth(question: str, scene: Scene) -> str:
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return _only(scene, m[1]).colour
    if question == "How many objects are there in the image?":
        return str(len(scene.objects))
    if m := re.fullmatch(r"How many (\w+) are there in the image\?", question):
        return str(sum(o.shape == SHAPE_OF[m[1]] for o in scene.objects))
    assert question in ("What word is written in the image?", "Which word is written in the image?")
    assert scene.text in WORDS
    return scene.text


def test_mmmu(bench: dict[str, Path], scenes: dict[str, Scene]) -> None:
    root = bench["mmmu"]
    records = [json.loads(line) for line in (root / "validation.jsonl").read_text().splitlines()]
    assert len(records) == DEFAULT_SIZES["mmmu"] and len({r["id"] for r in records}) == len(records)
    keys = {"id", "question", "options", "explanation", "img_type", "answer", "topic_difficulty",
            "question_type", "subfield", *(f"image_{i}" for i in range(1, 8))}
    letters = []
    for r in records:
        assert set(r) == keys
        assert re.fullmatch(r"validation_Shapes_(Colour|Count|Word)_\d+", r["id"])
        assert r["question"].startswith("<image 1> ") and r["img_type"] == "['Diagrams']"
        assert r["topic_difficulty"] == "Easy" and r["explanation"] == "" and r["subfield"]
        assert all(r[f"image_{i}"] is None for i in range(2, 8))
        assert re.fullmatch(r"images/\d{6}\.png", r["image_1"]) and (root / r["image_1"]).is_file()
        truth = _mmmu_truth(r["question"].removeprefix("<image 1> "), scenes[Path(r["image_1"]).name])
        options = ast.literal_eval(r["options"])
        if r["question_type"] == "open":
            assert options == [] and r["options"] == "[]" and r["answer"] == truth
        else:
            assert r["question_type"] == "multiple-choice" and len(set(options)) == 4
            assert r["options"] == str(options) and options["ABCD".index(r["answer"])] == truth
            letters.append(r["answer"])
    assert sum(r["question_type"] == "open" for r in records) == round(0.2 * len(records))
    assert set(letters) == set("ABCD") and max(letters.count(x) for x in "ABCD") < len(letters) / 2
    assert {r["id"].split("_")[2] for r in records} == {"Colour", "Count", "Word"}


def _bar_heights(img: Image.Image, chart: BarChart) -> list[int]:
    """Each bar's height in chart units, measured from the pixels (bars found left to right)."""
    px = np.asarray(img)
    heights = []
    row = px[charts._BOTTOM - 1]
    for colour in chart.colours:
        cols = np.flatnonzero((row == COLOURS[colour]).all(axis=1))
        assert len(cols), colour
        column = px[:, cols[len(cols) // 2]]
        heights.append(int((column == COLOURS[colour]).all(axis=1).sum()) // charts._UNIT)
    order = [np.flatnonzero((row == COLOURS[c]).all(axis=1)).min() for c in chart.colours]
    assert order == sorted(order)  # colours are left to right
    return heights


def test_mathvista(bench: dict[str, Path]) -> None:
    root = bench["mathvista"]
    data = json.loads((root / "testmini.json").read_text())
    assert list(data) == [str(i) for i in range(1, DEFAULT_SIZES["mathvista"] + 1)]
    kinds = set()
    for pid, r in data.items():
        assert r["pid"] == pid and r["image"] == f"images/{pid}.png" and r["unit"] is None
        meta = r["metadata"]
        assert meta["split"] == "testmini" and meta["source"] == "ShapesWorld-charts"
        assert meta["question_type"] == r["question_type"] and meta["category"] == "math-targeted-vqa"
        chart = BarChart(tuple(meta["chart"]["colours"]), tuple(meta["chart"]["values"]))
        assert 3 <= len(chart.values) <= 5 and all(1 <= v <= 9 for v in chart.values)
        with Image.open(root / r["image"]) as img:
            img = img.convert("RGB")
            assert img.size == (meta["img_width"], meta["img_height"])
            assert np.array_equal(np.asarray(img), np.asarray(render_bar_chart(chart)))
            assert _bar_heights(img, chart) == list(chart.values)
        q, values = r["question"], list(chart.values)
        assert r["query"].startswith("Hint: ") and f"\nQuestion: {q}" in r["query"]
        if m := re.fullmatch(r"What is the value of the (\w+) bar\?", q):
            kind, truth = "value", str(chart.value(m[1]))
        elif q == "What is the sum of all bars?":
            kind, truth = "sum", str(sum(values))
        elif q == "What is the mean of the bars?":
            kind, truth = "mean", f"{sum(values) / len(values):.1f}"
            assert r["answer_type"] == "float" and r["precision"] == 1.0
        elif m := re.fullmatch(r"Which bar is the (tallest|shortest)\?", q):
            pick = max if m[1] == "tallest" else min
            kind, truth = "extreme", chart.colours[values.index(pick(values))]
            assert values.count(pick(values)) == 1 and r["question_type"] == "multi_choice"
            assert sorted(r["choices"]) == sorted(chart.colours) and r["answer"] in r["choices"]
            assert "\nChoices:\n(A) " in r["query"] and r["answer_type"] == "text"
        elif q == "List the bar values from left to right.":
            kind, truth = "list", str(values)
            assert r["answer_type"] == "list"
        else:
            assert q == "What is the difference between the tallest and the shortest bar?"
            kind, truth = "difference", str(max(values) - min(values))
        kinds.add(kind)
        assert r["answer"] == truth
        if kind != "extreme":
            assert r["question_type"] == "free_form" and r["choices"] is None
        if kind in ("value", "sum", "difference"):
            assert r["answer_type"] == "integer" and r["precision"] is None
    assert kinds == set(charts.QUESTION_KINDS)


def test_mmvet(bench: dict[str, Path], scenes: dict[str, Scene], data_dir: Path) -> None:
    root = bench["mmvet"]
    data = json.loads((root / "mm-vet.json").read_text())
    assert list(data) == [f"v1_{k}" for k in range(DEFAULT_SIZES["mmvet"])]
    # MM-Vet images are renamed, so find each one's scene by its bytes.
    by_bytes = {(data_dir / "images" / s.extra["image"]).read_bytes(): s for s in scenes.values()}
    for key, r in data.items():
        assert set(r) == {"imagename", "question", "answer", "capability"} and r["imagename"] == f"{key}.png"
        scene = by_bytes[(root / "images" / r["imagename"]).read_bytes()]
        q, a = r["question"], r["answer"]
        assert r["capability"] and set(r["capability"]) <= {"rec", "ocr", "spat", "math", "know", "gen"}
        if q == "What colours are the objects?":
            assert set(a.split("<AND>")) == {o.colour for o in scene.objects}
        elif m := re.fullmatch(r"Where is the (\w+ \w+)\?", q):
            assert _obj(scene, m[1]).position in a.split("<OR>") and "spat" in r["capability"]
        elif q == "What word is written?":
            assert a == scene.text and r["capability"] == ["ocr"]
        elif q == "How many objects are there in total?":
            assert a == str(len(scene.objects)) and "math" in r["capability"]
        else:
            m = re.fullmatch(r"What shape is the (\w+) object\?", q)
            assert m
            (o,) = [o for o in scene.objects if o.colour == m[1]]
            assert a == o.shape


def test_mmhal(bench: dict[str, Path], scenes: dict[str, Scene]) -> None:
    root = bench["mmhal"]
    items = json.loads((root / "response_template.json").read_text())
    assert isinstance(items, list) and len(items) == DEFAULT_SIZES["mmhal"]
    keys = ["question_type", "question_topic", "image_id", "image_src", "image_content", "question",
            "gt_answer", "model_answer"]
    for i, item in enumerate(items):
        assert list(item) == keys and item["question_type"] == MMHAL_TYPES[i % 8]
        name = item["image_src"].rsplit("/", 1)[1]
        assert item["image_src"].startswith("https://") and (root / "images" / name).is_file()
        scene = scenes[name]
        assert item["image_content"] == scene.names and item["model_answer"] == ""
        assert item["question"] and item["gt_answer"]
        if item["question_type"] == "adversarial":
            asked = re.search(r"the (\w+(?: \w+)?) in the image\?", item["question"])[1]
            assert asked not in scene.names and all(asked != o.shape for o in scene.objects)
            assert item["gt_answer"] == f"There is no {asked} in the image."
        if item["question_type"] == "counting":
            m = re.fullmatch(r"How many (\w+) objects are there in the image\?", item["question"])
            n = sum(o.colour == m[1] for o in scene.objects)
            assert f" {NUMBER_WORDS[n]} {m[1]} object" in item["gt_answer"]


def test_lmloss(data_dir: Path, bench: dict[str, Path]) -> None:
    root = bench["lmloss"]
    raw = (root / "conversations.json").read_bytes()
    assert raw == (data_dir / "test" / "conversations.json").read_bytes()
    records = json.loads(raw)
    assert len(records) == N_TEST
    for r in records:
        assert (root / "images" / r["image"]).read_bytes() == (data_dir / "images" / r["image"]).read_bytes()


def test_deterministic_prunes_and_errors(data_dir: Path, bench: dict[str, Path], tmp_path: Path) -> None:
    default = _files(data_dir / "bench")
    out = write_bench(data_dir, tmp_path / "a", seed=0)
    assert out["mme"] == tmp_path / "a" / "mme" and _files(tmp_path / "a") == default
    other = _files(write_bench(data_dir, tmp_path / "b", seed=1)["mme"])
    assert other != _files(bench["mme"])
    small = write_bench(data_dir, tmp_path / "a", seed=0, n_images=8)  # rewritten in place, smaller
    assert sorted(p.name for p in (small["mathvista"] / "images").iterdir()) == sorted(f"{i}.png" for i in range(1, 9))
    assert len(list((small["mmhal"] / "images").iterdir())) <= 8
    assert len(json.loads((small["mmvet"] / "mm-vet.json").read_text())) == 8
    assert len(list((small["mmvet"] / "images").iterdir())) == 8
    assert _files(small["pope"]) == _files(bench["pope"]) and _files(small["lmloss"]) == _files(bench["lmloss"])
    with pytest.raises(ValueError, match="n_images"):
        write_bench(data_dir, tmp_path / "c", n_images=0)
    with pytest.raises(FileNotFoundError, match="scenes.jsonl"):
        write_bench(tmp_path / "missing")
