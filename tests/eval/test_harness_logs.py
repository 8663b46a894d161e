"""Rescoring lmms-eval --log_samples files and VLMEvalKit prediction files with the official rules.

Every file is small and hand-written here, in the harness's own format; every expected number is worked
out by hand in the comments (official rule -> parsed answer -> verdict -> metric).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

import pytest

from lmmkit.eval.harness_cli import add_log_options, run_log_command
from lmmkit.eval.harness_diff import diff_scorings, results_view, scoring_view
from lmmkit.eval.harness_lmms_eval import mmmu_harness_verdict
from lmmkit.eval.harness_logs import HarnessLogError, detect_harness, read_log, rescore_log
from lmmkit.eval.harness_readers import detect_vlmevalkit_task, read_table


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_table(path, rows, delimiter="\t") -> str:
    header = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, header, delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return str(path)


def lmms_sample(doc_id, response, target, metrics, **extra) -> dict:
    """A sample as lmms-eval's evaluation tracker writes it (doc and arguments dropped, resps folded)."""
    return {"doc_id": doc_id, "target": target, "filtered_resps": [response], "doc_hash": "h",
            "prompt_hash": "p", "target_hash": "t", **extra, **metrics}


def by_id(result) -> dict:
    return {item["id"]: item for item in result["items"]}


# --------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------

# (question_id, label, response): lmms-eval's verdict is lower().strip() == label; the official evaluate.py
# keeps the text before the first ".", drops commas, and says no iff a word is exactly No / not / no.
POPE_LMMS = [("1", "yes", "Yes"),              # official yes (right); lmms-eval "yes" (right)
             ("2", "yes", "Yes."),             # official yes (right); lmms-eval "yes." != "yes" (wrong)
             ("3", "no", "No"),                # no / "no": both right
             ("4", "no", "There is no dog."),  # official no (right); lmms-eval the whole sentence (wrong)
             ("5", "no", "yes"),               # both wrong
             ("6", "yes", "NO")]               # official: "NO" is no negation -> yes (right); lmms-eval wrong


def pope_lmms_file(tmp_path, rows=POPE_LMMS, name="2024-06-01T00-00-00_samples_pope.jsonl") -> str:
    samples = []
    for k, (qid, label, resp) in enumerate(rows):
        pred = resp.lower().strip()
        m = {"question_id": qid, "score": float(pred == label), "prediction": pred, "ground_truth": label}
        samples.append(lmms_sample(k, resp, label.capitalize(), {f"pope_{x}": m for x in
                                   ("accuracy", "precision", "recall", "f1_score", "yes_ratio")}))
    return write_jsonl(tmp_path / name, samples)


