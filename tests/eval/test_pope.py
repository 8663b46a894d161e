"""POPE: official parsing rule, robust parser, metrics, negative sampling, question files."""

from __future__ import annotations

import warnings

import pytest

from lmmkit.eval.pope import (
    build_pope,
    parse_official,
    parse_robust,
    question_text,
    read_pope_jsonl,
    score_answers,
    score_pope,
    write_pope_jsonl,
)

# --------------------------------------------------------------------------------------------
# Official parser: pinned case by case against the evaluate.py rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", "yes"),
        ("Yes.", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("no", "no"),
        ("No, there is not.", "no"),
        ("no,", "no"),  # commas are removed before splitting
        ("Yes, there is a dog, not a cat.", "no"),  # "not" is a word of the first sentence
        ("I do not see one", "no"),
        ("NO", "yes"),  # case-sensitive: only "No", "not", "no"
        ("Not at all", "yes"),  # "Not" is not in the list
        ("Nope", "yes"),
        ("I don't see any", "yes"),  # "don't" is not "not"
        ("no!", "yes"),  # "!" is not removed: the word is "no!"
        ("No\n", "yes"),  # split on " " only: the word is "No\n"
        ("There is a dog. No.", "yes"),  # only the text before the first "." counts
        (".No", "yes"),  # text before the first "." is empty
        ("There is no dog", "no"),
        ("", "yes"),
        ("Maybe", "yes"),
    ],
)
def test_parse_official(answer: str, expected: str) -> None:
    assert parse_official(answer) == expected


# --------------------------------------------------------------------------------------------
# Robust parser
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("YES!", "yes"),
        ("Yes, there is", "yes"),
        ("Yes, there is a dog, not a cat.", "yes"),  # the leading word decides
        ("There is a dog in the image.", "yes"),
        ("There's a cat on the sofa", "yes"),
        ("I can see a cat.", "yes"),
        ("Absolutely", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("NO", "no"),
        ("no!", "no"),
        ("No\n", "no"),
        ("Not at all", "no"),
        ("Nope", "no"),
        ("There is no dog in the image.", "no"),
        ("I don't see any", "no"),
        ("I don\u2019t see any dog", "no"),  # curly apostrophe
        ("Certainly not", "no"),
        ("The image does not contain a dog.", "no"),
        ("", None),
        ("   ", None),
        ("...", None),
        ("Maybe", None),
        ("I'm not sure.", None),
        ("It is hard to tell.", None),
    ],
)
def test_parse_robust(answer: str, expected: str | None) -> None:
    assert parse_robust(answer) == expected


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def test_score_pope_hand_confusion_matrix() -> None:
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "no"]
    preds = ["yes", "yes", "no", "yes", "yes", "yes", "no", "no"]
    # TP = 2, FN = 1, FP = 3, TN = 2
    m = score_pope(preds, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 3, 2)
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["precision"] == pytest.approx(2 / 5)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.4 * (2 / 3) / (0.4 + 2 / 3))
    # predicted yes share (5/8), not the ground-truth share (3/8): the harness bug
    assert m["yes_ratio"] == pytest.approx(5 / 8)
    assert m["n"] == 8
    assert m["unparseable"] == 0


def test_score_pope_unparseable_counted_wrong() -> None:
    m = score_pope([None, None, "yes", "maybe"], ["yes", "no", "yes", "no"])
    # None|yes -> FN, None|no -> FP, yes|yes -> TP, maybe|no -> FP
    assert m["unparseable"] == 3
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 2, 0, 1)
    assert m["accuracy"] == pytest.approx(1 / 4)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["yes_ratio"] == pytest.approx(1 / 4)  # only real yes answers count


