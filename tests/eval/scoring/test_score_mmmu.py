"""MMMU: official multiple-choice and open parsing, judges, robust parsers, totals, both oracle modes."""

from __future__ import annotations

import json
import random

import pytest

from lmmkit.eval.scoring.mmmu import (
    DISCIPLINES,
    SUBJECTS,
    eval_multi_choice,
    eval_only,
    eval_open,
    extract_numbers,
    key_subresponses,
    normalize_str,
    parse_and_eval,
    parse_multi_choice_official,
    parse_multi_choice_robust,
    parse_open_official,
    parse_open_robust,
    score_mmmu,
    subject_of,
)

ABCD = ["A", "B", "C", "D"]
OPTIONS = {"A": "red apple", "B": "green pear", "C": "blue plum", "D": "yellow banana"}


class NoGuess(random.Random):
    """An rng that marks the fallback instead of guessing, so a test sees when the rule gave up."""

    def choice(self, seq):
        return "GUESS"


def official(response: str, choices=ABCD, options=OPTIONS) -> str:
    return parse_multi_choice_official(response, choices, options, NoGuess())


# --------------------------------------------------------------------------------------------
# Official multiple choice
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("B", "B"),
        ("(C)", "C"),
        ("B.", "B"),
        ("b", "GUESS"),  # letters are case-sensitive
        ("B!.", "B"),  # "." is stripped, then "!"
        ("B.!", "GUESS"),  # "." goes before "!" is stripped: "B." is left, and " B. " has no " B "
        (".,A", "GUESS"),  # "," cannot be stripped past the leading "."; "." then leaves ",A"
        ("A.,", "A"),  # "," first, then "."
        ("A,.", "GUESS"),  # "," is blocked by the trailing "."; once "." goes, "," is not tried again
        ("(A) or B", "A"),  # "(x)" candidates come before " x " candidates
        ("I pick (B), not (A)", "A"),  # several: the last match (rfind) wins
        ("B or maybe A", "A"),
        ("A or maybe B or A", "A"),  # rfind of " A " is the later one
        ("It is a green pear", "GUESS"),  # 5 words: option texts are not tried
        ("I think it is a green pear", "B"),  # 6 words
        ("I think it is a GREEN PEAR", "B"),  # case-insensitive option text
        ("I think it is a blue plum, not a red apple", "A"),  # last option text wins
        ("Hard to tell from the picture alone", "GUESS"),
    ],
)
def test_parse_multi_choice_official(response, expected):
    assert official(response) == expected


def test_option_text_ties_go_to_the_first_choice():
    response = "I would say that it is the red apple"
    # "red" and "red apple" start at the same place: rfind ties, the first in order wins
    assert official(response, ["A", "B"], {"A": "red apple", "B": "red"}) == "A"
    assert official(response, ["A", "B"], {"A": "red", "B": "red apple"}) == "A"


def test_random_fallback_is_the_seeded_random_stream():
    unparseable = ["no idea"] * 20
    choices = [ABCD, ["A", "B"], ["A", "B", "C", "D", "E"]]
    rng = random.Random(42)
    got = [parse_multi_choice_official(r, choices[i % 3], OPTIONS, rng) for i, r in enumerate(unparseable)]
    # the official code calls random.seed(42) once, then random.choice per fallback
    state = random.getstate()
    try:
        random.seed(42)
        want = [random.choice(choices[i % 3]) for i in range(len(unparseable))]
    finally:
        random.setstate(state)
    assert got == want
    assert len(set(got)) > 1
    # a parseable answer draws nothing from the stream
    rng_a, rng_b = random.Random(7), random.Random(7)
    parse_multi_choice_official("(B)", ABCD, OPTIONS, rng_a)
    assert rng_a.random() == rng_b.random()


def test_eval_multi_choice():
    assert eval_multi_choice("B", "B")
    assert not eval_multi_choice("B", "b")
    assert not eval_multi_choice("B", "(B)")
    assert eval_multi_choice(["A", "C"], "C")
    assert not eval_multi_choice(["A", "C"], "B")


# --------------------------------------------------------------------------------------------
# Official open answers
# --------------------------------------------------------------------------------------------