def test_pope_lmms_eval_records_and_official_numbers(tmp_path):
    path = pope_lmms_file(tmp_path)
    harness, task, records = read_log(path)
    assert (harness, task) == ("lmms-eval", "pope")
    assert [r["id"] for r in records] == ["1", "2", "3", "4", "5", "6"]
    assert records[1]["response"] == "Yes." and records[1]["answer"] == "yes"
    assert records[1]["harness_score"] == 0.0 and records[1]["harness_parsed"] == "yes."
    assert records[1]["harness_method"] == "exact"

    result = rescore_log(path)
    s = result["strict"]["overall"]
    # official: yes yes no no yes yes vs labels yes yes no no no yes: TP 3 (1,2,6), FP 1 (5), TN 2, FN 0
    assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (3, 1, 2, 0)
    assert s["accuracy"] == pytest.approx(5 / 6)
    assert s["precision"] == pytest.approx(3 / 4) and s["recall"] == 1.0
    assert s["f1"] == pytest.approx(6 / 7) and s["yes_ratio"] == pytest.approx(4 / 6)
    # robust reads "NO" as no: TP 2, FP 1, TN 2, FN 1
    assert result["robust"]["overall"]["accuracy"] == pytest.approx(4 / 6)
    # lmms-eval's own: accuracy 2/6; precision and recall only count answers that are exactly yes/no:
    # TP 1 (1), FP 1 (5), FN 1 (6) -> P = R = F1 = 0.5; its yes ratio is the share of yes *labels*, 3/6
    own = result["harness_own"]
    assert own["accuracy"] == pytest.approx(2 / 6)
    assert (own["precision"], own["recall"], own["f1"], own["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5)
    assert result["disagreements"]["n"] == 3
    assert result["disagreements"]["strict_vs_harness"]["exact match"] == 3


def test_pope_diff_strict_vs_harness_says_exact_match(tmp_path):
    result = rescore_log(pope_lmms_file(tmp_path))
    diffs = diff_scorings(scoring_view(result, "strict"), scoring_view(result, "harness"))
    assert [d["id"] for d in diffs] == ["2", "4", "6"]
    assert {d["reason"] for d in diffs} == {"exact match"}
    d = diffs[0]
    assert (d["verdict_a"], d["verdict_b"], d["parsed_a"], d["parsed_b"]) == (True, False, "yes", "yes.")
    assert d["response_a"] == d["response_b"] == "Yes."


def test_pope_lmms_eval_old_json_with_doc_scores_per_split(tmp_path):
    # the older lmms-eval layout: <task>.json with "logs", each sample keeping its doc (with the category)
    rows = [("1", "yes", "Yes", "random"), ("2", "no", "No", "random"),
            ("3", "yes", "No", "adversarial"), ("4", "no", "No", "adversarial")]
    logs = []
    for k, (qid, label, resp, cat) in enumerate(rows):
        m = {"question_id": qid, "score": float(resp.lower() == label), "prediction": resp.lower(),
             "ground_truth": label}
        logs.append({"doc_id": k, "doc": {"question_id": qid, "question": "Is there a dog in the image?",
                                          "answer": label, "category": cat},
                     "target": label, "arguments": [], "resps": [[resp]], "filtered_resps": [resp],
                     "pope_accuracy": m})
    path = tmp_path / "pope.json"
    path.write_text(json.dumps({"args": {}, "model_configs": {}, "logs": logs}))
    result = rescore_log(path)
    splits = result["strict"]["splits"]
    assert list(splits) == ["random", "adversarial"]
    assert splits["random"]["f1"] == 1.0          # TP 1, TN 1
    assert splits["adversarial"]["f1"] == 0.0     # FN 1, TN 1: no yes answer, P = R = 0
    assert result["strict"]["mean_f1"] == 0.5
    assert read_log(path)[2][0]["question"] == "Is there a dog in the image?"


# index, answer, category, prediction, extracted (VLMEvalKit's rule, its judge when that says Unknown), score
POPE_VLM = [
    (1, "Yes", "random", "Yes, there is a dog.", "Yes", True),    # official yes: right
    (2, "No", "popular,adversarial", "No", "No", True),          # official no: right (in two splits)
    (3, "Yes", "random", "I cannot see any", "Unknown", False),  # official: no negation word -> yes: right
    (4, "No", "adversarial", "Not at all.", "No", True),         # official: "Not" is not "not" -> yes: wrong
]


def test_pope_vlmevalkit_auxmatch_tsv(tmp_path):
    path = write_table(tmp_path / "llava_POPE_auxmatch.tsv", [
        {"index": i, "question": "Is there a dog in the image?", "answer": a, "category": c,
         "image_path": f"{i}.jpg", "prediction": p, "extracted": e, "score": s}
        for i, a, c, p, e, s in POPE_VLM])
    harness, task, records = read_log(path)
    assert (harness, task) == ("vlmevalkit", "pope")
    assert records[1]["meta"]["categories"] == ["popular", "adversarial"]
    assert [r["harness_score"] for r in records] == [1.0, 1.0, 0.0, 1.0]

    result = rescore_log(path)
    # official: yes no yes yes vs yes no yes no: TP 2, TN 1, FP 1
    o = result["strict"]["overall"]
    assert (o["tp"], o["tn"], o["fp"], o["fn"]) == (2, 1, 1, 0) and o["f1"] == pytest.approx(0.8)
    # per split: random {1, 3} all right (F1 1); popular {2}: TN only (F1 0); adversarial {2, 4}: TN, FP
    assert {c: s["f1"] for c, s in result["strict"]["splits"].items()} == {"random": 1.0, "popular": 0.0,
                                                                           "adversarial": 0.0}
    assert result["strict"]["mean_f1"] == pytest.approx(1 / 3)
    # VLMEvalKit's own: rows exploded by split (1, 2, 2, 3, 4); "Unknown" is not Yes: TP 1, FN 1, FP 0
    own = result["harness_own"]
    assert own["overall"]["f1"] == pytest.approx(2 / 3) and own["overall"]["accuracy"] == pytest.approx(4 / 5)
    assert own["splits"]["random"]["f1"] == pytest.approx(2 / 3)
    assert own["splits"]["random"]["accuracy"] == 0.5
    # items 3 and 4: same response, different parse -> "parsing"
    diffs = diff_scorings(scoring_view(result, "strict"), scoring_view(result, "harness"))
    assert [(d["id"], d["reason"], d["parsed_a"], d["parsed_b"]) for d in diffs] == [
        ("3", "parsing", "yes", "Unknown"), ("4", "parsing", "yes", "No")]


# --------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------

# (image, category, answer, response, lmms-eval score). lmms-eval's parse_pred_ans drops "." and reads a lone
# "n" as no; the official calculation.py reads "n\n" as "other".
MME_LMMS = [("existence/1.png", "existence", "Yes", "Yes", 1.0),
            ("existence/1.png", "existence", "No", "No", 1.0),
            ("existence/2.png", "existence", "Yes", "Yes, it is.", 1.0),
            ("existence/2.png", "existence", "No", "N", 1.0),
            ("code_reasoning/1.png", "code_reasoning", "Yes", "yes", 1.0),
            ("code_reasoning/1.png", "code_reasoning", "No", "Yes", 0.0)]


def test_mme_lmms_eval(tmp_path):
    samples = []
    for k, (img, cat, ans, resp, score) in enumerate(MME_LMMS):
        key = "mme_cognition_score" if cat == "code_reasoning" else "mme_percetion_score"
        m = {"question_id": img, "category": cat, "score": score}
        samples.append(lmms_sample(k, resp, ans, {key: m}))
    path = write_jsonl(tmp_path / "2024_samples_mme.jsonl", samples)
    records = read_log(path)[2]
    assert [r["id"] for r in records[:4]] == ["existence/1.png#1", "existence/1.png#2", "existence/2.png#1",
                                              "existence/2.png#2"]
    result = rescore_log(path)
    # official existence: 3 of 4 right ("N" -> other), 1 of 2 images both right: 75 + 50 = 125;
    # code_reasoning: 1 of 2, no image both right: 50
    assert result["strict"]["perception_total"] == 125.0 and result["strict"]["cognition_total"] == 50.0
    assert result["unparseable"]["strict"] == 1
    # lmms-eval's own: existence all right (200), code_reasoning 50
    own = result["harness_own"]
    assert own["perception_total"] == 200.0 and own["cognition_total"] == 50.0
    diffs = diff_scorings(scoring_view(result, "strict"), scoring_view(result, "harness"))
    assert [(d["id"], d["reason"], d["parsed_a"]) for d in diffs] == [
        ("existence/2.png#2", "parsing", "other")]


def test_mme_vlmevalkit_pairs_by_image_and_drops_a_lone_question(tmp_path):
    # (index, image, answer, prediction, extracted): VLMEvalKit's yes/no word rule, its judge when that
    # says Unknown; score = answer == extracted
    rows = [(1, "a.jpg", "Yes", "Yes", "Yes"), (2, "a.jpg", "No", "no", "No"),
            (3, "b.jpg", "Yes", "Yes", "Yes"),
            # the official reads "i do" (first 4 characters): neither yes nor no -> other; the judge: No
            (4, "b.jpg", "No", "I don't think so", "No"),
            (5, "c.jpg", "Yes", "Yes", "Yes")]
    path = write_table(tmp_path / "model_MME.tsv", [
        {"index": i, "image_path": img, "question": "Is it red?", "answer": a, "category": "OCR",
         "prediction": p, "extracted": e, "score": a == e} for i, img, a, p, e in rows])
    result = rescore_log(path)
    assert any("c.jpg" in w for w in result["warnings"])  # c.jpg has one question: left out of every score
    # official OCR: a both right, b one right: acc 3/4, acc+ 1/2 -> 125; VLMEvalKit's: all right -> 200
    assert result["strict"]["tasks"]["OCR"]["score"] == 125.0
    assert result["harness_own"]["perception_total"] == 200.0
    assert by_id(result)["5"]["strict"]["correct"] is None
    diffs = diff_scorings(scoring_view(result, "strict"), scoring_view(result, "harness"))
    assert [(d["id"], d["reason"]) for d in diffs] == [("4", "parsing")]


# --------------------------------------------------------------------------------------------
# MMMU
# --------------------------------------------------------------------------------------------

ANIMALS = ["cat", "dog", "bird", "fish"]
OPTION_LINES = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(ANIMALS))
MC_PROMPT = (f"<image 1> Which animal is shown?\n{OPTION_LINES}\n\n"
             "Answer with the option's letter from the given choices directly.")
OPEN_PROMPT = "<image 1> How many?\n\nAnswer the question using a single word or phrase."


def mmmu_lmms_file(tmp_path) -> str:
    # lmms-eval's current mmmu_acc (parsed_pred is a list: its pass@k form); doc dropped, options in "input"
    items = [("validation_Art_1", "multiple-choice", "B", "(B) dog", ["B"]),
             # official: no letter, 5 words (not > 5) -> the seed-42 random letter, "A" (wrong);
             # lmms-eval recorded its own (unseeded) random pick "C" (right)
             ("validation_Art_2", "multiple-choice", "C", "I think it's the bird", ["C"]),
             # the gold is a list's repr: official gold ["6", "6.0"] -> 6.0 matches (right); lmms-eval
             # compares with the repr string itself (wrong)
             ("validation_Art_3", "open", "['6', '6.0']", "6", [[6.0]]),
             ("validation_Art_4", "open", "blue", "It is blue.", [["blue"]])]
    samples = []
    for k, (iid, qtype, ans, resp, parsed) in enumerate(items):
        m = {"id": iid, "subdomain": "Art", "question_type": qtype, "answer": ans, "parsed_pred": parsed}
        prompt = MC_PROMPT if qtype == "multiple-choice" else OPEN_PROMPT
        samples.append(lmms_sample(k, resp, ans, {"mmmu_acc": m, "mmmu_acc_pass_at_k": m}, input=prompt))
    return write_jsonl(tmp_path / "20240601_samples_mmmu_val.jsonl", samples)


def test_mmmu_lmms_eval(tmp_path):
    path = mmmu_lmms_file(tmp_path)
    records = read_log(path)[2]
    # doc was dropped: the options come from the logged prompt
    assert records[0]["meta"]["index2ans"] == dict(zip("ABCD", ANIMALS, strict=True))
    assert records[2]["answer"] == ["6", "6.0"] and records[2]["meta"]["all_choices"] == []
    assert [r["harness_score"] for r in records] == [1.0, 1.0, 0.0, 1.0]

    result = rescore_log(path)
    items = by_id(result)
    assert items["validation_Art_2"]["strict"] == {"parsed": "A", "correct": False, "judge": None,
                                                   "method": "parse", "random_letter": True}
    assert result["strict"]["correct"] == 3 and result["strict"]["acc_official"] == 0.75
    assert result["robust"]["correct"] == 4  # "(B)", the option text "bird", 6.0, "blue"
    assert result["harness_own"]["acc"] == 0.75
    diffs = diff_scorings(scoring_view(result, "strict"), scoring_view(result, "harness"))
    assert [(d["id"], d["reason"]) for d in diffs] == [("validation_Art_2", "parsing"),
                                                        ("validation_Art_3", "exact match")]
    assert diffs[1]["parsed_a"] == diffs[1]["parsed_b"] == [6.0]  # one pass of the pass@k list


def test_mmmu_harness_verdict_forms():
    # the older scalar parsed_pred and the pass@k list, multiple choice and open
    assert mmmu_harness_verdict("multiple-choice", "B", "B") == 1.0
    assert mmmu_harness_verdict("multiple-choice", "B", ["A", "B"]) == 1.0
    assert mmmu_harness_verdict("open", "blue", ["light blue"]) == 1.0
    assert mmmu_harness_verdict("open", "blue", [["red"], ["navy blue"]]) == 1.0
    assert mmmu_harness_verdict("open", "['6', '6.0']", [6.0]) == 0.0


def test_mmmu_vlmevalkit_csv_scores_validation_only(tmp_path):
    opts = dict(zip("ABCD", ANIMALS, strict=True))
    rows = [
        {"index": 1, "split": "validation", **opts, "answer": "C", "prediction": "C", "hit": 1, "log": "C"},
        # more than 5 words: the official reads the option text "cat"; VLMEvalKit asked its judge
        {"index": 2, "split": "validation", **opts, "answer": "A",
         "prediction": "I believe the first option, cat, is correct", "hit": 1, "log": "A"},
        # an open question: the official finds 42 after "is "; VLMEvalKit turned it into A = 42 / B = Other
        # Answers and its judge chose B
        {"index": 3, "split": "validation", "A": "42", "B": "Other Answers", "answer": "42",
         "prediction": "The result is 42 meters", "hit": 0, "log": "B"},
        {"index": 4, "split": "dev", **opts, "answer": "D", "prediction": "D", "hit": 1, "log": "D"},
    ]
    rows = [{**r, "question": "Which animal?", "category": "Art Theory", "l2-category": "Art & Design"}
            for r in rows]
    path = write_table(tmp_path / "model_MMMU_DEV_VAL_gpt-4o_result.csv", rows, delimiter=",")
    records = read_log(path)[2]
    assert records[2]["meta"]["question_type"] == "open" and records[2]["meta"]["subject"] == "Art_Theory"
    assert records[1]["harness_method"] == "judge" and records[0]["harness_method"] == "parse"

    result = rescore_log(path)
    assert any("validation" in n for n in result["notes"])
    assert (result["strict"]["correct"], result["strict"]["total"]) == (3, 3)
    own = result["harness_own"]
    assert own["acc"] == pytest.approx(2 / 3)
    assert own["by_split"] == {"validation": pytest.approx(2 / 3), "dev": 1.0}
    diffs = diff_scorings(scoring_view(result, "strict"), scoring_view(result, "harness"))
    assert [(d["id"], d["reason"]) for d in diffs] == [("3", "judge")]


# --------------------------------------------------------------------------------------------
# MathVista
# --------------------------------------------------------------------------------------------

def mathvista_lmms_file(tmp_path) -> str:
    # (pid, question_type, answer_type, choices, precision, answer, response, lmms-eval's extraction and
    # prediction)
    rows = [("1", "multi_choice", "text", ["3", "5", "7"], None, "5", "B", "B", "5"),  # rules cannot: LLM "B"
            ("2", "free_form", "integer", None, None, "3", "3", "3", "3"),              # int() rule
            ("3", "free_form", "float", None, 1, "1.5", "The answer is 1.50", "1.50", "1.5"),  # LLM
            # the official's quoted-answer rule reads 7; lmms-eval (quick_extract: false) asked its LLM: 8
            ("4", "free_form", "integer", None, None, "7", 'The answer is "7".', "8", "8"),
            ("5", "free_form", "integer", None, None, "2", "2.9", "2.9", "2")]  # LLM; int(float) truncates
    samples = []
    for k, (pid, qt, at, ch, prec, ans, resp, ext, pred) in enumerate(rows):
        m = {"question_id": pid, "query": "Q", "choices": ch, "answer": ans, "extraction": ext,
             "prediction": pred, "true_false": pred == ans, "question_type": qt, "answer_type": at,
             "precision": prec,
             "metadata": {"category": "math-targeted-vqa", "task": "figure question answering"}}
        samples.append(lmms_sample(k, resp, ans, {"llm_as_judge_eval": m, "submission": m}))
    return write_jsonl(tmp_path / "x_samples_mathvista_testmini.jsonl", samples)


def test_mathvista_lmms_eval(tmp_path):
    path = mathvista_lmms_file(tmp_path)
    records = read_log(path)[2]
    assert [r["harness_method"] for r in records] == ["judge", "parse", "judge", "judge", "judge"]
    result = rescore_log(path)
    # strict: rules for 2 and 4; lmms-eval's recorded extraction for 1, 3, 5 -> all five right
    assert (result["strict"]["correct"], result["strict"]["total"]) == (5, 5)
    assert result["strict"]["judge_extractions"] == 3
    assert result["robust"]["correct"] == 5
    assert result["harness_own"]["accuracy_pct"] == 80.0
    items = by_id(result)
    assert items["5"]["strict"]["parsed"] == "2" and items["5"]["strict"]["extraction"] == "2.9"
    diffs = diff_scorings(scoring_view(result, "strict"), scoring_view(result, "harness"))
    assert [(d["id"], d["reason"], d["parsed_a"], d["parsed_b"]) for d in diffs] == [("4", "judge", "7", "8")]


def test_mathvista_vlmevalkit_tsv(tmp_path):
    base = {"question": "Q", "task": "figure question answering", "skills": "['arithmetic reasoning']"}
    rows = [
        {"index": 1, "question_type": "multi_choice", "answer_type": "text", "choices": "['3', '5', '7']",
         "answer": "5", "answer_option": "B", "prediction": "B", "res": "B", "log": "Prefetch succeed"},
        {"index": 2, "question_type": "free_form", "answer_type": "integer", "answer": "3", "prediction": "3",
         "res": "3", "log": "Prefetch succeed"},
        # no precision column: inferred from the answer's decimals (1)
        {"index": 3, "question_type": "free_form", "answer_type": "float", "answer": "1.5",
         "prediction": "about 1.5", "res": "1.5", "log": "Succeed"},
        {"index": 4, "question_type": "free_form", "answer_type": "list", "answer": "[1, 2]",
         "prediction": "[1, 2]", "res": "[1, 2]", "log": "Succeed"},
    ]
    path = write_table(tmp_path / "model_MathVista_MINI_gpt-4-turbo.tsv", [{**base, **r} for r in rows])
    records = read_log(path)[2]
    assert records[2]["meta"]["problem"]["precision"] == 1
    assert records[0]["meta"]["problem"]["metadata"]["skills"] == ["arithmetic reasoning"]
    result = rescore_log(path)
    assert (result["strict"]["correct"], result["strict"]["total"]) == (4, 4)
    assert result["strict"]["groups"]["skills"]["arithmetic reasoning"]["total"] == 4
    assert result["harness_own"] is None and any("MathVista_acc" in n for n in result["notes"])


# --------------------------------------------------------------------------------------------
# Files, detection, errors
# --------------------------------------------------------------------------------------------

def test_xlsx_needs_openpyxl(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # import fails as if not installed
    with pytest.raises(HarnessLogError, match="openpyxl"):
        read_table(tmp_path / "m_POPE.xlsx")


def test_xlsx_when_openpyxl_is_installed(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["index", "question", "answer", "category", "prediction"])
    sheet.append([1, "Is there a cat?", "Yes", "random", "Yes"])
    sheet.append([2, "Is there a dog?", "No", "random", "No"])
    book.save(tmp_path / "m_POPE.xlsx")
    result = rescore_log(tmp_path / "m_POPE.xlsx")
    assert result["strict"]["overall"]["accuracy"] == 1.0 and result["harness_own"] is None


def test_detection_and_errors(tmp_path):
    assert detect_vlmevalkit_task("llava_v1.5_7b_MMMU_DEV_VAL_gpt-4o_result.xlsx") == "mmmu"
    assert detect_vlmevalkit_task("llava_MME_auxmatch.xlsx") == "mme"
    assert detect_vlmevalkit_task("m_MathVista_MINI.tsv") == "mathvista"
    assert detect_harness(pope_lmms_file(tmp_path)) == "lmms-eval"
    with pytest.raises(HarnessLogError, match="cannot tell the dataset"):
        read_log(write_table(tmp_path / "preds.tsv", [{"index": 1, "answer": "Yes", "prediction": "Yes"}]))
    with pytest.raises(HarnessLogError, match="prediction column"):
        read_log(write_table(tmp_path / "m_POPE.tsv", [{"index": 1, "answer": "Yes"}]))
    bad = write_jsonl(tmp_path / "x_samples_pope.jsonl", [lmms_sample(0, "Yes", "Maybe", {})])
    with pytest.raises(HarnessLogError, match="sample 1"):
        read_log(bad)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def score_parser() -> argparse.ArgumentParser:
    """The real `lmmkit` command line (`lmmkit score TASK ...`)."""
    from lmmkit.cli import build_parser

    parser = build_parser()
    real_parse = parser.parse_args
    parser.parse_args = lambda argv: real_parse(["score", *argv])  # tests give what follows `lmmkit score`
    return parser


def test_cli_rescore_with_json(tmp_path, capsys):
    path, out = pope_lmms_file(tmp_path), tmp_path / "out.json"
    args = score_parser().parse_args(["pope", "--from", "lmms-eval", path, "--json", str(out)])
    assert args.func(args) == 0  # dispatched by `lmmkit score` itself
    text = capsys.readouterr().out
    assert "strict (official rules):  accuracy 0.8333" in text
    assert "strict and lmms-eval disagree: 3 (response 0, judge 0, exact match 3, parsing 0)" in text
    saved = json.loads(out.read_text())
    assert saved["harness_own"]["accuracy"] == pytest.approx(2 / 6) and len(saved["items"]) == 6


def test_cli_errors(tmp_path, capsys):
    args = score_parser().parse_args(["pope", "--from", "vlmevalkit", str(tmp_path / "missing_POPE.tsv")])
    assert run_log_command(args) == 2
    assert "cannot read" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    add_log_options(parser)
    assert run_log_command(parser.parse_args([])) == 2


def test_cli_diff_two_runs_and_one_file_two_scorings(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="lmmkit score")
    add_log_options(parser)
    a = pope_lmms_file(tmp_path, name="a_samples_pope.jsonl")
    rows = [(q, label, "No" if q == "1" else resp) for q, label, resp in POPE_LMMS]  # run B says No to 1
    b = pope_lmms_file(tmp_path, rows, name="b_samples_pope.jsonl")
    out = tmp_path / "diff.json"
    assert run_log_command(parser.parse_args(["--diff", a, b, "--json", str(out)])) == 0
    text = capsys.readouterr().out
    assert "disagreements: 1 (response 1, judge 0, exact match 0, parsing 0)" in text
    saved = json.loads(out.read_text())
    assert saved["disagreements"][0]["id"] == "1" and saved["disagreements"][0]["response_b"] == "No"

    argv = ["--diff", a, a, "--a-scoring", "strict", "--b-scoring", "harness"]
    assert run_log_command(parser.parse_args(argv)) == 0
    assert "disagreements: 3 (response 0, judge 0, exact match 3, parsing 0)" in capsys.readouterr().out


def test_cli_diff_against_lmmkit_results_json(tmp_path, capsys):
    # an `lmmkit eval` results.json: its items carry the strict parse and verdict
    items = [{"id": "validation_Art_1", "response": "(B) dog", "answer": "B", "strict": "B", "robust": "B",
              "correct_strict": True, "correct_robust": True},
             {"id": "validation_Art_3", "response": "6", "answer": ["6", "6.0"], "strict": [6.0],
              "robust": [6.0], "correct_strict": True, "correct_robust": True}]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"model": "m", "tasks": {"mmmu": {"items": items}}}))
    assert results_view(results)[0] == "mmmu"
    parser = argparse.ArgumentParser()
    add_log_options(parser)
    assert run_log_command(parser.parse_args(["--diff", str(results), mmmu_lmms_file(tmp_path)])) == 0
    text = capsys.readouterr().out
    assert "compared: 2 items in both" in text
    assert "validation_Art_3: exact match: A right, B wrong" in text
