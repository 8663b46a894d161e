"""MathVista (testmini): answer extraction, normalisation and scores.

Strict path, matching the authors' first-commit scorer (the one that wrote the released
``scores_bard.json``): ``quick_extract`` (the rule steps before the LLM extractor), then
``normalize_extracted_answer`` and ``safe_equal``, then ``score_mathvista``. Quirks kept on purpose:
integers truncate (``"2.9"`` -> ``"2"``), floats round to the item's precision, lists compare as
``str(list)``, multiple choice falls back to the choice with the least edit distance.

Robust path: ``robust_extract`` is lmmkit's own rule parser; it says ``None`` when unclear and feeds
the same normalisation (``None`` then scores as wrong).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

GROUP_KEYS: tuple[str, ...] = (
    "question_type", "answer_type", "language", "source", "category", "task", "context", "grade", "skills",
)

# --- Extraction -----------------------------------------------------------------------------------

_QUOTED_ANSWER = re.compile(r'The answer is "(.*)"\.')


def quick_extract(response: str, problem: Mapping) -> str | None:
    """The official rule steps before the LLM extractor; ``None`` means "ask the LLM"."""
    if response == "":
        return ""
    if problem["question_type"] == "multi_choice" and response in (problem.get("choices") or []):
        return response
    if problem["answer_type"] == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if problem["answer_type"] == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    match = _QUOTED_ANSWER.search(response)
    return match.group(1) if match else None


_EXTRACTION_INSTRUCTION = (
    "Read a question and a model's reply to it, and copy out the model's final answer in the form the "
    "question asks for: an option letter's text or the option itself for multiple choice, a plain number "
    "for numeric questions (no units), a Python-style list for list questions. Do not solve the question "
    "yourself and do not correct the model; if it gives no answer, write nothing after the colon."
)

_EXTRACTION_EXAMPLES: tuple[tuple[str, str, str], ...] = (
    (
        "Hint: Please answer the question requiring an integer answer.\nQuestion: How many red cubes are left "
        "after removing the two small ones?",
        "There are five red cubes in total. Two of them are small, so 5 - 2 = 3 remain.",
        "3",
    ),
    (
        "Hint: Please answer the question requiring a floating-point number with two decimal places.\n"
        "Question: What is the slope of the line through (0, 1) and (3, 2)?",
        "Slope = (2 - 1) / (3 - 0) = 1/3, which is about 0.33.",
        "0.33",
    ),
    (
        "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the "
        "end.\nQuestion: Which month has the highest rainfall?\nChoices:\n(A) March\n(B) June\n(C) October",
        "The tallest bar is the one labelled June, so the answer is (B) June.",
        "B",
    ),
    (
        "Hint: Please answer the question requiring a Python list as an answer.\nQuestion: List the "
        "x-values where the curve crosses zero, from left to right.",
        "Reading the plot, the curve is zero at x = -2 and again at x = 4.",
        "[-2, 4]",
    ),
    (
        "Hint: Please answer the question requiring an integer answer.\nQuestion: What is the age gap "
        "between the two people?",
        "I cannot tell the ages of people from a photo.",
        "",
    ),
)


def build_extraction_prompt(problem: Mapping, response: str) -> str:
    """A few-shot prompt asking an LLM to copy the final answer out of `response`."""
    query = problem.get("query") or problem["question"]
    parts = [_EXTRACTION_INSTRUCTION]
    for q, reply, answer in _EXTRACTION_EXAMPLES:
        parts.append(f"{q}\n\nModel reply: {reply}\n\nExtracted answer: {answer}".rstrip())
    parts.append(f"{query}\n\nModel reply: {response}\n\nExtracted answer:")
    return "\n\n".join(parts)


def parse_extractor_reply(reply: str) -> str:
    """The text after the last "Extracted answer:" (the whole reply if absent), stripped."""
    marker = "Extracted answer:"
    at = reply.rfind(marker)
    return (reply[at + len(marker):] if at >= 0 else reply).strip()


# --- Normalisation and comparison (strict) --------------------------------------------------------

def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance over code points (insert, delete, substitute cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def closest_choice(text: str, choices: Sequence[str]) -> str:
    """The choice with the least edit distance to `text`; the first one on ties."""
    if not choices:
        raise ValueError("a multi_choice problem needs a non-empty list of choices")
    distances = [edit_distance(text, c) for c in choices]
    return choices[distances.index(min(distances))]


_PAREN_LETTER = re.compile(r"\(([a-zA-Z])\)")


def normalize_extracted_answer(
    extraction: str | None,
    choices: Sequence[str] | None,
    question_type: str,
    answer_type: str,
    precision: int | float | None,
) -> str | None:
    """The official normalisation: map to a choice text or a canonical number string; ``None`` on failure."""
    if extraction is None:  # the official coerces with str() ("None"); its extractor never yields None
        return None
    if question_type == "multi_choice":
        text = str(extraction).strip()
        letters = _PAREN_LETTER.findall(text)
        if letters:
            text = letters[0].upper()
        options = [chr(ord("A") + i) for i in range(len(choices or []))]
        if text in options:  # uppercase bare letters only: "b" goes to the edit-distance fallback
            return choices[options.index(text)]
        return closest_choice(text, choices or [])
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))  # truncates toward zero, as the official does
        if answer_type == "float":
            digits = None if precision is None else int(precision)
            return str(round(float(extraction), digits))
        if answer_type == "list":
            return str(extraction)
    except (TypeError, ValueError, OverflowError):
        return None
    return extraction


def safe_equal(prediction: Any, answer: Any) -> bool:
    """Exact ``==``; an exception while comparing counts as not equal."""
    try:
        return bool(prediction == answer)
    except Exception:
        return False


# --- Scores ---------------------------------------------------------------------------------------

def _group_values(problem: Mapping, key: str) -> list:
    meta = problem.get("metadata") or {}
    value = meta[key] if key in meta else problem.get(key)
    if key == "skills":
        return list(dict.fromkeys(value or []))  # an item counts once in each of its skills
    return [] if value is None else [value]


def group_order(problems: Mapping[str, Mapping], key: str) -> list:
    """A group's values in first-seen order: the order the official prints them in (pandas' ``unique()``),
    except skills, which it prints in ``list(set(...))`` order, which depends on PYTHONHASHSEED."""
    return list(dict.fromkeys(v for p in problems.values() for v in _group_values(p, key)))


def score_mathvista(problems: Mapping[str, Mapping]) -> dict:
    """Per-pid prediction/true_false, overall and per-group accuracy (with the released string forms).

    Returns ``per_pid``, ``correct``, ``total``, ``accuracy`` (fraction), ``groups`` (fractions) and
    ``scores``: the released ``scores_<model>.json`` structure ("{:.2f}" percent strings, the average as
    ``str(round(acc * 100, 2))``, groups in descending accuracy, ties in first-seen order).
    """
    per_pid: dict[str, dict] = {}
    for pid, p in problems.items():
        pred = normalize_extracted_answer(
            p.get("extraction"), p.get("choices"), p["question_type"], p["answer_type"], p.get("precision")
        )
        per_pid[pid] = {"prediction": pred, "true_false": safe_equal(pred, p["answer"])}
    total = len(per_pid)
    correct = sum(r["true_false"] for r in per_pid.values())
    accuracy = correct / total if total else 0.0
    scores: dict[str, dict] = {
        "average": {"accuracy": str(round(accuracy * 100, 2)), "correct": correct, "total": total}
    }
    groups: dict[str, dict] = {}
    for key in GROUP_KEYS:
        counts: dict[Any, list[int]] = {}  # first-seen order, which the stable sort keeps for ties
        for pid, p in problems.items():
            for value in _group_values(p, key):
                c = counts.setdefault(value, [0, 0])
                c[0] += per_pid[pid]["true_false"]
                c[1] += 1
        rows = [(v, c, t, f"{c / t * 100:.2f}") for v, (c, t) in counts.items()]
        # the official sorts on the formatted string's value, so 66.666.. and 66.67 tie
        rows.sort(key=lambda r: float(r[3]), reverse=True)
        scores[key] = {v: {"accuracy": s, "correct": c, "total": t} for v, c, t, s in rows}
        groups[key] = {v: {"correct": c, "total": t, "accuracy": c / t} for v, c, t, _ in rows}
    return {
        "per_pid": per_pid, "correct": correct, "total": total, "accuracy": accuracy,
        "groups": groups, "scores": scores,
    }


def released_scores_json(result: Mapping) -> str:
    """``result["scores"]`` in the released file's bytes (``json.dump(indent=4)``, no trailing newline)."""
    return json.dumps(result["scores"], indent=4)