def test_normalize_str():
    assert normalize_str(" 1,000 ") == [1000.0]
    assert normalize_str("3.14159") == [3.14]
    assert normalize_str("1e3") == [1000.0]
    assert normalize_str("Paris ") == ["paris"]
    assert normalize_str("C") == [" c", "c "]  # one character: padded so it cannot hit inside a word


def test_extract_numbers():
    # the simple pattern also takes the digits after a group comma
    assert extract_numbers("costs 1,234 dollars") == ["1,234", "234"]
    assert extract_numbers("20,000,000") == ["20,000,000", "000"]
    assert extract_numbers("x = -2.5 or .5") == ["-2.5", ".5"]
    assert "6.02e23" in extract_numbers("about 6.02e23 atoms")
    assert extract_numbers("7 and 11") == ["7", "11"]


def test_key_subresponses_takes_the_shortest_tail_after_an_indicator():
    assert key_subresponses("The answer is 5.") == ["5"]
    # "so " -> "the value is 12 thus 3", "is " -> "12 thus 3", "thus " -> "3": the shortest
    assert key_subresponses("So the value is 12 thus 3") == ["3"]
    # "=" counts only in the last sentence; newlines split sentences
    assert key_subresponses("x = 3\ny = 4") == ["4"]
    assert key_subresponses("no cue here") == ["no cue here"]


def test_sentence_split_never_fires_on_period_capital():
    # the split runs after lower-casing, so ". T" is not a boundary: only the last "is " tail counts
    parsed = parse_open_official("The mass is 5 kg. The volume is 2 L")
    assert set(parsed) == {"2 l", 2.0}
    assert 5.0 not in parsed
    assert set(parse_open_official("The mass is 5 kg.\nThe volume is 2 L")) == {"5 kg.", 5.0, "2 l", 2.0}


def test_parse_open_official():
    assert parse_open_official("42") == [42.0]
    # "500" comes from the simple-number pattern after the group comma
    assert set(parse_open_official("The answer is 1,500 dollars.")) == {"1,500 dollars", 1500.0, 500.0}
    assert set(parse_open_official("Paris")) == {"paris"}
    assert set(parse_open_official("C")) == {" c", "c "}
    assert len(parse_open_official("It is 3 and 3")) == len(set(parse_open_official("It is 3 and 3")))


@pytest.mark.parametrize(
    ("gold", "pred", "expected"),
    [
        ("3.14159", [3.14], True),  # both sides round(float, 2)
        ("3.14159", [3.15], False),
        ("1,000", [1000.0], True),
        ("five", [5.0], False),  # a number never matches a string gold
        ("Paris", ["the city of paris"], True),  # gold is a substring of the prediction
        ("Paris", ["pari"], False),
        ("C", ["c"], False),  # one-character gold is padded: " c" / "c "
        ("C", ["option c"], True),
        ("C", ["cat"], False),
        (["$MgS$", "MgS"], ["mgs"], True),
        (["24/7", "3.429"], [3.43], True),
        ("5", [], False),
    ],
)
def test_eval_open(gold, pred, expected):
    assert eval_open(gold, pred) is expected


def test_subject_of():
    assert subject_of("validation_Art_Theory_12") == "Art_Theory"
    assert subject_of("validation_Diagnostics_and_Laboratory_Medicine_3") == "Diagnostics_and_Laboratory_Medicine"
    assert SUBJECTS == tuple(sorted(s for subs in DISCIPLINES.values() for s in subs)) and len(SUBJECTS) == 30


# --------------------------------------------------------------------------------------------
# Robust parsers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("B", "B"),
        ("(b)", "B"),
        ("**C**", "C"),
        ("D.", "D"),
        ("The answer is (C).", "C"),
        ("Answer: D", "D"),
        ("The correct option is B because the pear is green.", "B"),
        ("A) red apple", "A"),
        ("(A) red apple\n(B) green pear\n(C) blue plum", None),  # a copied option list
        ("green pear", "B"),  # the answer is an option's text
        ("It looks like a yellow banana to me", "D"),
        ("It is a cat", None),  # "a" is an article, not option A
        ("I pick (B), not (A)", None),  # the official rule says A
        ("b", "B"),
        ("I don't know", None),
        ("", None),
    ],
)
def test_parse_multi_choice_robust(response, expected):
    assert parse_multi_choice_robust(response, ABCD, OPTIONS) == expected


