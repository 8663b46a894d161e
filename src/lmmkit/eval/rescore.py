"""``lmmkit score``: rescore released prediction files with each benchmark's own rules, no model.

Each task reads exactly the files the official scorer reads and calls lmmkit's oracle-tested scorers
(`lmmkit.eval.pope`, `lmmkit.eval.scoring.*`). Strict mode gives the official numbers and its printed
text (`lmmkit.eval.rescore_format`); robust mode re-parses the raw responses with lmmkit's parsers and
counts the unparseable ones. Where the official tool would crash, lmmkit scores on and warns.
Every function returns a dict: the metrics per mode, "text" (what the CLI prints), "warnings", "notes".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lmmkit.atomic import atomic_write
from lmmkit.eval import rescore_format as fmt
from lmmkit.eval.pope import SPLITS, parse_official, parse_robust, score_pope_by_position
from lmmkit.eval.rescore_format import PathLike, RescoreError, cannot_read, named
from lmmkit.eval.scoring import mme as mme_scoring
from lmmkit.eval.scoring.mathvista import released_scores_json, robust_extract, score_mathvista
from lmmkit.eval.scoring.mmmu import (
    MULTIPLE_CHOICE,
    SUBJECTS,
    eval_only,
    parse_and_eval,
    parse_multi_choice_robust,
    parse_open_robust,
    score_mmmu,
)
from lmmkit.eval.scoring.mmvet import aggregate_mmvet, read_grade_file

Mode = Literal["strict", "robust", "both"]
MODES: tuple[str, ...] = ("strict", "robust", "both")
__all__ = ["RescoreError", "score_mathvista_output", "score_mme_results", "score_mmmu_eval_only",
           "score_mmmu_outputs", "score_mmvet_grades", "score_pope_files", "score_pope_llava", "score_pope_pairs"]


def _modes(mode: str) -> tuple[bool, bool]:
    if mode not in MODES:
        raise RescoreError(f"mode must be one of {MODES}, got {mode!r}")
    return mode != "robust", mode != "strict"


def _result(task: str, mode: str, files: Mapping[str, Any]) -> dict:
    return {"task": task, "mode": mode, "files": {k: str(v) for k, v in files.items()}, "warnings": [], "notes": []}


def _finish(result: dict, strict_text: str | None, robust_text: str | None) -> dict:
    result["official_text"], result["robust_text"] = strict_text, robust_text
    parts = [strict_text or ""]
    if robust_text is not None:
        header = "" if "not_applicable" in result.get("robust", {}) else fmt.ROBUST_HEADER
        parts.append(("\n" if strict_text else "") + header + robust_text)
    result["text"] = "".join(parts)
    return result


def _not_applicable(result: dict, why: str) -> str:
    result["robust"] = {"not_applicable": why}
    return f"robust: not applicable ({why})\n"


# --------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------

_UNDEFINED = {
    "yes_ratio": "there are no answers", "precision": "TP + FP = 0 (no paired answer is yes)",
    "recall": "TP + FN = 0 (no label is yes)", "f1": "precision + recall = 0", "accuracy": "nothing is paired",
}


def _score_pope_texts(texts: Sequence[str], labels: Sequence[str], mode: str, where: str, result: dict) -> None:
    """Score both ways (as asked) into `result`, with the length and zero-division warnings."""
    strict_on, robust_on = _modes(mode)
    if len(texts) != len(labels):
        dropped = abs(len(texts) - len(labels))
        extra = "answers" if len(texts) > len(labels) else "labels"
        result["warnings"].append(
            f"{where}: {len(texts)} answers but {len(labels)} labels; paired by position as the official "
            f"does (zip), so the last {dropped} {extra} are dropped"
            + (" (they still count in the yes ratio, as in the official)" if extra == "answers" else ""))
    if strict_on:
        result["strict"] = score_pope_by_position([parse_official(t) for t in texts], labels)
        undefined = result["strict"]["undefined"]
        if undefined:
            result["warnings"].append(
                f"{where}: " + "; ".join(f"{m} is undefined: {_UNDEFINED[m]}" for m in undefined)
                + f". The official stops with ZeroDivisionError at {undefined[0]}; lmmkit reports 0.0")
    if robust_on:
        result["robust"] = score_pope_by_position([parse_robust(t) for t in texts], labels)


def score_pope_files(answers: PathLike, labels: PathLike, mode: Mode = "strict") -> dict:
    """POPE evaluate.py on an answer file (JSON lines with "answer") and a label file (JSON lines with
    "label"), paired by line position as the official does."""
    result = _result("pope", mode, {"answers": answers, "labels": labels})
    texts = [row["answer"] for row in fmt.read_jsonl(answers, ("answer",), ("answer",))]
    _score_pope_texts(texts, fmt.read_pope_labels(labels), mode, f"{answers} vs {labels}", result)
    strict, robust = result.get("strict"), result.get("robust")
    return _finish(result, strict and fmt.pope_text(strict),
                   robust and fmt.pope_text(robust) + fmt.unparseable_line(robust["unparseable"], robust["n"]))


def _add_mean_f1(result: dict, entries: Sequence[Mapping], what: str) -> None:
    """Mean F1 over `entries` in their order (float sums depend on it): LLaVA's headline POPE number."""
    for key in ("strict", "robust"):
        f1s = [e[key]["f1"] for e in entries if key in e and "f1" in e[key]]
        if f1s:
            result[f"mean_f1_{key}"] = sum(f1s) / len(f1s)
            result["notes"].append(f"{key} mean F1 over {len(f1s)} {what}: {result[f'mean_f1_{key}']}")


