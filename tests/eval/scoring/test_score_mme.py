"""MME: official yes/no rule, result files, official score arithmetic, robust parser, LaVIN oracle."""

from __future__ import annotations

import json

import pytest

from lmmkit.eval.scoring.mme import (
    COGNITION,
    PERCEPTION,
    MMERow,
    parse_official,
    parse_robust,
    read_mme_file,
    score_mme,
    score_mme_dir,
    score_subtask,
    write_mme_file,
)

# --------------------------------------------------------------------------------------------
# Official parser: lower-case, exact yes/no, then "yes" / "no" within the first 4 characters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("yes", "yes"),
        ("No", "no"),
        ("YES\n", "yes"),  # lower-cased first
        ("Yes, there is a dog.\n", "yes"),
        ("no, there is no bed.\n", "no"),
        (" yes", "yes"),  # " yes" is within 4 characters
        ("  yes", "other"),  # "  ye": two spaces push "yes" out of the window
        ("Yesterday it rained", "yes"),  # a prefix, not a word
        ("Not sure", "no"),  # "not " contains "no"
        ("Nope", "no"),
        ("know", "no"),  # "no" anywhere in the first 4 characters
        ("Enough", "no"),  # "enou"
        ("nyes", "yes"),  # yes is tested before no
        ("noyes", "no"),  # "noye" holds no "yes"
        ("The answer is yes", "other"),
        ("I think so", "other"),
        ("", "other"),
        ("\n", "other"),
    ],
)
def test_parse_official(response, expected):
    assert parse_official(response) == expected


# --------------------------------------------------------------------------------------------
# Robust parser
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("Yes.", "yes"),
        (" no,", "no"),
        ("**Yes**", "yes"),
        ("NO!\n", "no"),
        ("  yes", "yes"),  # the official window misses it
        ("The answer is yes.", "yes"),
        ("My answer: No", "no"),
        ("Nope, nothing there", "no"),
        ("Yesterday it rained", None),  # the official rule says yes
        ("Not sure", None),  # the official rule says no
        ("Enough said", None),
        ("I think so", None),
        ("The answer is yes or no", None),  # both: unclear
        ("", None),
        ("...", None),
    ],
)
def test_parse_robust(response, expected):
    assert parse_robust(response) == expected


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_read_keeps_the_trailing_newline_except_on_an_unterminated_last_line(tmp_path):
    path = tmp_path / "existence.txt"
    path.write_text("a.jpg\tIs it red?\tYes\tyes\nb.jpg\tIs it blue?\tNo\tno", encoding="utf-8")
    rows = read_mme_file(path)
    assert rows == [MMERow("a.jpg", "Is it red?", "Yes", "yes\n"), MMERow("b.jpg", "Is it blue?", "No", "no")]
    # the official exact-match test can only fire on the unterminated line
    assert rows[0].response.lower() not in ("yes", "no")
    assert rows[1].response.lower() in ("yes", "no")


def test_read_translates_crlf_like_text_mode(tmp_path):
    path = tmp_path / "count.txt"
    path.write_bytes(b"a.jpg\tQ?\tYes\tYes, two\r\na.jpg\tQ2?\tNo\tNo\r\n")
    assert [r.response for r in read_mme_file(path)] == ["Yes, two\n", "No\n"]


def test_read_template_has_no_response(tmp_path):
    path = tmp_path / "color.txt"
    path.write_text("a.jpg\tIs it red?\tYes\na.jpg\tIs it blue?\tno\n", encoding="utf-8")
    rows = read_mme_file(path)
    assert [(r.answer, r.response) for r in rows] == [("Yes", None), ("no", None)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.jpg\tQ?\tYes\tyes\na.jpg\tQ?\tNo\tno\tmore\n", r":2: expected 3 or 4 tab-separated fields.*got 5"),
        ("a.jpg\tQ?\tYes\tyes\n\n", r":2: expected 3 or 4"),  # a blank line
        ("a.jpg Q? Yes yes\n", r":1: expected 3 or 4.*got 1"),
        ("a.jpg\tQ?\tyes\tyes\na.jpg\tQ?\tMaybe\tno\n", r":2: ground truth must be Yes or No, got 'Maybe'"),
    ],
)
def test_read_rejects_bad_lines_with_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as err:
        read_mme_file(path)
    assert str(path) in str(err.value)


def test_write_round_trips_and_flattens_tabs_and_newlines(tmp_path):
    rows = [
        MMERow("a.jpg", "Is it red?", "Yes", "Yes\tit is\nred\n"),
        MMERow("a.jpg", "Is it blue?", "No", None),
        MMERow("b.jpg", "Is it a cat?", "Yes", "yes\n"),
        MMERow("b.jpg", "Is it a dog?", "No", "no"),
    ]
    path = write_mme_file(tmp_path / "sub" / "scene.txt", rows)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and all(len(line.split("\t")) == 4 for line in lines[:-1])
    back = read_mme_file(path)
    assert [r.response for r in back] == ["Yes it is red\n", "\n", "yes\n", "no\n"]
    assert [(r.image, r.question, r.answer) for r in back] == [(r.image, r.question, r.answer) for r in rows]
    assert read_mme_file(write_mme_file(tmp_path / "again.txt", back)) == back


