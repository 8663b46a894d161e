"""The file formats of `lmmkit.eval.rescore`: reading released prediction files (bad input raises
`RescoreError` naming the file and line or record) and rebuilding each official scorer's printed text.

Each text function returns exactly what the official script prints for the same numbers (its stdout,
or the part of it that carries scores), so ``lmmkit score`` output can be diffed against the official.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmmkit.atomic import atomic_write
from lmmkit.eval.pope import read_pope_jsonl
from lmmkit.eval.scoring.mathvista import GROUP_KEYS, group_order
from lmmkit.eval.scoring.mme import COGNITION, PERCEPTION
from lmmkit.eval.scoring.mmmu import DISCIPLINES, MULTIPLE_CHOICE

PathLike = str | os.PathLike[str]
ROBUST_HEADER = "--- robust: lmmkit's parser (unparseable answers are scored wrong) ---\n"
POPE_RULE = "=" * 36


class RescoreError(ValueError):
    """Bad input; the message names the file (and the line or record)."""


def named(err: Exception, path: PathLike) -> RescoreError:
    """`err` as a RescoreError whose message names `path` (the scorers' messages often do already)."""
    text = str(err)
    return RescoreError(text if str(path) in text else f"{path}: {text}")


def cannot_read(err: OSError, path: PathLike) -> RescoreError:
    return RescoreError(f"{err.filename or path}: cannot read: {err.strerror or err}")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def load_json(path: PathLike) -> Any:
    """A whole JSON file (UTF-8)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as err:
        raise cannot_read(err, path) from err
    except ValueError as err:  # JSONDecodeError says line and column; UnicodeDecodeError the byte
        raise RescoreError(f"{path}: not valid JSON: {err}") from err


def read_jsonl(path: PathLike, required: Sequence[str], strings: Sequence[str] = ()) -> list[dict]:
    """JSON lines, each an object with the `required` keys; the `strings` keys must hold strings."""
    try:
        rows = read_pope_jsonl(path, required)
    except OSError as err:
        raise cannot_read(err, path) from err
    except ValueError as err:
        raise named(err, path) from err
    for k, row in enumerate(rows, 1):
        for key in strings:
            if not isinstance(row[key], str):
                raise RescoreError(f"{path}: record {k}: {key!r} is {row[key]!r}, not a string")
    return rows


def read_pope_labels(path: PathLike) -> list[str]:
    """A POPE label file's labels; each must be exactly "yes" or "no"."""
    labels = [row["label"] for row in read_jsonl(path, ("label",), ("label",))]
    for k, label in enumerate(labels, 1):
        if label not in ("yes", "no"):  # the official counts anything but "no" as yes, even "No"
            raise RescoreError(f"{path}: record {k}: label {label!r} is not 'yes' or 'no'")
    return labels


def read_mmmu_eval_only(predictions_json: PathLike, answers_json: PathLike) -> tuple[dict, dict]:
    """({id: final answer}, answer_dict_val.json) checked as main_eval_only.py needs them."""
    outputs, answers = load_json(predictions_json), load_json(answers_json)
    if not isinstance(outputs, dict):
        raise RescoreError(f"{predictions_json}: expected a JSON object {{id: answer}}")
    if not isinstance(answers, dict):
        raise RescoreError(f"{answers_json}: expected a JSON object {{id: {{question_type, ground_truth}}}}")
    for item_id, gold in answers.items():
        if not isinstance(gold, dict) or not {"question_type", "ground_truth"} <= set(gold):
            raise RescoreError(f"{answers_json}: id {item_id!r}: needs 'question_type' and 'ground_truth'")
    for item_id, pred in outputs.items():
        gold = answers.get(item_id)
        if gold and gold["question_type"] != MULTIPLE_CHOICE and not isinstance(pred, str):
            raise RescoreError(f"{predictions_json}: id {item_id!r}: an open answer must be a string, got {pred!r}")
    return outputs, answers


def read_mmmu_outputs(path: Path) -> list[dict]:
    """One ``<Subject>/output.json``: a list of {id, question_type, answer, response[, all_choices, index2ans]}."""
    records = load_json(path)
    if not isinstance(records, list):
        raise RescoreError(f"{path}: expected a JSON list of outputs")
    for k, rec in enumerate(records, 1):
        need = ["id", "question_type", "answer", "response"]
        if isinstance(rec, dict) and rec.get("question_type") == MULTIPLE_CHOICE:
            need += ["all_choices", "index2ans"]
        missing = [f for f in need if not isinstance(rec, dict) or f not in rec]
        where = f"{path}: record {k}" + (f" (id {rec['id']!r})" if isinstance(rec, dict) and "id" in rec else "")
        if missing:
            raise RescoreError(f"{where}: no {', '.join(map(repr, missing))} field")
        if not isinstance(rec["response"], str):
            raise RescoreError(f"{where}: 'response' is not a string")
        if "all_choices" in need and (not rec["all_choices"] or not isinstance(rec["index2ans"], dict)):
            raise RescoreError(f"{where}: a multiple-choice output needs non-empty 'all_choices' and 'index2ans'")
    return records


def read_mathvista_output(path: PathLike, need_extraction: bool, need_response: bool) -> dict:
    """The released output format {pid: problem}, each with what the asked modes read."""
    problems = load_json(path)
    if not isinstance(problems, dict) or not problems:
        raise RescoreError(f"{path}: expected a non-empty JSON object {{pid: problem}}")
    need = ["question_type", "answer_type", "answer"]
    need += ["extraction"] if need_extraction else []
    need += ["response"] if need_response else []
    for pid, p in problems.items():
        missing = [f for f in need if not isinstance(p, dict) or f not in p]
        if missing:
            raise RescoreError(f"{path}: pid {pid!r}: no {', '.join(map(repr, missing))} field")
        if p["question_type"] == "multi_choice" and not (isinstance(p.get("choices"), list) and p["choices"]):
            raise RescoreError(f"{path}: pid {pid!r}: a multi_choice problem needs a non-empty 'choices' list")
    return problems


def read_mmvet_capabilities(path: PathLike, ids: Sequence[str]) -> dict[str, list[str]]:
    """{id: capability list} from mm-vet.json, for every graded id."""
    meta = load_json(path)
    missing = [i for i in ids if not isinstance(meta, dict) or not isinstance(meta.get(i), dict)
               or not isinstance(meta[i].get("capability"), list)]
    if missing:
        raise RescoreError(f"{path}: no 'capability' list for ids {missing[:5]}")
    return {i: meta[i]["capability"] for i in ids}


# --------------------------------------------------------------------------------------------
# Printed text
# --------------------------------------------------------------------------------------------

def pope_text(m: Mapping) -> str:
    """RUCAIBox/POPE evaluate.py's stdout (LLaVA's eval_pope.py prints the same lines)."""
    return (
        "TP\tFP\tTN\tFN\t\n"
        f"{m['tp']}\t{m['fp']}\t{m['tn']}\t{m['fn']}\n"
        f"Accuracy: {m['accuracy']}\nPrecision: {m['precision']}\nRecall: {m['recall']}\n"
        f"F1 score: {m['f1']}\nYes ratio: {m['yes_ratio']}\n"
    )


def pope_llava_text(category: str, n_answers: int, m: Mapping, extra: str = "") -> str:
    """One category's block of LLaVA's eval_pope.py stdout (`extra` goes before its closing rule)."""
    summary = ", ".join(f"{m[k]:.3f}" for k in ("f1", "accuracy", "precision", "recall", "yes_ratio"))
    return f"Category: {category}, # samples: {n_answers}\n{pope_text(m)}{summary}\n{extra}{POPE_RULE}\n"


def mme_text(result: Mapping) -> str:
    """The MME tool's calculation.py stdout; groups or tasks without a file are left out."""
    out = []
    for title, tasks in (("Perception", PERCEPTION), ("Cognition", COGNITION)):
        present = [t for t in tasks if t in result["tasks"]]
        if not present:
            continue
        # print("total score:", scores, "\n") and print("\t", task_name, " score:", score)
        out.append(f"=========== {title} ===========\ntotal score: {result[f'{title.lower()}_total']} \n\n")
        out += [f"\t {t}  score: {result['tasks'][t]['score']}\n" for t in present]
        out.append("\n\n")
    return "".join(out)


def _mmmu_rows(result: Mapping) -> list[tuple[str, int, float | int]]:
    """(name, num, round(acc, 3)) in the official order; an absent discipline is (num 0, acc int 0)."""
    subjects, disciplines = result["subjects"], result["disciplines"]
    rows: list[tuple[str, int, float | int]] = []
    for name, members in DISCIPLINES.items():
        # the official's calculate_ins_level_acc returns the int 0 for an empty discipline
        acc = disciplines[name]["acc"] if name in disciplines else 0
        present = [s for s in members if s in subjects]
        rows.append((f"Overall-{name}", sum(subjects[s]["total"] for s in present), round(acc, 3)))
        rows += [(s, subjects[s]["total"], round(subjects[s]["acc"], 3)) for s in present]
    rows.append(("Overall", sum(s["total"] for s in subjects.values()), round(result["acc_official"], 3)))
    return rows


def mmmu_dict_line(result: Mapping) -> str:
    """main_eval_only.py's last stdout line: the printable_results dict."""
    return repr({name: {"num": num, "acc": acc} for name, num, acc in _mmmu_rows(result)}) + "\n"


def _afterpoint(text: str) -> int:
    """tabulate's digits after the decimal point, -1 when there is none."""
    return len(text) - text.index(".") - 1 if "." in text else -1


def mmmu_table(result: Mapping) -> str:
    """print_results.py's stdout: ``tabulate(rows, headers, tablefmt='orgtbl')`` for its three columns.

    tabulate's rules for these columns: width = max(len(header) + 2, widest cell); text left-aligned,
    numbers right-aligned, floats formatted with "g" and aligned on the decimal point.
    """
    rows = _mmmu_rows(result)
    headers = ("Subject", "Data Num", "Acc")
    accs = [format(float(acc), "g") for _, _, acc in rows]
    decimals = max(_afterpoint(a) for a in accs)
    accs = [a + " " * (decimals - _afterpoint(a)) for a in accs]
    cells = [(name, str(num), acc) for (name, num, _), acc in zip(rows, accs, strict=True)]
    widths = [max(len(h) + 2, *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        first = values[0].ljust(widths[0])
        rest = [v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True)]
        return "| " + " | ".join([first, *rest]) + " |"

    rule = "|" + "+".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(c) for c in cells)]) + "\n"