def score_pope_pairs(pairs: Sequence[tuple[PathLike, PathLike]], mode: Mode = "strict") -> dict:
    """`score_pope_files` on several (answers, labels) pairs, plus their mean F1 in the order given."""
    results = [score_pope_files(answers, labels, mode) for answers, labels in pairs]
    if len(results) == 1:
        return results[0]
    merged = {"task": "pope", "mode": mode, "pairs": results, "warnings": [w for r in results for w in r["warnings"]],
              "notes": [], "text": "".join(f"== {r['files']['answers']} vs {r['files']['labels']} ==\n{r['text']}"
                                           for r in results)}
    _add_mean_f1(merged, results, "files, in the order given")
    return merged


def score_pope_llava(answers: PathLike, questions: PathLike, labels_dir: PathLike, mode: Mode = "strict") -> dict:
    """LLaVA's eval_pope.py: answers {question_id, text} joined to the question file's category, then
    each ``coco_pope_<category>.json`` in `labels_dir` paired by position with that category's answers."""
    result = _result("pope", mode, {"answers": answers, "questions": questions, "labels_dir": labels_dir})
    result["format"] = "llava"
    rows = fmt.read_jsonl(answers, ("question_id", "text"), ("text",))
    category = {q["question_id"]: q["category"] for q in fmt.read_jsonl(questions, ("question_id", "category"))}
    for k, row in enumerate(rows, 1):
        if row["question_id"] not in category:
            raise RescoreError(f"{answers}: record {k}: question_id {row['question_id']!r} is not in {questions}")
    label_files = sorted(Path(labels_dir).glob("coco_pope_*.json"))  # LLaVA takes os.listdir order
    if not label_files:
        raise RescoreError(f"{labels_dir}: no coco_pope_<category>.json label files")
    texts = [row["text"] for row in rows]
    result["categories"] = {}
    strict_parts, robust_parts = [], []
    for path in label_files:
        name = path.name[len("coco_pope_"):-len(".json")]
        cur = [t for t, row in zip(texts, rows, strict=True) if category[row["question_id"]] == name]
        entry = {"labels": str(path), "n_answers": len(cur), "warnings": []}
        _score_pope_texts(cur, fmt.read_pope_labels(path), mode, f"{answers} [{name}] vs {path}", entry)
        result["warnings"] += entry.pop("warnings")
        result["categories"][name] = entry
        if "strict" in entry:
            strict_parts.append(fmt.pope_llava_text(name, len(cur), entry["strict"]))
        if "robust" in entry:
            r = entry["robust"]
            robust_parts.append(fmt.pope_llava_text(name, len(cur), r, fmt.unparseable_line(r["unparseable"], r["n"])))
    unscored = sorted({c for c in category.values() if c not in result["categories"]}, key=str)
    n_unscored = sum(category[row["question_id"]] in unscored for row in rows)
    if n_unscored:
        result["warnings"].append(f"{answers}: {n_unscored} answers of categories {unscored} have no label file "
                                  f"in {labels_dir}; not scored (LLaVA's eval_pope.py skips them silently)")
    cats = result["categories"]  # POPE's split order (random, popular, adversarial), then the others
    order = [c for c in SPLITS if c in cats] + [c for c in cats if c not in SPLITS]
    _add_mean_f1(result, [cats[c] for c in order], "categories")
    return _finish(result, "".join(strict_parts) or None, "".join(robust_parts) if robust_parts else None)