def test_robust_option_text_prefers_the_longer_option_and_whole_phrases():
    options = {"A": "$1", "B": "$12", "C": "red", "D": "red apple"}
    assert parse_multi_choice_robust("The total is $12", ABCD, options) == "B"  # "$1" is inside "$12"
    assert parse_multi_choice_robust("It is a red apple", ABCD, options) == "D"
    assert parse_multi_choice_robust("It is reddish", ABCD, options) is None


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("42", {42.0}),
        ("**42**", {42.0}),
        ("The answer is 5 kg.", {"5 kg", 5.0}),
        ("Answer: Paris", {"paris"}),
        ("The mass is 5 kg. Therefore, the speed is 3.5 m/s. Hope this helps", {"the speed is 3.5 m/s", 3.5}),
        ("x = 3\ny = 4", {4.0}),
        ("", None),
        (" ... ", None),
    ],
)
def test_parse_open_robust(response, expected):
    got = parse_open_robust(response)
    assert (set(got) if got is not None else None) == expected


# --------------------------------------------------------------------------------------------
# Totals and the two modes on small hand-made data
# --------------------------------------------------------------------------------------------


def _item(item_id, qtype, answer, pred):
    return {"id": item_id, "question_type": qtype, "answer": answer, "parsed_pred": pred}


def test_score_mmmu_micro_and_per_subject():
    items = [
        _item("validation_Art_1", "multiple-choice", "A", "A"),
        _item("validation_Art_2", "multiple-choice", "B", None),  # robust "unclear": wrong
        _item("validation_Math_1", "open", "3.5", [3.5]),
        _item("validation_Math_2", "short-answer", "7", None),
        _item("validation_Math_3", "multiple-choice", ["A", "B"], "B"),
    ]
    result = score_mmmu(items)
    assert (result["correct"], result["total"], result["acc"]) == (3, 5, 3 / 5)
    assert result["subjects"] == {"Art": {"correct": 1, "total": 2, "acc": 1 / 2},
                                  "Math": {"correct": 2, "total": 3, "acc": 2 / 3}}
    assert result["disciplines"]["Science"]["correct"] == 2 and "Business" not in result["disciplines"]
    assert result["judges"]["validation_Math_1"] and not result["judges"]["validation_Art_2"]
    with pytest.raises(ValueError, match="duplicate"):
        score_mmmu(items + items[:1])


def test_parse_and_eval_draws_fallbacks_in_alphabetical_subject_order():
    def mc(item_id, choices, response):
        return {"id": item_id, "question_type": "multiple-choice", "answer": "A", "all_choices": choices,
                "index2ans": {c: f"option {c}" for c in choices}, "response": response}

    five = ["A", "B", "C", "D", "E"]
    outputs = {  # deliberately not in alphabetical order
        "Math": [mc("validation_Math_1", five, "??")],
        "Art": [mc("validation_Art_1", ["A", "B"], "??"),
                {"id": "validation_Art_2", "question_type": "open", "answer": "4", "all_choices": [],
                 "index2ans": {}, "response": "2 + 2 = 4"},
                mc("validation_Art_3", ABCD, "(C)"),
                mc("validation_Art_4", ABCD, "hmm")],
    }
    rng = random.Random(9)
    want = {"validation_Art_1": rng.choice(["A", "B"]), "validation_Art_4": rng.choice(ABCD),
            "validation_Math_1": rng.choice(five)}
    result = parse_and_eval(outputs, seed=9)
    assert result["random_fallbacks"] == list(want)
    assert {i: result["items"][i]["parsed_pred"] for i in want} == want
    assert result["items"]["validation_Art_3"]["parsed_pred"] == "C"
    assert result["items"]["validation_Art_2"]["correct"] is True
    assert result["total"] == 5 and result["subjects"]["Art"]["total"] == 4


