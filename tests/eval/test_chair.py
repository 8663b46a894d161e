"""CHAIR: mention finding, the two rates and recall by hand, and the ShapesWorld twin end to end."""

from __future__ import annotations

import json

import pytest

from lmmkit.data.shapes.text import detailed_caption
from lmmkit.eval.chair import ObjectVocabulary, chair_scores
from lmmkit.eval.task_stats import task_intervals
from lmmkit.eval.tasks import get_tasks
from lmmkit.eval.tasks.base import TaskDataError

VOCAB = ObjectVocabulary({"red circle": ["red disc"], "blue square": [], "dog": ["puppy"], "hot dog": []})


def test_mentions_use_synonyms_plurals_longest_match_and_count_once():
    text = "Two red circles, a red disc, a hot dog and a puppy; no blue squares? A blue square."
    assert VOCAB.mentions(text) == ["red circle", "hot dog", "dog", "blue square"]
    assert VOCAB.mentions("a hot dog") == ["hot dog"]  # "dog" inside "hot dog" is not a second object
    assert VOCAB.mentions("reddish circle, bluesquare") == []


def test_rates_and_recall_by_hand():
    captions = ["a red circle and a blue square", "a red circle and a dog", None, "nothing here"]
    truths = [["red circle", "blue square"], ["red circle"], ["dog"], ["blue square"]]
    scores, records = chair_scores(captions, truths, VOCAB)
    # mentions: 2 + 2 + 0 + 0 = 4, hallucinated: "dog" in caption 2 only
    assert scores["chair_i"] == pytest.approx(1 / 4)
    assert scores["chair_s"] == pytest.approx(1 / 4)
    assert scores["recall"] == pytest.approx(3 / 5)
    assert records[1] == {"mentioned": ["red circle", "dog"], "hallucinated": ["dog"], "missed": []}
    assert records[2]["missed"] == ["dog"]
    with pytest.raises(ValueError, match="at least one object"):
        ObjectVocabulary({})


@pytest.fixture(scope="module")
def chair_root(tmp_path_factory):
    from lmmkit.data.shapes.bench import write_bench
    from lmmkit.data.shapes.generate import generate_shapes

    data = tmp_path_factory.mktemp("shapes")
    generate_shapes(data, seed=0, n_train=4, n_test=30, n_pope_images=4, workers=1, progress=False)
    return write_bench(data, n_images=12)["chair"].parent


def test_twin_scores_truthful_captions_clean_and_injected_objects_as_hallucinations(chair_root):
    (task,) = get_tasks("chair")
    loaded = task.load(chair_root)
    assert len(loaded.items) == 12 and not loaded.errors
    rows = [json.loads(line) for line in (chair_root / "chair" / "captions.jsonl").read_text().splitlines()]
    scenes = {r["image_id"]: r["objects"] for r in rows}
    truthful = [", ".join(scenes[it.id]) + "." for it in loaded.items]
    clean = task.score(loaded.items, truthful)
    assert clean["strict"]["chair_s"] == 0 and clean["strict"]["chair_i"] == 0 and clean["strict"]["recall"] == 1
    absent = [next(c for c in task.vocab.synonyms if c not in scenes[it.id]) for it in loaded.items]
    lying = [f"{t} and a {a}" for t, a in zip(truthful, absent, strict=True)]
    dirty = task.score(loaded.items, lying)
    assert dirty["strict"]["chair_s"] == 1
    n_true = sum(len(scenes[it.id]) for it in loaded.items)
    assert dirty["strict"]["chair_i"] == pytest.approx(12 / (n_true + 12))
    ci = task_intervals("chair", dirty, n_boot=200)
    assert ci["strict"]["CHAIR_i"]["estimate"] == pytest.approx(dirty["strict"]["chair_i"])
    assert ci["strict"]["CHAIR_i"]["low"] <= dirty["strict"]["chair_i"] <= ci["strict"]["CHAIR_i"]["high"]


def test_detailed_captions_mention_exactly_the_scene(chair_root):
    from lmmkit.data.shapes.world import Scene, SceneObject

    scene = Scene("x", [SceneObject("red", "circle", 10, 10, 5), SceneObject("blue", "ring", 40, 30, 6)])
    (task,) = get_tasks("chair")
    task.load(chair_root)
    assert task.vocab.mentions(detailed_caption(scene)) == ["red circle", "blue ring"]


def test_bad_rows_and_missing_vocabulary_are_named(chair_root, tmp_path):
    import shutil

    root = tmp_path / "bench"
    shutil.copytree(chair_root / "chair", root / "chair")
    path = root / "chair" / "captions.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({"image_id": "z", "image": "nope.png", "objects": ["red circle"]})
    lines[2] = json.dumps({"image_id": "y", "image": "a.png", "objects": ["purple unicorn"]})
    lines[3] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    (task,) = get_tasks("chair")
    loaded = task.load(root)
    assert len(loaded.items) == 9
    problems = " | ".join(str(e) for e in loaded.errors)
    assert "line 2 (image_id z)" in problems and "not found" in problems
    assert "line 3" in problems and "purple unicorn" in problems and "line 4" in problems
    (root / "chair" / "vocabulary.json").unlink()
    with pytest.raises(TaskDataError, match="vocabulary.json: not found"):
        task.load(root)