# --------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------

def score_mme_results(results_dir: PathLike, mode: Mode = "strict") -> dict:
    """MME calculation.py on a folder of ``<subtask>.txt`` result files (image, question, gt, response)."""
    strict_on, robust_on = _modes(mode)
    result = _result("mme", mode, {"results_dir": results_dir})
    folder = Path(results_dir)
    if not folder.is_dir() or not any(folder.glob("*.txt")):
        raise RescoreError(f"{results_dir}: not a folder of MME <subtask>.txt result files")

    def run(parser: Callable[[str], str | None]) -> dict:
        try:
            return mme_scoring.score_mme_dir(folder, parser, allow_tabs=True)
        except OSError as err:
            raise cannot_read(err, results_dir) from err
        except ValueError as err:  # read_mme_file names file and line
            raise named(err, results_dir) from err

    scored = {name: run(parser) for name, parser, on in
              (("strict", mme_scoring.parse_official, strict_on), ("robust", mme_scoring.parse_robust, robust_on)) if on}
    first = next(iter(scored.values()))
    for path, lines in first["tab_lines"].items():
        result["warnings"] += [f"{path}:{n}: the response holds a tab; the official calculation.py stops here "
                               "(too many values to unpack); lmmkit scores the text after the third tab, tabs "
                               "included, as the response" for n in lines]
    for group, missing in first["missing"].items():
        if missing:
            result["warnings"].append(f"{results_dir}: no {', '.join(t + '.txt' for t in missing)}: the official "
                                      f"stops with FileNotFoundError; the {group} total leaves them out")
    official = (*mme_scoring.PERCEPTION, *mme_scoring.COGNITION)
    others = [t for t in first["tasks"] if t not in official]
    if others:
        result["warnings"].append(f"{results_dir}: {others} are not official subtasks: the official ignores them; "
                                  "lmmkit totals them under 'other_total' (JSON only)")
    result.update(scored)
    robust_text = None
    if "robust" in scored:
        tasks = scored["robust"]["tasks"].values()
        result["robust"]["unparseable"] = sum(t["other_num"] for t in tasks)
        robust_text = fmt.mme_text(scored["robust"]) + fmt.unparseable_line(
            result["robust"]["unparseable"], sum(t["n"] for t in tasks))
    return _finish(result, "strict" in scored and fmt.mme_text(scored["strict"]) or None, robust_text)


# --------------------------------------------------------------------------------------------
# MMMU
# --------------------------------------------------------------------------------------------

