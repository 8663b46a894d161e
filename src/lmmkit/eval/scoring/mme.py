"""MME: the official result files, the official yes/no rule, and the official scores.

Two answer parsers live side by side:

* ``parse_official`` is the rule of the MME eval tool (calculation.py), quirks included.
* ``parse_robust`` is lmmkit's own: it reads the leading word (or "the answer is X") regardless of
  case, punctuation and markdown, and says ``None`` when it cannot tell.

Scores follow the official arithmetic to the last float digit: per subtask
``0 + acc*100 + acc_plus*100``, group totals summed in the official task order starting from 0.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters",
    "celebrity", "scene", "landmark", "artwork", "OCR",
)
COGNITION: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)
OFFICIAL_GROUPS: dict[str, tuple[str, ...]] = {"perception": PERCEPTION, "cognition": COGNITION}
OTHER_GROUP = "other"


@dataclass
class MMERow:
    """One line of an MME file. `response` keeps the trailing newline the official tool sees."""

    image: str
    question: str
    answer: str
    response: str | None


# --------------------------------------------------------------------------------------------
# Files: image \t question \t gt [\t response] \n
# --------------------------------------------------------------------------------------------


def read_mme_file(path: str | os.PathLike[str], allow_tabs: bool = False) -> list[MMERow]:
    """Read an MME template (3 fields) or result file (4 fields) as the official tool does.

    Lines come from text-mode ``readlines`` (universal newlines), split on tabs. The response is the
    raw 4th field, trailing "\\n" included. The ground truth may be any case of yes/no (the tool
    lower-cases it). Any other line, a blank one included, raises ValueError with its line number.
    With `allow_tabs`, a response holding tabs (which crashes the official tool) is kept whole: the
    fields after the third, joined by tabs. Every line is a row, so row i is line i + 1.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split("\t")
            if allow_tabs and len(fields) > 4:
                fields = [*fields[:3], "\t".join(fields[3:])]
            if len(fields) not in (3, 4):
                raise ValueError(
                    f"{path}:{lineno}: expected 3 or 4 tab-separated fields "
                    f"(image, question, gt[, response]), got {len(fields)}"
                )
            image, question, gt = fields[0], fields[1], fields[2]
            response = fields[3] if len(fields) == 4 else None
            if response is None:
                gt = gt.rstrip("\n")  # the template's newline ends the gt field
            if gt.lower() not in ("yes", "no"):
                raise ValueError(f"{path}:{lineno}: ground truth must be Yes or No, got {gt!r}")
            rows.append(MMERow(image, question, gt, response))
    return rows


def _clean_field(value: str, name: str, row: int) -> str:
    if any(c in value for c in "\t\r\n"):
        raise ValueError(f"row {row}: {name} {value!r} contains a tab or line break")
    return value


