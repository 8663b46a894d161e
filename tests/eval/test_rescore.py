"""`lmmkit score`: rescoring released prediction files reproduces the official scorers' numbers and text.

The oracle tests read ../shared/oracles (skipped when absent); the edge cases use small files in tmp_path.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json

import pytest

from lmmkit.eval.pope import read_pope_jsonl, score_pope_by_position
from lmmkit.eval.rescore import (
    RescoreError,
    score_mathvista_output,
    score_mme_results,
    score_mmmu_eval_only,
    score_mmmu_outputs,
    score_mmvet_grades,
    score_pope_files,
    score_pope_llava,
)
from lmmkit.eval.rescore_cli import add_score_parser
from lmmkit.eval.rescore_format import mmmu_table
from lmmkit.eval.scoring.mathvista import group_order
from lmmkit.eval.scoring.mme import read_mme_file, score_mme_dir

SPLITS = ("random", "popular", "adversarial")
RULE = "=" * 36 + "\n"


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Parse `lmmkit <argv>` with a parser holding only the score command, run it, return (rc, out, err)."""
    parser = argparse.ArgumentParser(prog="lmmkit")
    add_score_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    capsys.readouterr()
    rc = args.func(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pope_files(tmp_path, answers, labels) -> tuple[str, str]:
    return (write_jsonl(tmp_path / "answers.json", [{"answer": a} for a in answers]),
            write_jsonl(tmp_path / "labels.json", [{"label": lab} for lab in labels]))


# --------------------------------------------------------------------------------------------
# POPE oracle
# --------------------------------------------------------------------------------------------

POPE_KEYS = {"TP": "tp", "FP": "fp", "TN": "tn", "FN": "fn", "accuracy": "accuracy", "precision": "precision",
             "recall": "recall", "f1": "f1", "yes_ratio": "yes_ratio"}


def check_pope(got: dict, want: dict) -> None:
    for theirs, ours in POPE_KEYS.items():
        assert got[ours] == want[theirs], theirs
        if f"{theirs}_printed" in want:
            assert str(got[ours]) == want[f"{theirs}_printed"]
    assert got["undefined"] == []


@pytest.mark.parametrize("split", SPLITS)
def test_pope_oracle_answers_and_labels(oracles_dir, split, capsys, tmp_path):
    root = oracles_dir / "pope"
    want = json.loads((root / "expected.json").read_text())["splits"][split]
    answers, labels = root / want["ans_file"], root / want["label_file"]
    result = score_pope_files(answers, labels, "both")
    check_pope(result["strict"], want)
    assert (result["strict"]["n_predictions"], result["strict"]["n_labels"]) == (want["n_answers"], want["n_labels"])
    assert result["official_text"] == want["stdout"]
    assert result["warnings"] == []
    assert result["robust"]["unparseable"] == 0  # every answer is exactly "Yes" or "No"

    rc, out, err = run_cli(["score", "pope", str(answers), str(labels), "--json", str(tmp_path / "r.json")], capsys)
    assert (rc, out, err) == (0, want["stdout"], "")  # byte for byte the official's stdout
    check_pope(json.loads((tmp_path / "r.json").read_text())["strict"], want)


def test_pope_oracle_three_splits_mean_f1(oracles_dir, capsys, tmp_path):
    root = oracles_dir / "pope"
    expected = json.loads((root / "expected.json").read_text())
    argv = ["score", "pope", "--json", str(tmp_path / "r.json")]
    for split in SPLITS:
        argv += [str(root / expected["splits"][split]["ans_file"]), str(root / expected["splits"][split]["label_file"])]
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0
    for split in SPLITS:
        assert expected["splits"][split]["stdout"] in out
    mean = expected["mean_f1_random_popular_adversarial"]["value"]
    assert f"strict mean F1 over 3 files, in the order given: {mean}" in err
    assert json.loads((tmp_path / "r.json").read_text())["mean_f1_strict"] == mean == pytest.approx(0.859, abs=5e-4)


def test_pope_oracle_llava_format(oracles_dir, capsys):
    root = oracles_dir / "pope"
    expected = json.loads((root / "expected.json").read_text())
    files = (root / "llava_format/llava-v1.5-13b.jsonl", root / "llava_format/llava_pope_test.jsonl", root / "labels")
    result = score_pope_llava(*files)
    for split in SPLITS:
        entry = result["categories"][split]
        check_pope(entry["strict"], expected["splits"][split])
        assert entry["n_answers"] == expected["splits"][split]["n_answers"]
    assert result["mean_f1_strict"] == expected["mean_f1_random_popular_adversarial"]["value"]
    assert result["warnings"] == []

    def blocks(text: str) -> dict[str, str]:  # LLaVA prints categories in os.listdir order; lmmkit sorts
        return {b.split(",")[0]: b for b in text.split(RULE) if b}

    want = expected["cross_check_llava_eval_pope_py"]["stdout"]
    assert blocks(result["official_text"]) == blocks(want) and len(blocks(want)) == 3
    rc, out, err = run_cli(["score", "pope", "--llava", str(files[0]), "--questions", str(files[1]),
                            "--labels-dir", str(files[2])], capsys)
    assert rc == 0 and blocks(out) == blocks(want)
    assert "mean F1 over 3 categories: 0.8594688090539114" in err


# --------------------------------------------------------------------------------------------
# MME oracle
# --------------------------------------------------------------------------------------------

def test_mme_oracle_lavin(oracles_dir, capsys):
    want = json.loads((oracles_dir / "mme/expected.json").read_text())["runs"]["LaVIN"]
    folder = oracles_dir / "mme" / want["results_dir"]
    result = score_mme_results(folder, "both")
    strict = result["strict"]
    assert strict["perception_total"] == want["perception_total"]
    assert strict["cognition_total"] == want["cognition_total"]
    assert str(strict["perception_total"]) == want["perception_total_printed"]
    for task, score in want["task_scores"].items():
        assert strict["tasks"][task]["score"] == score
        assert str(strict["tasks"][task]["score"]) == want["task_scores_printed"][task]
        for key, value in want["per_task_metric_dict"][task].items():
            assert strict["tasks"][task][key] == value, (task, key)
    assert result["official_text"] == want["stdout"]
    assert result["warnings"] == []
    assert result["robust"]["unparseable"] == sum(t["other_num"] for t in result["robust"]["tasks"].values())

    rc, out, err = run_cli(["score", "mme", str(folder)], capsys)
    assert (rc, out, err) == (0, want["stdout"], "")


# --------------------------------------------------------------------------------------------
# MMMU oracle
# --------------------------------------------------------------------------------------------

def test_mmmu_oracle_eval_only(oracles_dir, capsys):
    root = oracles_dir / "mmmu"
    want = json.loads((root / "expected.json").read_text())["eval_only"]["llava1.5_13b/total_val_output.json"]
    predictions, answers = root / "example_outputs/llava1.5_13b/total_val_output.json", root / "answer_dict_val.json"
    result = score_mmmu_eval_only(predictions, answers)
    strict = result["strict"]
    assert (strict["correct"], strict["total"]) == (want["overall_correct"], want["overall_num"])
    assert strict["acc_official"] == want["overall_acc_full_precision"]
    for subject, w in want["per_subject_full_precision"].items():
        got = strict["subjects"][subject]
        assert (got["acc"], got["total"], got["correct"]) == (w["acc"], w["num_example"], w["correct"])
    for name, w in want["per_discipline_full_precision"].items():
        got = strict["disciplines"][name]
        assert (got["acc"], got["total"], got["correct"]) == (w["acc_full_precision"], w["num"], w["correct"])
    assert result["official_text"] == want["stdout_last_line"] + "\n"
    assert ast.literal_eval(result["official_text"]) == want["printed_results"]

    rc, out, err = run_cli(["score", "mmmu", str(predictions), str(answers), "--mode", "both"], capsys)
    assert rc == 0 and out.startswith(want["stdout_last_line"] + "\n")
    assert "robust: not applicable" in out and "330/900 = 0.36666666666666664" in err


def test_mmmu_oracle_parse_and_eval(oracles_dir, capsys):
    root = oracles_dir / "mmmu"
    want = json.loads((root / "expected.json").read_text())["parse_and_eval"]["llava1.5_13b"]
    folder = root / "example_outputs/llava1.5_13b"
    result = score_mmmu_outputs(folder, "both")
    strict = result["strict"]
    assert strict["correct"] == want["overall_correct"] and strict["acc_official"] == want["overall_acc_full_precision"]
    for subject, w in want["per_subject_result_json"].items():
        got = strict["subjects"][subject]
        assert (got["acc"], got["total"], got["correct"]) == (w["acc"], w["num_example"], w["correct"])
    assert strict["random_fallbacks"] == want["random_fallbacks"]["ids"]
    assert result["official_text"] == want["print_results_table"]
    robust = result["robust"]
    assert robust["total"] == 900 and 0 <= robust["unparseable"] <= 900
    assert f"Unparseable: {robust['unparseable']} of 900\n" in result["text"]

    rc, out, err = run_cli(["score", "mmmu", str(folder)], capsys)
    assert (rc, out) == (0, want["print_results_table"])
    assert "2 multiple-choice responses matched no option" in err


# --------------------------------------------------------------------------------------------
# MathVista oracle
# --------------------------------------------------------------------------------------------

def _score_lines(stdout: str) -> tuple[list[str], set[str]]:
    """The official stdout from "Correct:" to the last group line, and its skills lines as a set."""
    lines = stdout[stdout.index("Correct:"):stdout.index("\nSaving", stdout.index("Correct:"))].split("\n")
    at = lines.index("Type: [skills]")
    return lines[:at + 1], set(lines[at + 1:])


def test_mathvista_oracle_bard(oracles_dir, tmp_path, capsys):
    root = oracles_dir / "mathvista"
    expected = json.loads((root / "expected.json").read_text())
    output, released = root / "results/bard/output_bard.json", (root / "results/bard/scores_bard.json").read_bytes()
    result = score_mathvista_output(output, "strict", tmp_path / "scores.json")
    strict = result["strict"]
    assert (strict["correct"], strict["total"]) == (348, 1000) == (expected["summary"]["correct"],
                                                                   expected["summary"]["total"])
    assert strict["scores"]["average"]["accuracy"] == expected["summary"]["accuracy_released_string"] == "34.8"
    assert strict["accuracy"] == expected["summary"]["accuracy_fraction_head_script"]
    assert strict["scores"] == expected["rerun_first_commit_script"]["scores"]
    for pid, w in expected["per_pid_after_rerun"].items():
        assert strict["per_pid"][pid] == w, pid
    assert (tmp_path / "scores.json").read_bytes() == released  # byte-identical
    # every score line in the official order; skills in set order (PYTHONHASHSEED), so compared as a set
    head, skills = _score_lines(expected["rerun_first_commit_script"]["stdout"])
    assert result["official_text"].startswith("Correct: 348, Total: 1000, Accuracy: 34.8%\n")
    assert _score_lines(result["official_text"] + "\nSaving") == (head, skills)
    assert "[free_form]: 18.48% (85/460)" in head and "[multi_choice]: 48.70% (263/540)" in head
    assert "89" in result["notes"][0] and "729" in result["notes"][0]  # released prediction null, rerun "3"/"0"

    out_file = tmp_path / "cli_scores.json"
    rc, out, err = run_cli(["score", "mathvista", str(output), "--scores-out", str(out_file), "--mode", "both",
                            "--json", str(tmp_path / "r.json")], capsys)
    assert rc == 0 and out.startswith(result["official_text"]) and out_file.read_bytes() == released
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["strict"]["correct"] == 348 and saved["robust"]["unparseable"] > 0
    assert f"Unparseable: {saved['robust']['unparseable']} of 1000\n" in out


# --------------------------------------------------------------------------------------------
# MM-Vet oracle
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llava-v1.5-13b/1runs", "llava-v1.5-13b/3runs"])
def test_mmvet_oracle_grades(oracles_dir, name, capsys):
    root = oracles_dir / "mmvet"
    case = json.loads((root / "expected.json").read_text())["llava_v1.5_graded"][name]
    result = score_mmvet_grades(root / case["grade_file"])
    strict = result["strict"]
    want = case["official_code_rerun_total_std_runs"]
    assert (str(strict["total"]), str(strict["std"]), strict["runs_str"]) == (want["total"], want["std"], want["runs"])
    assert strict["run_totals"] == case["per_run_total_unrounded_helper"]
    assert (strict["model"], strict["judge"], strict["n"]) == ("llava-v1.5-13b", "gpt-4", 218)
    # the printed row is the released CSV's row, restricted to total, std and runs
    header, *rows = list(csv.reader((root / case["released_cap_score_csv"]).open()))
    released = next(dict(zip(header, r, strict=True)) for r in rows if r[0] == "llava-v1.5-13b")
    printed = list(csv.reader(result["official_text"].splitlines()))
    assert printed[0] == ["", "total", "std", "runs"]
    assert printed[1] == ["llava-v1.5-13b", released["total"], released["std"], released["runs"]]

    rc, out, err = run_cli(["score", "mmvet", str(root / case["grade_file"]), "--mode", "robust"], capsys)
    assert rc == 0 and out.startswith("robust: not applicable")
    rc, out, _ = run_cli(["score", "mmvet", str(root / case["grade_file"])], capsys)
    assert (rc, out) == (0, result["official_text"])


# --------------------------------------------------------------------------------------------
# Edge cases on small hand-written files
# --------------------------------------------------------------------------------------------

def test_pope_fewer_answers_than_labels_warns_and_truncates(tmp_path, capsys):
    answers, labels = pope_files(tmp_path, ["Yes", "No", "Yes"], ["yes", "no", "no", "yes", "no"])
    result = score_pope_files(answers, labels)
    assert (result["strict"]["n"], result["strict"]["tp"], result["strict"]["fp"]) == (3, 1, 1)
    assert len(result["warnings"]) == 1
    assert "3 answers but 5 labels" in result["warnings"][0] and "last 2 labels are dropped" in result["warnings"][0]
    rc, out, err = run_cli(["score", "pope", answers, labels], capsys)
    assert rc == 0 and "warning:" in err and "last 2 labels are dropped" in err


def test_pope_more_answers_than_labels_counts_them_in_yes_ratio(tmp_path):
    answers, labels = pope_files(tmp_path, ["Yes", "No", "Yes", "Yes"], ["yes", "no"])
    strict = score_pope_files(answers, labels)["strict"]
    assert (strict["n"], strict["accuracy"], strict["yes_ratio"]) == (2, 1.0, 0.75)  # 3 of 4, as the official
    assert "last 2 answers are dropped" in score_pope_files(answers, labels)["warnings"][0]


def test_pope_no_yes_answer_is_reported_not_a_crash(tmp_path, capsys):
    answers, labels = pope_files(tmp_path, ["No", "No", "not at all"], ["yes", "no", "no"])
    result = score_pope_files(answers, labels)
    strict = result["strict"]
    assert (strict["tp"], strict["fp"], strict["precision"], strict["f1"]) == (0, 0, 0.0, 0.0)
    assert strict["undefined"] == ["precision", "f1"]
    assert "ZeroDivisionError at precision" in result["warnings"][0]
    rc, out, err = run_cli(["score", "pope", answers, labels], capsys)
    assert rc == 0 and "Precision: 0.0" in out and "TP + FP = 0" in err


def test_pope_bad_json_line_is_named(tmp_path, capsys):
    answers = tmp_path / "answers.json"
    answers.write_text('{"answer": "Yes"}\n{"answer": "No"\n')
    labels = write_jsonl(tmp_path / "labels.json", [{"label": "yes"}, {"label": "no"}])
    rc, out, err = run_cli(["score", "pope", str(answers), labels], capsys)
    assert rc == 2 and out == "" and f"{answers}:2: not a JSON object" in err
    answers.write_text('{"answer": "Yes"}\n\n{"question": "Is there a cat?"}\n')
    with pytest.raises(RescoreError, match=r"answers\.json:3: no 'answer' field"):
        score_pope_files(answers, labels)
    answers.write_text('{"answer": "Yes"}\n{"answer": null}\n')
    with pytest.raises(RescoreError, match=r"answers\.json: record 2: 'answer' is None, not a string"):
        score_pope_files(answers, labels)


def test_pope_label_must_be_exactly_yes_or_no(tmp_path):
    answers, labels = pope_files(tmp_path, ["Yes", "No"], ["yes", "No"])
    with pytest.raises(RescoreError, match=r"labels\.json: record 2: label 'No'"):
        score_pope_files(answers, labels)


def test_pope_robust_counts_unparseable(tmp_path, capsys):
    answers, labels = pope_files(tmp_path, ["Yes", "No", "NO", "I am not sure", "Hmm"], ["yes", "no", "no", "yes", "no"])
    result = score_pope_files(answers, labels, "both")
    strict, robust = result["strict"], result["robust"]
    assert (strict["tp"], strict["fp"], strict["tn"], strict["fn"]) == (1, 2, 1, 1)  # official: "NO" and "Hmm" are yes
    assert (robust["unparseable"], robust["tp"], robust["tn"]) == (2, 1, 2)  # "not sure" and "Hmm" say nothing
    rc, out, _ = run_cli(["score", "pope", answers, labels, "--mode", "robust"], capsys)
    assert rc == 0 and out.startswith("--- robust") and out.endswith("Unparseable: 2 of 5\n")


def test_pope_llava_robust_and_unlabelled_category(tmp_path, capsys):
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "Yes"}, {"question_id": 2, "text": "maybe"},
                                                 {"question_id": 3, "text": "No"}])
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "category": "random"},
                                                   {"question_id": 2, "category": "random"},
                                                   {"question_id": 3, "category": "popular"}])
    (tmp_path / "labels").mkdir()
    write_jsonl(tmp_path / "labels/coco_pope_random.json", [{"label": "yes"}, {"label": "no"}])
    result = score_pope_llava(answers, questions, tmp_path / "labels", "both")
    random = result["categories"]["random"]
    assert (random["n_answers"], random["strict"]["fp"], random["robust"]["unparseable"]) == (2, 1, 1)
    assert list(result["categories"]) == ["random"]
    assert "1 answers of categories ['popular'] have no label file" in result["warnings"][0]
    rc, out, err = run_cli(["score", "pope", "--llava", answers, "--questions", questions,
                            "--labels-dir", str(tmp_path / "labels"), "--mode", "robust"], capsys)
    assert rc == 0 and out.startswith("--- robust") and "Category: random, # samples: 2\n" in out
    assert "Unparseable: 1 of 2\n" + RULE in out and "robust mean F1 over 1 categories" in err