def test_score_pope_zero_division_and_errors() -> None:
    m = score_pope(["no", "no"], ["no", "no"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["accuracy"] == 1.0 and m["yes_ratio"] == 0.0
    empty = score_pope([], [])
    assert empty["n"] == 0 and empty["accuracy"] == 0.0
    with pytest.raises(ValueError):
        score_pope(["yes"], ["yes", "no"])
    with pytest.raises(ValueError):
        score_pope(["yes"], ["maybe"])


def test_score_answers_strict_and_robust() -> None:
    answers = ["NO", "Yes.", "No, there is not.", "", "I don't see one"]
    labels = ["no", "yes", "no", "yes", "no"]
    out = score_answers(answers, labels)
    strict, robust = out["strict"], out["robust"]
    # strict: yes, yes, no, yes, yes -> correct on items 2, 3, 4
    assert strict["accuracy"] == pytest.approx(3 / 5)
    assert strict["yes_ratio"] == pytest.approx(4 / 5)
    assert strict["unparseable"] == 0
    # robust: no, yes, no, None, no -> correct except the empty answer
    assert robust["accuracy"] == pytest.approx(4 / 5)
    assert robust["unparseable"] == 1
    assert robust["yes_ratio"] == pytest.approx(1 / 5)


# --------------------------------------------------------------------------------------------
# Building the question sets
# --------------------------------------------------------------------------------------------

# person is only in images with < 3 objects: excluded from sampling but still the most frequent.
ANNOTATIONS = [
    ("i1.jpg", ["cat", "dog", "bird"]),
    ("i2.jpg", ["cat", "dog", "car"]),
    ("i3.jpg", ["car", "tree", "cat"]),
    ("i4.jpg", ["car", "sofa", "lamp", "cup"]),
    ("p1.jpg", ["person"]),
    ("p2.jpg", ["person"]),
    ("p3.jpg", ["person", "car"]),
    ("p4.jpg", ["person"]),
    ("p5.jpg", ["person"]),
    ("dup.jpg", ["cat", "cat", "dog", "dog"]),  # only 2 distinct objects: excluded
]
ELIGIBLE = {"i1.jpg", "i2.jpg", "i3.jpg", "i4.jpg"}


def _by_image(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["image"], []).append(row)
    return out


def _check_structure(rows: list[dict], annotations: dict[str, list[str]]) -> None:
    assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["label"] for r in rows] == ["yes", "no"] * (len(rows) // 2)
    for image, qs in _by_image(rows).items():
        objs = annotations[image]
        assert len(qs) == 6
        assert [q["object"] for q in qs if q["label"] == "yes"] == objs[:3]
        negatives = [q["object"] for q in qs if q["label"] == "no"]
        assert len(set(negatives)) == 3  # never repeated
        assert not set(negatives) & set(objs)  # never in the image
        for q in qs:
            assert q["object"] in q["text"] and q["text"].startswith("Is there ")


def test_build_pope_structure_all_splits() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pope = build_pope(ANNOTATIONS, n_images=4, seed=0)
    assert set(pope) == {"random", "popular", "adversarial"}
    ann = dict(ANNOTATIONS)
    for rows in pope.values():
        assert len(rows) == 4 * 6
        assert set(r["image"] for r in rows) == ELIGIBLE  # <3 distinct objects excluded
        _check_structure(rows, ann)
    # the same images, in the same order, for every split
    orders = {split: [r["image"] for r in rows[::6]] for split, rows in pope.items()}
    assert orders["random"] == orders["popular"] == orders["adversarial"]


def test_build_pope_popular_uses_global_image_frequency() -> None:
    # frequency = images containing it: person 5, car 4, cat 4, dog 3 (dup.jpg counts once),
    # then 1 each; ties by name: car before cat, bird before cup before lamp ...
    rows = build_pope(ANNOTATIONS, n_images=4, seed=0, splits=("popular",))["popular"]
    negatives = {img: [q["object"] for q in qs if q["label"] == "no"] for img, qs in _by_image(rows).items()}
    assert negatives == {
        "i1.jpg": ["person", "car", "cup"],
        "i2.jpg": ["person", "bird", "cup"],
        "i3.jpg": ["person", "dog", "bird"],
        "i4.jpg": ["person", "cat", "dog"],
    }


def test_build_pope_random_draws_from_sampled_images_only() -> None:
    rows = build_pope(ANNOTATIONS, n_images=4, seed=3, splits=("random",))["random"]
    pool = {o for name, objs in ANNOTATIONS if name in ELIGIBLE for o in objs}
    negatives = [r["object"] for r in rows if r["label"] == "no"]
    assert set(negatives) <= pool
    assert "person" not in negatives


def test_build_pope_adversarial_top_cooccurring() -> None:
    ann = [
        ("q.jpg", ["dog", "cat", "bird"]),
        ("a1.jpg", ["dog", "sofa", "x1"]),
        ("a2.jpg", ["dog", "sofa", "x2"]),
        ("a3.jpg", ["dog", "sofa"]),
        ("b1.jpg", ["cat", "car", "x3"]),
        ("b2.jpg", ["cat", "car"]),
        ("c1.jpg", ["bird", "tree"]),
    ]
    # co-occurrence: dog-sofa 3, cat-car 2, bird-tree 1 (bird-dog 1 and bird-cat 1 are in q.jpg)
    rows = build_pope(ann, n_images=4, seed=0, splits=("adversarial",))["adversarial"]
    by_image = _by_image(rows)
    assert [q["object"] for q in by_image["q.jpg"] if q["label"] == "no"] == ["sofa", "car", "tree"]
    # a1: dog -> sofa is in the image, ties at 1 (bird, cat, x2) by name -> bird; sofa -> x2;
    # x1 co-occurs only with dog and sofa (both in the image) -> random fallback
    a1 = [q["object"] for q in by_image["a1.jpg"] if q["label"] == "no"]
    assert a1[:2] == ["bird", "x2"]
    assert a1[2] in {"cat", "car", "x3"}
    _check_structure(rows, {name: objs for name, objs in ann})


def test_build_pope_deterministic_and_seeded() -> None:
    ann = [(f"img{i}.jpg", [f"o{(i + k) % 12}" for k in range(4)]) for i in range(12)]
    a = build_pope(ann, n_images=5, seed=7)
    b = build_pope(ann, n_images=5, seed=7)
    assert a == b
    assert all(len(rows) == 30 for rows in a.values())
    # another seed picks other images or other random negatives
    assert any(build_pope(ann, n_images=5, seed=s)["random"] != a["random"] for s in range(1, 4))
    # a split does not depend on which other splits are built
    assert build_pope(ann, n_images=5, seed=7, splits=("adversarial",))["adversarial"] == a["adversarial"]


def test_build_pope_too_few_images_warns_and_uses_all() -> None:
    with pytest.warns(UserWarning, match="only 4 images"):
        pope = build_pope(ANNOTATIONS, n_images=50, seed=0, splits=("popular",))
    assert {r["image"] for r in pope["popular"]} == ELIGIBLE


def test_build_pope_errors() -> None:
    with pytest.raises(ValueError):
        build_pope(ANNOTATIONS, n_images=2, seed=0, splits=("nonsense",))
    # 3 objects and no other object anywhere: no negative exists
    with pytest.raises(ValueError):
        build_pope([("a.jpg", ["x", "y", "z"])], n_images=1, seed=0, splits=("random",))


def test_question_text_article() -> None:
    assert question_text("dog") == "Is there a dog in the image?"
    assert question_text("apple") == "Is there an apple in the image?"
    assert question_text("umbrella") == "Is there an umbrella in the image?"
    assert question_text("elephant") == "Is there an elephant in the image?"
    assert question_text("orange") == "Is there an orange in the image?"
    assert question_text("hair drier") == "Is there a hair drier in the image?"
    assert question_text("unicorn") == "Is there a unicorn in the image?"


# --------------------------------------------------------------------------------------------
# Question files
# --------------------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path) -> None:
    rows = build_pope(ANNOTATIONS, n_images=4, seed=1, splits=("random",))["random"]
    path = write_pope_jsonl(rows, tmp_path / "coco_pope_random.json")
    assert read_pope_jsonl(path) == rows
    first = path.read_text().splitlines()[0]
    assert first.startswith('{"question_id": 1, "image": ')
    official = write_pope_jsonl(rows, tmp_path / "official.json", extra_keys=False)
    assert set(read_pope_jsonl(official)[0]) == {"question_id", "image", "text", "label"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco_pope_random.json", "official.json"]


def test_official_scorer_conformance_on_llava_predictions(oracles_dir):
    """LLaVA-1.5-13B's released POPE answers: the official evaluate.py's numbers, to the last digit."""
    import json as _json

    from lmmkit.eval.pope import parse_official, read_pope_jsonl, score_pope

    expected = _json.loads((oracles_dir / "pope" / "expected.json").read_text())["splits"]
    f1s = []
    for split, exp in expected.items():
        answers = read_pope_jsonl(oracles_dir / "pope" / exp["ans_file"])
        labels = read_pope_jsonl(oracles_dir / "pope" / exp["label_file"])
        got = score_pope([parse_official(a["answer"]) for a in answers], [r["label"] for r in labels])
        assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (exp["TP"], exp["FP"], exp["TN"], exp["FN"])
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            assert got[key] == exp[key], (split, key)
            assert str(got[key]) == exp[f"{key}_printed"]
        f1s.append(got["f1"])
    assert sum(f1s) / 3 == pytest.approx(0.8594688090539114, abs=1e-15)
