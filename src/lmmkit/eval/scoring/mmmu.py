"""MMMU: the official answer parsers and judges, lmmkit's robust parsers, and the official totals.

* ``parse_multi_choice_official`` / ``parse_open_official`` follow the MMMU eval utilities rule for
  rule, quirks included (see each docstring); the random fallback draws from a caller-owned rng.
* ``parse_multi_choice_robust`` / ``parse_open_robust`` are lmmkit's own and say ``None`` instead
  of guessing.
* ``parse_and_eval`` and ``eval_only`` reproduce the official two modes end to end.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

DISCIPLINES: dict[str, tuple[str, ...]] = {  # the official table order
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine",
                            "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
SUBJECTS: tuple[str, ...] = tuple(sorted(s for subs in DISCIPLINES.values() for s in subs))
MULTIPLE_CHOICE = "multiple-choice"


def subject_of(item_id: str) -> str:
    """Subject of an MMMU id: the words between the split and the number ("validation_Art_Theory_12")."""
    return "_".join(item_id.split("_")[1:-1])


# ---- Official multiple choice ---------------------------------------------------------------------


def _mc_candidates(response: str, all_choices: Sequence[str], index2ans: Mapping[str, str]) -> str | None:
    """The official rule up to the random fallback: the chosen letter, or None for "guess"."""
    for char in (",", ".", "!", "?", ";", ":", "'"):  # one class at a time: "A.," keeps its "."
        response = response.strip(char)
    response = f" {response} "  # so " A " matches at either end
    candidates = [c for c in all_choices if f"({c})" in response]
    form = "({})"
    if not candidates:
        candidates, form = [c for c in all_choices if f" {c} " in response], " {} "
    if not candidates and len(response.split()) > 5:  # option texts only for longer answers
        lower = response.lower()
        candidates = [k for k, text in index2ans.items() if text.lower() in lower]
        if len(candidates) > 1:
            return _last(candidates, [lower.rfind(index2ans[k].lower()) for k in candidates])
        return candidates[0] if candidates else None
    if len(candidates) > 1:
        return _last(candidates, [response.rfind(form.format(c)) for c in candidates])
    return candidates[0] if candidates else None


def _last(candidates: Sequence[str], positions: Sequence[int]) -> str:
    """The candidate matched last (largest rfind); ties go to the earliest, as numpy.argmax."""
    best = 0
    for i, pos in enumerate(positions):
        if pos > positions[best]:
            best = i
    return candidates[best]


def parse_multi_choice_official(
    response: str, all_choices: Sequence[str], index2ans: Mapping[str, str], rng: random.Random
) -> str:
    """Official rule: strip , . ! ? ; : ' from both ends one character class at a time, pad with
    spaces; candidates = letters c with "(c)" in it, else letters with " c ", else (only when the
    response has more than 5 words) letters whose option text occurs, case-insensitively. Several
    -> the one whose form occurs last (rfind), ties to the first; none -> ``rng.choice(all_choices)``
    (official: one ``random.seed(42)`` stream, the same as ``random.Random(42)``)."""
    chosen = _mc_candidates(response, all_choices, index2ans)
    return rng.choice(all_choices) if chosen is None else chosen


def eval_multi_choice(gold: str | list[str], pred: Any) -> bool:
    """Official: correct iff the prediction equals the gold letter (or one of a gold list)."""
    return pred in gold if isinstance(gold, list) else gold == pred


# ---- Official open answers ------------------------------------------------------------------------

_COMMA_NUMBER = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_SCI_NUMBER = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_SIMPLE_NUMBER = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])")
_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}


def is_number(text: str) -> bool:
    """Official check: ``float()`` accepts the text once commas are removed."""
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_str(text: str) -> list:
    """Official normalisation: a number -> [round(float, 2)]; a string -> [lower-cased]; a
    one-character string -> [" x", "x "] so it cannot match inside a word."""
    text = text.strip()
    if is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def extract_numbers(text: str) -> list[str]:
    """Official number extraction: comma-grouped, then scientific, then simple numbers."""
    return _COMMA_NUMBER.findall(text) + _SCI_NUMBER.findall(text) + _SIMPLE_NUMBER.findall(text)


def key_subresponses(response: str) -> list[str]:
    """Official: per sentence, the shortest tail after an indicator ("=" too in the last one).

    Quirk kept: the sentence split looks for ". " before a capital *after* lower-casing, so only
    newlines split. An empty tail is replaced by any later one, however long. No tail -> [whole]."""
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, sentence in enumerate(sentences):
        indicators = _INDICATORS + (("=",) if index == len(sentences) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open_official(response: str) -> list:
    """Official open parse: key tails plus the numbers in them, each normalised, duplicates
    dropped. (The official list(set()) order is arbitrary; this keeps first-seen order.)"""
    keys = key_subresponses(response)
    preds = keys + [n for key in keys for n in extract_numbers(key)]
    return list(dict.fromkeys(v for p in preds for v in normalize_str(p)))


def eval_open(gold: str | list[str], pred: Sequence[Any]) -> bool:
    """Official: a numeric prediction is right if it is among the normalised golds; a string
    prediction is right if a normalised string gold is a substring of it."""
    golds = [n for g in gold for n in normalize_str(g)] if isinstance(gold, list) else normalize_str(gold)
    for p in pred:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in golds):
                return True
        elif p in golds:
            return True
    return False


# ---- lmmkit's robust parsers ----------------------------------------------------------------------

_ANSWER_LETTER = re.compile(
    r"(?i:\b(?:answer|option|choice)\b(?:\s+(?:is|would be|should be))?)\s*[:\-]?\s*[(\[]?([A-Z])\b(?!['-])"
)
# option labels: "(B)" anywhere, "B." / "B)" opening a line; several of them (a copied list) is unclear
_LABEL = re.compile(r"\(([A-Z])\)|^[(\[]?([A-Z])[)\].:](?:\s|$)", re.M)


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[*`]", "", text).lower().split()).strip(" .")


def parse_multi_choice_robust(
    response: str, all_choices: Sequence[str], index2ans: Mapping[str, str]
) -> str | None:
    """lmmkit's lenient letter parser, None when unclear (never a guess). In order: the whole
    answer is a letter ("B", "(b)", "B."); one letter named by "answer is"/"option"/"choice"; one
    option label ("(B)" anywhere, "B." or "B)" opening a line); the answer equals one option's
    text; exactly one option text occurs as a whole phrase (ignoring options inside another that
    occurs). Several letters at a step -> None."""
    text = re.sub(r"[*`]", "", str(response)).strip()
    letters = {c.upper(): c for c in all_choices}
    m = re.fullmatch(r"[(\[]?([A-Za-z])[)\].:]?", text)
    if m and m[1].upper() in letters:
        return letters[m[1].upper()]
    for found in ({m[1] for m in _ANSWER_LETTER.finditer(text)},
                  {a or b for a, b in _LABEL.findall(text)}):
        found = found & set(letters)
        if len(found) == 1:
            return letters[found.pop()]
        if found:
            return None  # contradicting letters
    plain = _plain(text)
    options = {k: _plain(str(v)) for k, v in index2ans.items() if _plain(str(v))}
    equal = [k for k, v in options.items() if v == plain]
    if len(equal) == 1:
        return equal[0]
    hits = [k for k, v in options.items() if re.search(rf"(?<!\w){re.escape(v)}(?!\w)", plain)]
    hits = [k for k in hits if not any(k != o and options[k] in options[o] for o in hits)]
    return hits[0] if len(hits) == 1 else None


_CUE = re.compile(r"(?i:(?:final answer|answer|result)\s*(?:is|would be|:|=)|therefore|thus|=)")


def parse_open_robust(response: str) -> list | None:
    """lmmkit's lenient open parser: the text after the last answer cue ("answer is", "answer:",
    "therefore", "=") up to its sentence end, else the whole answer; returns it lower-cased (or as
    a number) plus the numbers in it, normalised as the official judge expects. None when empty."""
    text = re.sub(r"[*`]", "", str(response)).strip()
    cues = list(_CUE.finditer(text))
    if cues:
        tail = text[cues[-1].end():]
        text = re.split(r"\.(?:\s|$)|\n", tail.strip(), maxsplit=1)[0] or tail
    text = text.strip().strip(".:,;!?").strip()
    if not re.search(r"\w", text):
        return None
    preds = [text, *extract_numbers(text)]
    return list(dict.fromkeys(v for p in preds for v in normalize_str(p)))


# ---- Totals and the two official modes ------------------------------------------------------------


def _judge(item: Mapping) -> bool:
    pred = item.get("parsed_pred")
    if pred is None:
        return False  # a robust parser's "unclear"
    if item["question_type"] == MULTIPLE_CHOICE:
        return eval_multi_choice(item["answer"], pred)
    return eval_open(item["answer"], pred)


def _official_mean(results: Sequence[Mapping]) -> float:
    """The official instance-level accuracy: sum of acc*num over subjects, divided by num."""
    total = sum(r["total"] for r in results)
    acc = 0
    for r in results:
        acc += r["acc"] * r["total"]
    return acc / total if total else 0.0


def score_mmmu(items: Sequence[Mapping]) -> dict:
    """Judge items {id, question_type, answer, parsed_pred[, subject]} and total them.

    "multiple-choice" uses `eval_multi_choice`, any other type `eval_open`; a None prediction is
    wrong. Subject = item["subject"] or `subject_of(id)`. Returns {"correct", "total", "acc"
    (micro), "acc_official" (the official acc*num sum), "subjects": {s: {correct, total, acc}}
    alphabetically, "disciplines": the same per discipline (acc the official way), "judges": {id: bool}}.
    """
    judges: dict[str, bool] = {}
    subjects: dict[str, dict] = {}
    for item in items:
        if item["id"] in judges:
            raise ValueError(f"duplicate item id {item['id']!r}")
        ok = judges[item["id"]] = _judge(item)
        entry = subjects.setdefault(item.get("subject") or subject_of(item["id"]), {"correct": 0, "total": 0})
        entry["correct"] += ok
        entry["total"] += 1
    subjects = {s: {**subjects[s], "acc": subjects[s]["correct"] / subjects[s]["total"]} for s in sorted(subjects)}
    disciplines = {}
    for name, members in DISCIPLINES.items():
        present = [subjects[s] for s in members if s in subjects]
        if present:
            disciplines[name] = {"correct": sum(r["correct"] for r in present),
                                 "total": sum(r["total"] for r in present), "acc": _official_mean(present)}
    correct = sum(judges.values())
    return {"correct": correct, "total": len(judges), "acc": correct / len(judges) if judges else 0.0,
            "acc_official": _official_mean(list(subjects.values())), "subjects": subjects,
            "disciplines": disciplines, "judges": judges}


def parse_and_eval(outputs_by_subject: Mapping[str, Sequence[Mapping]], seed: int = 42) -> dict:
    """The official parse-and-eval run on raw outputs {subject: [{id, question_type, answer,
    all_choices, index2ans, response}]}: one ``random.Random(seed)`` consumed in alphabetical subject
    order (the official list is alphabetical; a non-official subject, which the tool never visits, is
    scored too and takes its draws in its alphabetical place), then file order. Returns `score_mmmu`'s
    totals plus "items": {id: {question_type, answer, parsed_pred, correct}} and "random_fallbacks"."""
    rng = random.Random(seed)
    items, fallbacks = [], []
    for subject in sorted(outputs_by_subject):
        for out in outputs_by_subject[subject]:
            if out["question_type"] == MULTIPLE_CHOICE:
                pred = _mc_candidates(out["response"], out["all_choices"], out["index2ans"])
                if pred is None:
                    fallbacks.append(out["id"])
                    pred = rng.choice(out["all_choices"])
            else:
                pred = parse_open_official(out["response"])
            items.append({"id": out["id"], "question_type": out["question_type"], "answer": out["answer"],
                          "parsed_pred": pred, "subject": subject})
    result = score_mmmu(items)
    keep = ("question_type", "answer", "parsed_pred")
    result["items"] = {it["id"]: {**{k: it[k] for k in keep}, "correct": result["judges"][it["id"]]} for it in items}
    return {**result, "random_fallbacks": fallbacks}


def _load(source: Mapping | str | os.PathLike[str]) -> Mapping:
    if isinstance(source, Mapping):
        return source
    with open(source, encoding="utf-8") as f:
        return json.load(f)


def eval_only(
    answers: Mapping[str, Mapping] | str | os.PathLike[str], outputs: Mapping[str, Any] | str | os.PathLike[str]
) -> dict:
    """The official eval-only mode: `answers` as answer_dict_val.json ({id: {question_type,
    ground_truth}}), `outputs` as total_val_output.json ({id: final answer}), mappings or paths.

    Multiple choice compares the stored letter by string equality; other types go through
    `parse_open_official`. Outputs of a subject outside the official list, or with no answers at
    all, are skipped (as the tool does) and listed under "skipped"; any other output id with no
    answer raises ValueError (the tool crashes with KeyError).
    """
    answers, outputs = _load(answers), _load(outputs)
    answered = {subject_of(i) for i in answers}
    items, skipped = [], []
    for item_id, pred in outputs.items():
        if subject_of(item_id) not in SUBJECTS or subject_of(item_id) not in answered:
            skipped.append(item_id)
            continue
        if item_id not in answers:
            raise ValueError(f"output {item_id!r} has no ground truth in the answer file")
        qtype = answers[item_id]["question_type"]
        items.append({"id": item_id, "question_type": qtype, "answer": answers[item_id]["ground_truth"],
                      "parsed_pred": pred if qtype == MULTIPLE_CHOICE else parse_open_official(pred)})
    return {**score_mmmu(items), "skipped": skipped}