def test_pope_llava_unknown_question_id_is_named(tmp_path):
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "Yes"}, {"question_id": 9, "text": "No"}])
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "category": "random"}])
    (tmp_path / "labels").mkdir()
    write_jsonl(tmp_path / "labels/coco_pope_random.json", [{"label": "yes"}])
    with pytest.raises(RescoreError, match=r"a\.jsonl: record 2: question_id 9 is not in .*q\.jsonl"):
        score_pope_llava(answers, questions, tmp_path / "labels")


def test_score_pope_by_position_and_required_keys(tmp_path):
    out = score_pope_by_position(["yes", None, "no", "yes"], ["no", "yes"])
    assert (out["n"], out["fp"], out["unparseable"], out["yes_ratio"]) == (2, 1, 1, 0.5)  # 2 literal yes of 4
    assert (out["n_predictions"], out["n_labels"], out["undefined"]) == (4, 2, ["f1"])  # TP = 0: p = r = 0
    assert score_pope_by_position([], [])["undefined"] == ["yes_ratio", "precision", "recall", "f1", "accuracy"]
    path = write_jsonl(tmp_path / "x.json", [{"a": 1}, [1, 2]])
    assert read_pope_jsonl(path) == [{"a": 1}, [1, 2]]  # unchanged without `required`
    with pytest.raises(ValueError, match=r"x\.json:2: expected a JSON object"):
        read_pope_jsonl(path, ("a",))