def score_mmmu_eval_only(predictions_json: PathLike, answers_json: PathLike, mode: Mode = "strict") -> dict:
    """MMMU main_eval_only.py: {id: final answer} against answer_dict_val.json ({id: {question_type,
    ground_truth}}). There are no raw responses, so robust mode does not apply."""
    strict_on, robust_on = _modes(mode)
    result = _result("mmmu", mode, {"predictions": predictions_json, "answers": answers_json})
    robust_text = robust_on and _not_applicable(result, "eval-only predictions are final answers, not raw responses")
    if not strict_on:
        return _finish(result, None, robust_text or None)
    outputs, answers = fmt.read_mmmu_eval_only(predictions_json, answers_json)
    try:
        strict = eval_only(answers, outputs)
    except ValueError as err:
        raise RescoreError(f"{predictions_json}: {err} ({answers_json})") from err
    if strict["skipped"]:
        result["warnings"].append(f"{predictions_json}: {len(strict['skipped'])} predictions skipped, as the "
                                  f"official does (subject not official or without answers): {strict['skipped'][:5]}")
    result["strict"] = strict
    result["notes"].append(f"overall {strict['correct']}/{strict['total']} = {strict['acc_official']}")
    return _finish(result, fmt.mmmu_dict_line(strict), robust_text or None)


def score_mmmu_outputs(outputs_dir: PathLike, mode: Mode = "strict", all_subjects: bool = False) -> dict:
    """MMMU main_parse_and_eval.py + print_results.py on ``<Subject>/output.json`` raw outputs: the
    official parsers, with the seeded random fallback drawn in the official subject and file order.
    The official reads only its 30 subjects; `all_subjects` also scores other folders (e.g. lmmkit's
    ShapesWorld twin), drawing their fallbacks in alphabetical place."""
    strict_on, robust_on = _modes(mode)
    result = _result("mmmu", mode, {"outputs_dir": outputs_dir})
    root = Path(outputs_dir)
    if not root.is_dir():
        raise RescoreError(f"{outputs_dir}: not a folder of <Subject>/output.json files")
    others = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in SUBJECTS
                    and (d / "output.json").is_file())
    wanted = sorted([*SUBJECTS, *others]) if all_subjects else SUBJECTS
    outputs = {s: fmt.read_mmmu_outputs(root / s / "output.json") for s in wanted if (root / s).is_dir()}
    if not outputs:
        raise RescoreError(f"{outputs_dir}: no folder named after an MMMU subject (e.g. Art/output.json)"
                           + (f"; other subjects {others} are read with --all-subjects" if others else ""))
    if others and not all_subjects:
        result["warnings"].append(f"{outputs_dir}: folders {others} are not MMMU subjects; not read, as the official"
                                  " (--all-subjects reads them)")
    missing = [s for s in SUBJECTS if s not in outputs]
    if missing:
        result["warnings"].append(f"{outputs_dir}: no output for {len(missing)} subjects ({missing[:5]}...); "
                                  "the official skips them too")
    strict_text = robust_text = None
    try:
        if strict_on:
            strict = result["strict"] = parse_and_eval(outputs)
            strict_text = fmt.mmmu_table(strict)
            result["notes"].append(f"overall {strict['correct']}/{strict['total']} = {strict['acc_official']}")
            if strict["random_fallbacks"]:
                result["notes"].append(f"{len(strict['random_fallbacks'])} multiple-choice responses matched no "
                                       f"option and took the seeded random letter: {strict['random_fallbacks']}")
        if robust_on:
            items = [{"id": o["id"], "question_type": o["question_type"], "answer": o["answer"], "subject": s,
                      "parsed_pred": parse_multi_choice_robust(o["response"], o["all_choices"], o["index2ans"])
                      if o["question_type"] == MULTIPLE_CHOICE else parse_open_robust(o["response"])}
                     for s in sorted(outputs) for o in outputs[s]]
            robust = result["robust"] = score_mmmu(items)
            robust["unparseable"] = sum(it["parsed_pred"] is None for it in items)
            robust_text = fmt.mmmu_table(robust) + fmt.unparseable_line(robust["unparseable"], len(items))
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # e.g. a duplicate id, a non-text option
        raise RescoreError(f"{outputs_dir}: {type(err).__name__}: {err}") from err
    return _finish(result, strict_text, robust_text)