def test_write_rejects_a_tab_in_the_question(tmp_path):
    with pytest.raises(ValueError, match="question"):
        write_mme_file(tmp_path / "x.txt", [MMERow("a.jpg", "Is\tit?", "Yes", "yes")])


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def test_score_subtask_counts_other_as_wrong_and_outside_the_confusion_matrix():
    rows = [("a", "Yes", "yes"), ("a", "No", "other"), ("b", "Yes", "no"), ("b", "No", "no")]
    m = score_subtask(rows)
    assert (m["TP"], m["FN"], m["TN"], m["FP"], m["other_num"]) == (1, 1, 1, 0, 1)
    assert m["acc"] == 2 / 4  # the "other" row is wrong
    assert m["acc_plus"] == 0 / 2
    assert (m["precision"], m["recall"]) == (1 / 1, 1 / 2)


def test_acc_plus_pairs_consecutive_rows_without_checking_images():
    # pairs are rows (0, 1) and (2, 3) whatever the image names say
    rows = [("x", "Yes", "yes"), ("y", "No", "no"), ("y", "Yes", "no"), ("x", "No", "no")]
    assert score_subtask(rows)["acc_plus"] == 1 / 2
    with pytest.raises(ValueError, match="pairs"):
        score_subtask(rows[:3])


def test_score_uses_the_official_float_order():
    # 3 images, 4 of 6 right, 1 image with both right
    rows = [("a", "Yes", "yes"), ("a", "No", "no"), ("b", "Yes", "yes"), ("b", "No", "yes"),
            ("c", "Yes", "no"), ("c", "No", "no")]
    m = score_subtask(rows)
    acc, acc_plus = 4 / 6, 1 / 3
    assert (m["acc"], m["acc_plus"]) == (acc, acc_plus)
    official = 0
    official += acc * 100
    official += acc_plus * 100
    assert m["score"] == official
    assert official != 100 * (acc + acc_plus)  # the case tells the two orders apart


def test_zero_denominators_give_zero():
    m = score_subtask([("a", "No", "no"), ("a", "No", "other")])
    assert (m["precision"], m["recall"], m["TP"], m["TN"]) == (0.0, 0.0, 0, 1)


def test_score_mme_totals_in_group_order_and_reports_missing():
    tasks = {  # given in reverse; scores 16.66.., 200.0, 50.0 sum differently in the two orders
        "t3": [("a", "Yes", "yes")] + [("x", "No", "yes")] * 5,
        "t2": [("a", "Yes", "yes"), ("a", "No", "no")],
        "t1": [("a", "Yes", "yes"), ("a", "No", "yes")],
        "shapes_existence": [("a", "Yes", "yes"), ("a", "No", "no")],
    }
    result = score_mme(tasks, groups={"mine": ("t1", "t2", "t3", "t4")})
    scores = [result["tasks"][t]["score"] for t in ("t1", "t2", "t3")]
    forward = 0
    for s in scores:
        forward += s
    backward = 0
    for s in reversed(scores):
        backward += s
    assert forward != backward
    assert result["mine_total"] == forward
    assert result["other_total"] == result["tasks"]["shapes_existence"]["score"] == 200.0
    assert result["missing"] == {"mine": ["t4"]}


def test_score_mme_default_groups():
    pair = [("a", "Yes", "yes"), ("a", "No", "no")]
    result = score_mme({"existence": pair, "OCR": pair, "code_reasoning": pair, "shapes_count": pair})
    assert result["perception_total"] == 400.0 and result["cognition_total"] == 200.0
    assert result["other_total"] == 200.0
    assert result["missing"]["perception"] == [t for t in PERCEPTION if t not in ("existence", "OCR")]
    assert result["missing"]["cognition"] == list(COGNITION[:3])
    with pytest.raises(ValueError, match="reserved"):
        score_mme({}, groups={"other": ("existence",)})


def test_score_mme_dir_with_the_robust_parser(tmp_path):
    write_mme_file(tmp_path / "existence.txt", [MMERow("a", "q", "Yes", "  Yes."), MMERow("a", "q", "No", "Hmm")])
    strict = score_mme_dir(tmp_path)["tasks"]["existence"]
    robust = score_mme_dir(tmp_path, parse_robust)["tasks"]["existence"]
    assert (strict["acc"], strict["other_num"]) == (0.0, 2)
    assert (robust["acc"], robust["other_num"]) == (0.5, 1)


# --------------------------------------------------------------------------------------------
# Oracle: the official calculation.py on its bundled LaVIN results
# --------------------------------------------------------------------------------------------


def test_lavin_matches_the_official_tool_to_the_last_digit(oracles_dir):
    expected = json.loads((oracles_dir / "mme" / "expected.json").read_text())["runs"]["LaVIN"]
    result = score_mme_dir(oracles_dir / "mme" / "LaVIN")
    assert result["perception_total"] == expected["perception_total"]
    assert result["cognition_total"] == expected["cognition_total"]
    assert repr(result["perception_total"]) == expected["perception_total_printed"]
    assert result["missing"] == {"perception": [], "cognition": []}
    assert list(result["tasks"]) == [*PERCEPTION, *COGNITION]
    for task, score in expected["task_scores"].items():
        assert result["tasks"][task]["score"] == score, task
        assert repr(result["tasks"][task]["score"]) == expected["task_scores_printed"][task]
    for task, metrics in expected["per_task_metric_dict"].items():
        assert {k: result["tasks"][task][k] for k in metrics} == metrics, task


def test_template_lines_up_with_the_lavin_results(oracles_dir):
    for task in (*PERCEPTION, *COGNITION):
        template = read_mme_file(oracles_dir / "mme" / "Your_Results" / f"{task}.txt")
        results = read_mme_file(oracles_dir / "mme" / "LaVIN" / f"{task}.txt")
        assert all(r.response is None for r in template)
        assert [(r.image, r.answer) for r in template] == [(r.image, r.answer) for r in results], task