def _mme_dir(tmp_path, lines: str):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "existence.txt").write_text(lines)
    return folder


def test_mme_tab_in_a_response_scores_and_warns_there(tmp_path, capsys):
    folder = _mme_dir(tmp_path, "a.jpg\tIs there a cat?\tYes\tYes\tbecause I see one\na.jpg\tA dog?\tNo\tNo\n")
    with pytest.raises(ValueError, match="got 5"):
        read_mme_file(folder / "existence.txt")  # the strict reader still refuses by default
    result = score_mme_results(folder)
    task = result["strict"]["tasks"]["existence"]
    assert (task["acc"], task["acc_plus"], task["score"]) == (1.0, 1.0, 200.0)
    tab = [w for w in result["warnings"] if "holds a tab" in w]
    assert len(tab) == 1 and tab[0].startswith(f"{folder / 'existence.txt'}:1:")
    assert any("no count.txt" in w for w in result["warnings"])  # 13 official files missing
    assert score_mme_dir(folder, allow_tabs=True)["tab_lines"] == {str(folder / "existence.txt"): [1]}
    rc, out, err = run_cli(["score", "mme", str(folder)], capsys)
    assert rc == 0 and "\t existence  score: 200.0\n" in out and "existence.txt:1: the response holds a tab" in err
    assert "Cognition" not in out


