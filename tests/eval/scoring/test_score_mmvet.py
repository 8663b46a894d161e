"""MM-Vet grader prompt, score parsing, the official retry policy, aggregation and the LLaVA-1.5 oracle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmmkit.eval.scoring.mmvet import (
    RETRY_HINT,
    aggregate_mmvet,
    build_grader_prompt,
    grade_with_retries,
    np_round,
    parse_grader_score,
    read_grade_file,
)


def test_grader_prompt_layout():
    prompt = build_grader_prompt("What is x?", "-1<AND>-5", "x = -1")
    lines = prompt.split("\n")
    assert lines[-1] == "What is x? | -1 <AND> -5 | x = -1 | "     # the item's row, empty score
    assert "<AND>" in lines[0] and "<OR>" in lines[0]               # the instruction explains both
    header = lines.index("Question | Ground truth | Prediction | Score")
    rows = lines[header + 2:-1]
    assert len(rows) >= 4
    for row in rows:                                                # few-shot rows carry a score in [0, 1]
        assert 0.0 <= float(row.rsplit(" | ", 1)[1]) <= 1.0
    assert build_grader_prompt("q", "a<OR>b", "p").endswith("q | a <OR> b | p | ")


@pytest.mark.parametrize("reply, expected", [
    ("0.7", 0.7),
    ("1.0", 1.0),
    ("0", 0.0),
    ("0.5 because half is right", 0.5),
    ("0.5\n", 0.5),
    ("1.5", None),
    ("-0.1", None),
    ("Score: 0.4", None),
    (" 0.4", None),        # the official splits on " " first, so a leading space gives an empty token
    ("0.4\nok", None),     # ... and only on spaces
    ("nan", None),
    ("", None),
])
def test_parse_grader_score(reply, expected):
    assert parse_grader_score(reply) == expected


class FakeGrader:
    def __init__(self, replies):
        self.replies = list(replies)
        self.calls: list[tuple[str, float]] = []

    def __call__(self, prompt: str, temperature: float) -> str:
        self.calls.append((prompt, temperature))
        return self.replies[len(self.calls) - 1]


def test_retry_until_parse():
    ask = FakeGrader(["I think", "Score", "0.6"])
    score, replies = grade_with_retries(ask, "PROMPT")
    assert score == 0.6 and replies == ["I think", "Score", "0.6"]
    assert ask.calls[0] == ("PROMPT", 0.0)                          # the first try has no hint
    assert ask.calls[1] == ("PROMPT" + RETRY_HINT, 0.0)             # first retry: hint, still temperature 0
    assert ask.calls[2] == ("PROMPT" + RETRY_HINT, 0.5)


def test_retry_gives_up_with_zero():
    ask = FakeGrader(["??"] * 10)
    score, replies = grade_with_retries(ask, "P")
    assert score == 0.0 and len(replies) == 5
    assert [t for _, t in ask.calls] == [0.0, 0.0, 0.5, 1.0, 1.5]
    ask = FakeGrader(["??"] * 10)
    assert grade_with_retries(ask, "P", max_tries=2) == (0.0, ["??", "??"])


def test_first_reply_parses_no_retry():
    ask = FakeGrader(["1.0", "never asked"])
    assert grade_with_retries(ask, "P") == (1.0, ["1.0"])
    assert len(ask.calls) == 1


def test_numpy_rounding():
    # 2.45 is 2.4500000000000002 in binary: Python rounds it up, numpy (x*10 = 24.5, half to even) down
    assert np_round(2.45) == 2.4 and round(2.45, 1) == 2.5
    r = aggregate_mmvet([{"a": 0.0245}])
    assert r["run_totals"] == [0.0245 / 1 * 100] and r["total"] == 2.4 and r["runs"] == [2.4]
    r = aggregate_mmvet([{"a": 0.0255}])
    assert r["total"] == 2.6 and round(r["run_totals"][0], 1) == 2.5


def test_std_is_population_std_rounded_like_numpy():
    r = aggregate_mmvet([{"a": 0.0}, {"a": 0.003}])                # totals 0.0 and 0.3
    spread = float(np.std(r["run_totals"]))
    assert round(spread, 1) == 0.1 and r["std"] == 0.2              # 0.15 rounds down in Python, up in numpy
    r = aggregate_mmvet([{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 0.0}, {"a": 1.0, "b": 1.0}])
    assert r["run_totals"] == [50.0, 0.0, 100.0]
    assert r["total"] == 50.0 and r["std"] == np_round(np.sqrt(5000 / 3)) == 40.8  # ddof 1 would be 50.0
    assert r["runs_str"] == "[50.0, 0.0, 100.0]" and r["n"] == 2


def test_total_sums_in_given_order():
    scores = [0.1] * 10 + [0.7, 0.2]
    fwd = {f"k{i}": s for i, s in enumerate(scores)}
    rev = {f"k{i}": s for i, s in reversed(list(enumerate(scores)))}
    acc_f, acc_r = 0.0, 0.0
    for s in scores:
        acc_f += s
    for s in reversed(scores):
        acc_r += s
    assert acc_f != acc_r                                           # float sums depend on order ...
    assert aggregate_mmvet([fwd])["run_totals"] == [acc_f / 12 * 100]
    assert aggregate_mmvet([rev])["run_totals"] == [acc_r / 12 * 100]  # ... and we keep the given order


def test_capabilities():
    runs = [{"a": 1.0, "b": 0.5, "c": 0.0}, {"a": 1.0, "b": 0.0, "c": 0.0}]
    caps = {"a": ["rec", "ocr"], "b": ["ocr"], "c": ["math", "ocr"]}
    r = aggregate_mmvet(runs, caps)
    assert list(r["capabilities"]) == ["ocr", "rec", "math"]        # by item count, first seen on ties
    assert r["capabilities"] == {"ocr": 41.7, "rec": 100.0, "math": 0.0}  # ocr: mean(50, 33.3)
    assert r["total"] == 41.7
    with pytest.raises(ValueError, match="'c'"):
        aggregate_mmvet(runs, {"a": ["rec"], "b": ["ocr"]})


def test_runs_must_share_ids():
    with pytest.raises(ValueError):
        aggregate_mmvet([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(ValueError):
        aggregate_mmvet([])


def test_read_grade_file(tmp_path):
    path = tmp_path / "g.json"
    grades = {"v1_0": {"model": ["m", "m"], "content": ["0.5", "1.0"], "score": [0.5, 1.0]},
              "v1_1": {"model": ["m", "m"], "content": ["0", "x"], "score": [0, 0.0]}}
    path.write_text(json.dumps(grades))
    assert read_grade_file(path) == [{"v1_0": 0.5, "v1_1": 0.0}, {"v1_0": 1.0, "v1_1": 0.0}]
    grades["v1_1"]["score"] = [0.0]
    path.write_text(json.dumps(grades))
    with pytest.raises(ValueError, match=r"g\.json.*v1_1"):
        read_grade_file(path)
    grades["v1_1"] = {"model": ["m"]}
    path.write_text(json.dumps(grades))
    with pytest.raises(ValueError, match=r"g\.json.*v1_1.*score"):
        read_grade_file(path)
    grades["v1_1"] = {"score": [0.5, "0.5"]}
    path.write_text(json.dumps(grades))
    with pytest.raises(ValueError, match=r"g\.json.*v1_1.*run 1"):
        read_grade_file(path)


# --- oracle: LLaVA-1.5-13B grade files, checked against the official evaluator's numbers -------

@pytest.mark.parametrize("name", ["llava-v1.5-13b/1runs", "llava-v1.5-13b/3runs"])
def test_oracle_llava_graded(oracles_dir, name):
    root = oracles_dir / "mmvet"
    case = json.loads((root / "expected.json").read_text(encoding="utf-8"))["llava_v1.5_graded"][name]
    runs = read_grade_file(root / case["grade_file"])
    assert all(len(run) == 218 for run in runs)
    r = aggregate_mmvet(runs)
    want = case["official_code_rerun_total_std_runs"]
    assert str(r["total"]) == want["total"] == case["released_cap_score_row"]["total"]
    assert str(r["std"]) == want["std"]
    assert r["runs_str"] == want["runs"]
    assert r["run_totals"] == case["per_run_total_unrounded_helper"]  # to the last digit
    # with every item in one capability, that capability's total is the overall total
    assert aggregate_mmvet(runs, {i: ["all"] for i in runs[0]})["capabilities"] == {"all": r["total"]}
