"""MMHal-Bench judge prompt, the official exactly-one-rating rule and the aggregates."""

from __future__ import annotations

import pytest

from lmmkit.eval.scoring.mmhal import QUESTION_TYPES, aggregate_mmhal, build_judge_prompt, parse_rating


def test_question_types_in_index_order():
    assert QUESTION_TYPES == ("attribute", "adversarial", "comparison", "counting", "relation",
                              "environment", "holistic", "other")


def test_judge_prompt_carries_the_item():
    item = {"image_content": ["Dog", "Frisbee", "Grass"], "question": "What is the dog catching?",
            "gt_answer": "A red frisbee."}
    prompt = build_judge_prompt(item, "It is catching a ball.")
    for text in ("Dog, Frisbee, Grass", "What is the dog catching?", "A red frisbee.", "It is catching a ball."):
        assert text in prompt
    for level in range(7):                                   # every level of the scale is defined
        assert f"\n{level} - " in prompt
    assert "rating: N" in prompt
    # the judge's own instruction line must not be parsed as a rating
    assert parse_rating(prompt) == 0


@pytest.mark.parametrize("reply, expected", [
    ("The answer matches.\nrating: 5", 5),
    ("Rating: 6", 6),                                        # matched on the lower-cased reply
    ("RATING: 0", 0),
    ("The response invents a ball.\nrating: 1", 1),
    ("rating: 2 ... on reflection, rating: 2", 2),           # the same s twice is still one s
    ("I would give it a 4.", 0),                             # zero matches -> 0
    ("rating: 3 or rating: 4", 0),                           # two different matches -> 0
    ("rating:5", 0),                                         # the space is required
    ("rating: 7", 0),                                        # outside 0..6
    ("rating: 60", 6),                                       # substring test, as the official
])
def test_parse_rating(reply, expected):
    assert parse_rating(reply) == expected


def test_aggregate_types_by_index_mod_8():
    ratings = [6, 0, 5, 1, 4, 2, 3, 6] * 2 + [0]            # 17 items: index 16 is "attribute" again
    r = aggregate_mmhal(ratings)
    assert r["n"] == 17
    assert r["average"] == sum(ratings) / 17
    assert r["hallucination_rate"] == 7 / 17                 # 0, 1, 2 twice each, and the last 0
    assert r["per_type"]["attribute"] == 4.0                 # (6 + 6 + 0) / 3
    assert r["per_type"]["adversarial"] == 0.0
    assert r["per_type"]["holistic"] == 3.0                  # 3 is not a hallucination
    assert r["per_type_n"]["attribute"] == 3 and r["per_type_n"]["other"] == 2
    assert list(r["per_type"]) == list(QUESTION_TYPES)


def test_aggregate_partial_and_invalid():
    r = aggregate_mmhal([2, 3])
    assert r["per_type"] == {"attribute": 2.0, "adversarial": 3.0} and r["hallucination_rate"] == 0.5
    for bad in ([], [7], [-1], [2.5], [True]):
        with pytest.raises(ValueError):
            aggregate_mmhal(bad)


def test_full_benchmark_shape():
    ratings = [(i * 5) % 7 for i in range(96)]
    r = aggregate_mmhal(ratings)
    assert all(n == 12 for n in r["per_type_n"].values())
    for k, t in enumerate(QUESTION_TYPES):
        assert r["per_type"][t] == sum(ratings[k::8]) / 12