def test_mme_bad_lines_are_named(tmp_path, capsys):
    folder = _mme_dir(tmp_path, "a.jpg\tQ?\tYes\tYes\na.jpg\tQ?\tMaybe\tNo\n")
    rc, _, err = run_cli(["score", "mme", str(folder)], capsys)
    assert rc == 2 and "existence.txt:2: ground truth must be Yes or No" in err
    (folder / "existence.txt").write_text("a.jpg\tQ?\tYes\tYes\n")
    with pytest.raises(RescoreError, match=r"existence\.txt: 1 lines; MME lines come in pairs"):
        score_mme_results(folder)


def test_mme_robust_counts_unparseable(tmp_path):
    folder = _mme_dir(tmp_path, "a.jpg\tQ?\tYes\tYesterday\na.jpg\tQ?\tNo\t**No**\nb.jpg\tQ?\tYes\tThe answer is yes\n"
                                "b.jpg\tQ?\tNo\tNot sure\n")
    result = score_mme_results(folder, "both")
    strict, robust = result["strict"]["tasks"]["existence"], result["robust"]["tasks"]["existence"]
    # official: "yest", "**no" and "not " decide by their first 4 characters; "The answer is yes" is other
    assert (strict["other_num"], strict["acc"]) == (1, 0.75)
    # robust: "Yesterday" and "Not sure" say nothing; "**No**" and "The answer is yes" do
    assert (robust["other_num"], robust["acc"]) == (2, 0.5) and result["robust"]["unparseable"] == 2
    assert result["text"].endswith("Unparseable: 2 of 4\n")