# --- Robust extraction (lmmkit's own) -------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|[-+]?\.\d+")
_CUE = re.compile(r"(?i:answer|result)\s*(?:is|:|=|would be|should be)")
_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])(?:[.):]|\s*$))")
_CUE_LETTER = re.compile(
    r"(?i:answer)(?:\s+(?i:is|would be|should be))?\s*[:\-]?\s*(?:\(([A-Z])\)|([A-Z])(?=\s*(?:$|[.,;:!)\n(])))"
)


def _number_text(token: str) -> str:
    token = token.replace(",", "").replace(" ", "")
    if "/" in token:
        num, den = token.split("/")
        return repr(float(num) / float(den)) if float(den) else num
    return token


def _robust_number(response: str) -> str | None:
    cues = list(_CUE.finditer(response))
    if cues:  # the first number after the last answer cue, on the same line
        tail = response[cues[-1].end():].split("\n", 1)[0]
        found = _NUMBER.search(tail)
        if found:
            return _number_text(found.group())
    numbers = _NUMBER.findall(response)
    return _number_text(numbers[-1]) if numbers else None


def _robust_letter(response: str, choices: Sequence[str]) -> str | None:
    options = [chr(ord("A") + i) for i in range(len(choices))]
    lead = _LEADING_LETTER.match(response)
    if lead and (lead.group(1) or lead.group(2)) in options:
        return lead.group(1) or lead.group(2)
    cued = [m.group(1) or m.group(2) for m in _CUE_LETTER.finditer(response)]
    if cued and cued[-1] in options:
        return cued[-1]
    paren = {m for m in _PAREN_LETTER.findall(response) if m in options}
    if len(paren) == 1:
        return paren.pop()
    bare = response.strip().rstrip(".").strip().lower()
    hits = [i for i, c in enumerate(choices) if bare == str(c).strip().lower()]
    if not hits:  # choice texts quoted inside a longer reply, only when exactly one appears
        hits = [
            i for i, c in enumerate(choices)
            if str(c).strip() and re.search(rf"(?<!\w){re.escape(str(c).strip().lower())}(?!\w)", response.lower())
        ]
    return options[hits[0]] if len(hits) == 1 else None


def robust_extract(response: str, problem: Mapping) -> str | None:
    """lmmkit's rule parser: the official quick rules, then cues/letters/last number; ``None`` when unclear."""
    response = response or ""
    if not response.strip():
        return None
    quick = quick_extract(response, problem)
    if quick is not None:
        return quick
    if problem["question_type"] == "multi_choice":
        return _robust_letter(response, problem.get("choices") or [])
    answer_type = problem["answer_type"]
    if answer_type in ("integer", "float"):
        return _robust_number(response)
    if answer_type == "list":
        lists = re.findall(r"\[([^\[\]]*)\]", response)
        for body in reversed(lists):
            items = _NUMBER.findall(body)
            if items:
                return "[" + ", ".join(_number_text(x) for x in items) + "]"
        return None
    cue = list(re.finditer(r"(?i:answer is|answer:)\s*(.+?)\s*(?:[.\n]|$)", response))
    if cue:
        return cue[-1].group(1).strip("\"' ")
    words = response.strip().rstrip(".").split()
    return " ".join(words) if len(words) <= 3 else None