# --------------------------------------------------------------------------------------------
# MathVista
# --------------------------------------------------------------------------------------------

def score_mathvista_output(output_json: PathLike, mode: Mode = "strict", scores_out: PathLike | None = None) -> dict:
    """MathVista calculate_score.py on the released output format {pid: problem with "extraction"}.

    `scores_out` gets the scores file in the released format (byte-identical to the official's): the
    strict scores, or the robust ones in robust mode.
    """
    strict_on, robust_on = _modes(mode)
    result = _result("mathvista", mode, {"output": output_json})
    problems = fmt.read_mathvista_output(output_json, strict_on, robust_on)
    strict_text = robust_text = None
    try:
        if strict_on:
            strict = result["strict"] = score_mathvista(problems)
            strict_text = fmt.mathvista_text(strict, problems)
            changed = [pid for pid, p in problems.items() if "prediction" in p and "true_false" in p
                       and {"prediction": p["prediction"], "true_false": p["true_false"]} != strict["per_pid"][pid]]
            if changed:
                result["notes"].append(f"{len(changed)} pids' stored prediction or true_false differ from the "
                                       f"rescored ones (the official rewrites the file; lmmkit does not): {changed[:10]}")
        if robust_on:
            extracted = {pid: {**p, "extraction": robust_extract(p["response"], p)} for pid, p in problems.items()}
            robust = result["robust"] = score_mathvista(extracted)
            robust["unparseable"] = sum(p["extraction"] is None for p in extracted.values())
            robust_text = fmt.mathvista_text(robust, extracted) + fmt.unparseable_line(robust["unparseable"],
                                                                                      len(extracted))
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise RescoreError(f"{output_json}: {type(err).__name__}: {err}") from err
    if scores_out is not None:
        atomic_write(scores_out, released_scores_json(result.get("strict") or result["robust"]).encode("utf-8"))
        result["files"]["scores_out"] = str(scores_out)
    return _finish(result, strict_text, robust_text)


# --------------------------------------------------------------------------------------------
# MM-Vet
# --------------------------------------------------------------------------------------------

_GRADE_FILE = re.compile(r"^(?P<model>.+)_(?P<judge>[^_]+)-grade-(?P<runs>\d+)runs$")


def score_mmvet_grades(grades_json: PathLike, mode: Mode = "strict", mmvet_json: PathLike | None = None) -> dict:
    """MM-Vet's evaluator totals from a grade file ``{id: {score: [one per run]}}``: total per run, their
    mean and population std, numpy-rounded. Per-capability totals need `mmvet_json` (mm-vet.json)."""
    strict_on, robust_on = _modes(mode)
    result = _result("mmvet", mode, {"grades": grades_json, **({"mmvet_json": mmvet_json} if mmvet_json else {})})
    robust_text = robust_on and _not_applicable(result, "the grades are the judge's scores; there is nothing to parse")
    if not strict_on:
        return _finish(result, None, robust_text or None)
    try:
        runs = read_grade_file(grades_json)
    except OSError as err:
        raise cannot_read(err, grades_json) from err
    except ValueError as err:
        raise named(err, grades_json) from err
    capabilities = None if mmvet_json is None else fmt.read_mmvet_capabilities(mmvet_json, list(runs[0]))
    try:
        strict = result["strict"] = aggregate_mmvet(runs, capabilities)
    except ValueError as err:
        raise named(err, grades_json) from err
    name = _GRADE_FILE.match(Path(grades_json).stem)
    strict.update(model=name["model"] if name else Path(grades_json).stem, judge=name and name["judge"],
                  n_runs=len(runs))
    if capabilities is None:
        result["notes"].append("per-capability totals need mm-vet.json (--mmvet-json); capability-set columns "
                               "(cap-int-score) are not computed")
    return _finish(result, fmt.mmvet_text(strict, strict["model"]), robust_text or None)