def _mmmu_outputs(tmp_path):
    art = tmp_path / "out" / "Art"
    art.mkdir(parents=True)
    choices = {"all_choices": ["A", "B"], "index2ans": {"A": "a red apple", "B": "a blue car"}}
    art.joinpath("output.json").write_text(json.dumps([
        {"id": "validation_Art_1", "question_type": "multiple-choice", "answer": "B", "response": "(B)", **choices},
        {"id": "validation_Art_2", "question_type": "multiple-choice", "answer": "A", "response": "hmm", **choices},
        {"id": "validation_Art_3", "question_type": "short-answer", "answer": "3", "response": "The answer is 3."},
    ]))
    return tmp_path / "out"


def test_mmmu_outputs_robust_counts_and_table(tmp_path):
    result = score_mmmu_outputs(_mmmu_outputs(tmp_path), "both")
    assert result["strict"]["random_fallbacks"] == ["validation_Art_2"]  # the official guesses a letter
    assert (result["robust"]["unparseable"], result["robust"]["correct"]) == (1, 2)  # lmmkit never guesses
    # an empty discipline prints the official's int 0, aligned on the decimal point of Art's 0.667
    business = next(line for line in result["robust_text"].splitlines() if "Overall-Business" in line)
    assert business.endswith("|          0 | 0     |") and "| Art  " in result["robust_text"]
    assert any("no output for 29 subjects" in w for w in result["warnings"])