def mathvista_text(result: Mapping, problems: Mapping[str, Mapping]) -> str:
    """calculate_score.py's stdout from the "Correct:" line to the last group line.

    Group values come in the official order (first seen), except skills: the official prints them in
    ``list(set(...))`` order, which changes with PYTHONHASHSEED; lmmkit prints them first seen.
    """
    scores = result["scores"]
    avg = scores["average"]
    out = [f"Correct: {avg['correct']}, Total: {avg['total']}, Accuracy: {avg['accuracy']}%\n",
           f"{len(problems)}\nNumber of test problems: {len(problems)}\n"]  # print(len(df)) is official too
    for key in GROUP_KEYS:
        out.append(f"\nType: [{key}]\n")
        for value in group_order(problems, key):
            s = scores[key][value]
            out.append(f"[{value}]: {s['accuracy']}% ({s['correct']}/{s['total']})\n")
    return "".join(out)


def mmvet_text(result: Mapping, model: str) -> str:
    """The row of the official ``<model>_<judge>-cap-score-<N>runs.csv`` (capability columns only when
    known), header included, written as pandas writes it."""
    caps = dict(result.get("capabilities") or {})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["", *caps, "total", "std", "runs"])
    writer.writerow([model, *caps.values(), result["total"], result["std"], result["runs_str"]])
    return buf.getvalue()


def unparseable_line(count: int, total: int) -> str:
    """The robust block's last line."""
    return f"Unparseable: {count} of {total}\n"


def run_and_print(compute: Callable[[], dict], json_out: str | None, dump: Callable[[dict], str]) -> int:
    """The CLI contract of `lmmkit score`: the result's text on stdout, warnings and notes on stderr,
    --json written atomically; bad input -> an error line naming the file, exit status 2."""
    try:
        result = compute()
        if json_out:
            atomic_write(json_out, dump(result))
    except RescoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err.filename}: {err.strerror or err}", file=sys.stderr)
        return 2
    sys.stdout.write(result["text"])
    for line in result["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    for line in result["notes"]:
        print(f"note: {line}", file=sys.stderr)
    return 0