def write_mme_file(path: str | os.PathLike[str], rows: Sequence[MMERow]) -> Path:
    """Write rows in the official 4-field format; returns the path.

    The response loses its trailing line break (the line's own "\\n" replaces it, so a file read
    with `read_mme_file` round-trips), and every other tab, CR or LF in it becomes a space: the
    official tool splits on tabs and crashes on a 5th field. None is written as an empty response.
    A tab or line break in image, question or answer raises ValueError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        response = (row.response or "").removesuffix("\n").removesuffix("\r")
        response = re.sub(r"[\t\r\n]", " ", response)
        fields = [_clean_field(v, n, i) for v, n in
                  ((row.image, "image"), (row.question, "question"), (row.answer, "answer"))]
        lines.append("\t".join([*fields, response]) + "\n")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(lines))
    return path


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------


def parse_official(response: str) -> str:
    """Official rule: lower-case; exactly "yes"/"no" -> it; "yes" in the first 4 characters -> yes;
    else "no" in them -> no; else "other" (scored wrong). So "Not sure" -> no, "Nope" -> no."""
    text = response.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


_YES = {"yes", "yeah", "yep", "yup"}
_NO = {"no", "nope", "nah"}
_WORDS = re.compile(r"[a-z]+")
# "the answer is yes", "answer: no", "my answer would be yes"; not "the answer is yes or no"
_ANSWER_IS = re.compile(r"\banswer (?:is |would be |will be )?(yes|no)\b(?! or\b)")


def parse_robust(response: str) -> str | None:
    """lmmkit's lenient yes/no parser: the leading word decides ("Yes.", " no,", "**Yes**"),
    else an "answer is yes/no" phrase; case, punctuation and whitespace are ignored. None when
    neither says anything (e.g. "Yesterday", "Not sure", "I think so")."""
    words = _WORDS.findall(str(response).lower())
    if not words:
        return None
    if words[0] in _YES:
        return "yes"
    if words[0] in _NO:
        return "no"
    found = {m.group(1) for m in _ANSWER_IS.finditer(" ".join(words))}
    return found.pop() if len(found) == 1 else None


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def score_subtask(rows: Sequence[tuple[str, str, str]]) -> dict:
    """Official metrics of one subtask from (image, ground truth, parsed label) rows.

    acc = correct / questions ("other" is wrong); acc_plus = pairs of consecutive rows with both
    right / pairs (image names are not checked, as in the tool; an odd row count raises
    ValueError); score = 0 + acc*100 + acc_plus*100. TP/FN/TN/FP, precision and recall take yes
    as positive over the non-"other" rows (a zero denominator gives 0.0, as sklearn does).
    """
    if len(rows) % 2:
        raise ValueError(f"MME rows come in pairs (two questions per image), got {len(rows)} rows")
    tp = fn = tn = fp = other = correct = both = 0
    for start in range(0, len(rows), 2):
        right = 0
        for _image, gt, label in rows[start:start + 2]:
            gold, pred = gt.lower(), label.lower()
            if gold not in ("yes", "no"):
                raise ValueError(f"ground truth must be yes or no, got {gt!r}")
            if pred not in ("yes", "no"):
                other += 1
                continue
            right += gold == pred
            if gold == "yes":
                tp, fn = (tp + 1, fn) if pred == "yes" else (tp, fn + 1)
            else:
                tn, fp = (tn + 1, fp) if pred == "no" else (tn, fp + 1)
        correct += right
        both += right == 2
    n, images = len(rows), len(rows) // 2
    acc = correct / n if n else 0.0
    acc_plus = both / images if images else 0.0
    score = 0
    score += acc * 100  # the tool's exact float order: 0, + acc*100, + acc_plus*100
    score += acc_plus * 100
    return {
        "TP": tp, "FN": fn, "TN": tn, "FP": fp,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "other_num": other, "acc": acc, "acc_plus": acc_plus, "score": float(score),
        "n": n, "images": images,
    }


def score_mme(
    subtasks: Mapping[str, Sequence[tuple[str, str, str]]],
    groups: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """Score every subtask and total each group, summing scores in the group's order from 0.

    `groups` defaults to the official perception (10 tasks) and cognition (4). Subtasks in no
    group (e.g. lmmkit's ShapesWorld "shapes_existence") are totalled under "other" in mapping
    order. Returns {"tasks": {name: score_subtask dict}, "<group>_total": float for each group and
    "other", "missing": {group: [its tasks absent from `subtasks`]}}.
    """
    groups = OFFICIAL_GROUPS if groups is None else groups
    if OTHER_GROUP in groups:
        raise ValueError(f"group name {OTHER_GROUP!r} is reserved for subtasks in no group")
    tasks = {name: score_subtask(rows) for name, rows in subtasks.items()}
    grouped = {t for members in groups.values() for t in members}
    order = {**{g: list(members) for g, members in groups.items()},
             OTHER_GROUP: [t for t in tasks if t not in grouped]}
    result: dict = {"tasks": tasks}
    for group, members in order.items():
        total = 0
        for task in members:
            if task in tasks:
                total += tasks[task]["score"]
        result[f"{group}_total"] = float(total)
    result["missing"] = {g: [t for t in members if t not in tasks] for g, members in groups.items()}
    return result


def score_mme_dir(
    results_dir: str | os.PathLike[str],
    parser: Callable[[str], str | None] = parse_official,
    groups: Mapping[str, Sequence[str]] | None = None,
    allow_tabs: bool = False,
) -> dict:
    """Read every ``<task>.txt`` result file in a directory, parse, and `score_mme` them.

    Official tasks come first in official order, then other files by name. A parser answer other
    than "yes"/"no" (None included) counts as "other". With `allow_tabs`, responses holding tabs are
    read whole (see `read_mme_file`) and listed in "tab_lines": {file path: [line numbers]}.
    """
    files = {p.stem: p for p in sorted(Path(results_dir).glob("*.txt"))}
    official = (*PERCEPTION, *COGNITION)
    names = [t for t in official if t in files] + [t for t in files if t not in official]
    subtasks = {}
    tab_lines: dict[str, list[int]] = {}
    for name in names:
        rows = read_mme_file(files[name], allow_tabs=allow_tabs)
        if any(r.response is None for r in rows):
            raise ValueError(f"{files[name]}: a line has no response (3-field template line)")
        if len(rows) % 2:  # named here: score_subtask's own error cannot say which file
            raise ValueError(f"{files[name]}: {len(rows)} lines; MME lines come in pairs (two questions per image)")
        tabbed = [i for i, r in enumerate(rows, 1) if "\t" in (r.response or "")]
        if tabbed:
            tab_lines[str(files[name])] = tabbed
        subtasks[name] = [(r.image, r.answer, parser(r.response) or "other") for r in rows]
    result = score_mme(subtasks, groups)
    if allow_tabs:
        result["tab_lines"] = tab_lines
    return result