def test_mmmu_table_aligns_like_tabulate():
    subjects = {"Art": {"correct": 3, "total": 3, "acc": 1.0}, "Music": {"correct": 1, "total": 2, "acc": 0.5}}
    result = {"subjects": subjects, "acc_official": 0.8,
              "disciplines": {"Art and Design": {"correct": 4, "total": 5, "acc": 0.8}}}
    lines = mmmu_table(result).splitlines()
    pad = " " * 30  # the subject column is as wide as "Overall-Humanities and Social Science" (37)
    assert lines[0] == f"| Subject{pad} |   Data Num |   Acc |"
    assert lines[1] == "|" + "-" * 39 + "+------------+-------|"
    assert lines[2] == "| Overall-Art and Design                |          5 |   0.8 |"
    assert lines[3] == "| Art                                   |          3 |   1   |"  # "g" drops ".0"; decimal-aligned
    assert lines[4] == "| Music                                 |          2 |   0.5 |"
    assert lines[5] == "| Overall-Business                      |          0 |   0   |"
    assert lines[-1] == "| Overall                               |          5 |   0.8 |"
    assert len(lines) == 2 + 9


def test_mmmu_bad_records_are_named(tmp_path, capsys):
    out = _mmmu_outputs(tmp_path)
    records = json.loads((out / "Art/output.json").read_text())
    del records[1]["response"]
    (out / "Art/output.json").write_text(json.dumps(records))
    rc, _, err = run_cli(["score", "mmmu", str(out)], capsys)
    assert rc == 2 and "Art/output.json: record 2 (id 'validation_Art_2'): no 'response' field" in err
    preds, answers = tmp_path / "p.json", tmp_path / "a.json"
    preds.write_text('{"validation_Art_1": "A",}')
    answers.write_text("{}")
    rc, _, err = run_cli(["score", "mmmu", str(preds), str(answers)], capsys)
    assert rc == 2 and f"{preds}: not valid JSON" in err and "line 1 column" in err