def test_eval_only_compares_letters_exactly_and_parses_open_answers():
    answers = {
        "validation_Art_1": {"question_type": "multiple-choice", "ground_truth": "A"},
        "validation_Art_2": {"question_type": "multiple-choice", "ground_truth": "B"},
        "validation_Math_1": {"question_type": "short-answer", "ground_truth": "12"},
    }
    outputs = {"validation_Art_1": "A", "validation_Art_2": "(B)", "validation_Math_1": "The answer is 12.",
               "validation_Cooking_1": "A"}
    result = eval_only(answers, outputs)
    assert result["judges"] == {"validation_Art_1": True, "validation_Art_2": False, "validation_Math_1": True}
    assert result["skipped"] == ["validation_Cooking_1"]
    with pytest.raises(ValueError, match="validation_Art_3"):
        eval_only(answers, {"validation_Art_3": "A"})


# --------------------------------------------------------------------------------------------
# Oracles: the official main_eval_only.py and main_parse_and_eval.py on LLaVA-1.5-13B outputs
# --------------------------------------------------------------------------------------------


def _outputs(root):
    return {d.name: json.loads((d / "output.json").read_text()) for d in root.iterdir() if d.is_dir()}


def test_eval_only_matches_the_official_run(oracles_dir):
    root = oracles_dir / "mmmu"
    expected = json.loads((root / "expected.json").read_text())["eval_only"]["llava1.5_13b/total_val_output.json"]
    judges = json.loads((root / "expected_items.json").read_text())["eval_only"]["llava1.5_13b/total_val_output.json"]
    result = eval_only(root / "answer_dict_val.json", root / "example_outputs/llava1.5_13b/total_val_output.json")
    assert (result["correct"], result["total"]) == (expected["overall_correct"], expected["overall_num"]) == (330, 900)
    assert result["acc"] == result["acc_official"] == expected["overall_acc_full_precision"]
    assert result["skipped"] == []
    for subject, want in expected["per_subject_full_precision"].items():
        got = result["subjects"][subject]
        assert (got["correct"], got["total"], got["acc"]) == (want["correct"], want["num_example"], want["acc"])
    for name, want in expected["per_discipline_full_precision"].items():
        got = result["disciplines"][name]
        assert (got["correct"], got["total"], got["acc"]) == (want["correct"], want["num"], want["acc_full_precision"])
    printed = expected["printed_results"]
    for name, got in result["disciplines"].items():
        assert round(got["acc"], 3) == printed[f"Overall-{name}"]["acc"]
    assert round(result["acc_official"], 3) == printed["Overall"]["acc"]
    assert result["judges"] == {i: j == "Correct" for i, j in judges.items()}


def test_parse_and_eval_matches_the_official_run_item_by_item(oracles_dir):
    root = oracles_dir / "mmmu"
    expected = json.loads((root / "expected.json").read_text())["parse_and_eval"]["llava1.5_13b"]
    items = json.loads((root / "expected_items.json").read_text())["parse_and_eval"]["llava1.5_13b"]
    result = parse_and_eval(_outputs(root / "example_outputs" / "llava1.5_13b"))
    assert set(result["items"]) == set(items)
    for item_id, want in items.items():
        got = result["items"][item_id]
        if isinstance(want["parsed_pred"], list):  # list(set(...)) in the official code: order is arbitrary
            assert len(got["parsed_pred"]) == len(want["parsed_pred"]), item_id
            assert set(got["parsed_pred"]) == set(want["parsed_pred"]), item_id
        else:
            assert got["parsed_pred"] == want["parsed_pred"], item_id
        assert got["correct"] is (want["judge"] == "Correct"), item_id
    assert result["random_fallbacks"] == expected["random_fallbacks"]["ids"]
    assert result["correct"] == expected["overall_correct"] == 330
    assert result["acc_official"] == expected["overall_acc_full_precision"]
    for subject, want in expected["per_subject_result_json"].items():
        got = result["subjects"][subject]
        assert (got["acc"], got["total"], got["correct"]) == (want["acc"], want["num_example"], want["correct"])