def test_mathvista_robust_counts_unparseable(tmp_path):
    base = {"question_type": "free_form", "answer_type": "integer", "precision": None, "choices": None,
            "metadata": {"language": "english", "skills": ["arithmetic reasoning"]}}
    problems = {
        "1": {**base, "answer": "3", "extraction": "3", "response": "There are 3 cubes."},
        "2": {**base, "answer": "5", "extraction": "5", "response": "I cannot tell."},
    }
    path = tmp_path / "output.json"
    path.write_text(json.dumps(problems))
    result = score_mathvista_output(path, "both")
    assert (result["strict"]["correct"], result["robust"]["correct"], result["robust"]["unparseable"]) == (2, 1, 1)
    assert "[english]: 100.00% (2/2)\n" in result["official_text"]
    assert group_order(problems, "skills") == ["arithmetic reasoning"]
    del problems["2"]["extraction"]
    path.write_text(json.dumps(problems))
    with pytest.raises(RescoreError, match=r"output\.json: pid '2': no 'extraction' field"):
        score_mathvista_output(path)
    assert score_mathvista_output(path, "robust")["robust"]["unparseable"] == 1  # robust reads only responses


def test_mmvet_grade_file_errors_and_capabilities(tmp_path, capsys):
    grades = tmp_path / "m_gpt-4-grade-2runs.json"
    grades.write_text(json.dumps({"v1_0": {"score": [1.0, 0.5]}, "v1_1": {"score": [0.0, 0.5]}}))
    meta = tmp_path / "mm-vet.json"
    meta.write_text(json.dumps({"v1_0": {"capability": ["rec"]}, "v1_1": {"capability": ["rec", "ocr"]}}))
    result = score_mmvet_grades(grades, mmvet_json=meta)
    assert (result["strict"]["total"], result["strict"]["std"], result["strict"]["runs"]) == (50.0, 0.0, [50.0, 50.0])
    assert result["official_text"] == ',rec,ocr,total,std,runs\nm,50.0,25.0,50.0,0.0,"[50.0, 50.0]"\n'
    grades.write_text('{"v1_0": {"score": [1.0]}, "v1_1": {"score": [1.0, 0.5]}}')
    rc, _, err = run_cli(["score", "mmvet", str(grades)], capsys)
    assert rc == 2 and "m_gpt-4-grade-2runs.json: id 'v1_1' has 2 scores" in err


def test_cli_usage_errors(tmp_path, capsys):
    assert run_cli(["score", "pope", "only-one.json"], capsys)[0] == 2
    rc, _, err = run_cli(["score", "pope", "--llava", "a.jsonl"], capsys)
    assert rc == 2 and "--questions and --labels-dir" in err
    rc, _, err = run_cli(["score", "mme", str(tmp_path / "missing")], capsys)
    assert rc == 2 and "missing: not a folder of MME" in err
    rc, _, err = run_cli(["score", "mathvista", str(tmp_path / "none.json")], capsys)
    assert rc == 2 and "none.json: cannot read" in err
