"""Read other harnesses' per-item outputs into lmmkit's normalized records: shared parts and VLMEvalKit.

Two sources, four tasks (pope, mme, mmmu, mathvista): lmms-eval ``--log_samples`` files
(`lmmkit.eval.harness_lmms_eval`) and VLMEvalKit prediction files (here): ``<model>_<dataset>.xlsx|tsv|csv``
(``.jsonl`` too), the dataset's columns without the image plus ``prediction``, and in its evaluation
outputs (``*_auxmatch``, ``*_<judge>_result``, ``*_<judge>``) the extraction and verdict columns.

A record is ``{id, task, response, answer, question, meta, harness_score, harness_parsed, harness_method,
harness_judge}``: `harness_score` is the harness's own verdict (1.0/0.0) when it is recorded or follows from
recorded fields; `harness_method` says how the harness decided ("exact": the whole response compared,
"parse": a rule parser, "judge": an LLM-judged field, whose value is `harness_judge`).
"""

from __future__ import annotations

import ast
import csv
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmmkit.eval.rescore_format import RescoreError
from lmmkit.eval.scoring.mathvista import GROUP_KEYS
from lmmkit.eval.scoring.mmmu import MULTIPLE_CHOICE, SUBJECTS, subject_of

PathLike = str | os.PathLike[str]
TASKS: tuple[str, ...] = ("pope", "mme", "mmmu", "mathvista")
HARNESSES: tuple[str, ...] = ("lmms-eval", "vlmevalkit")


class HarnessLogError(RescoreError):
    """A harness file that cannot be read as asked; the message names the file (and line or row)."""


def record(item_id: Any, task: str, response: str | None, answer: Any, question: str | None, meta: dict,
           harness_score: float | None = None, harness_parsed: Any = None, harness_method: str | None = None,
           harness_judge: Any = None) -> dict:
    """One normalized record."""
    return {"id": str(item_id), "task": task, "response": response, "answer": answer, "question": question,
            "meta": meta, "harness_score": harness_score, "harness_parsed": harness_parsed,
            "harness_method": harness_method, "harness_judge": harness_judge}


def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def text(value: Any) -> str | None:
    """A cell as text: ints stay ints ("3", not "3.0"), blanks and NaN are None."""
    if missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def flag(value: Any) -> float | None:
    """A recorded verdict (True/False, 1/0, "True", "1.0") as 1.0/0.0; None when blank."""
    if missing(value):
        return None
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "yes"):
            return 1.0
        if low in ("false", "no"):
            return 0.0
        try:
            return float(float(low) > 0)
        except ValueError:
            return None  # not a verdict
    return float(bool(value))


def literal(value: Any) -> Any:
    """A Python-literal cell (VLMEvalKit and the hub store lists as their repr); the text when not one."""
    if isinstance(value, str) and value.strip()[:1] in "[({":
        try:
            return ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return value
    return value


def mmmu_gold(answer: Any, question_type: str) -> Any:
    """The official gold: an open answer stored as a list's repr ("['6', '6.0']") is that list, as in the
    official answer_dict_val.json (lmms-eval passes the repr string on unchanged)."""
    if question_type != MULTIPLE_CHOICE and isinstance(answer, str) and answer.strip().startswith("["):
        value = literal(answer)
        return [str(v) for v in value] if isinstance(value, list) else answer
    return answer


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def read_table(path: PathLike) -> list[dict]:
    """Rows of a .tsv/.csv/.jsonl/.xlsx file as dicts (header row = keys). .xlsx needs openpyxl."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".csv"):
            csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # predictions can be long
            with open(path, encoding="utf-8", newline="") as f:
                return [dict(row) for row in csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")]
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise HarnessLogError(f"{path}:{lineno}: expected a JSON object")
                        rows.append(row)
            return rows
        if suffix == ".xlsx":
            return _read_xlsx(path)
    except HarnessLogError:
        raise
    except OSError as err:
        raise HarnessLogError(f"{path}: cannot read: {err.strerror or err}") from err
    except (ValueError, csv.Error) as err:
        raise HarnessLogError(f"{path}: not a valid {suffix[1:]} file: {err}") from err
    raise HarnessLogError(f"{path}: unsupported prediction file type {suffix!r} "
                          "(.xlsx, .tsv, .csv or .jsonl)")


def _read_xlsx(path: Path) -> list[dict]:
    try:
        import openpyxl
    except ImportError as err:
        raise HarnessLogError(f"{path}: reading .xlsx needs openpyxl (pip install openpyxl), or save the "
                              "predictions as .tsv or .csv") from err
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except OSError:
        raise
    except Exception as err:  # openpyxl raises zip and format errors of its own kinds
        raise HarnessLogError(f"{path}: not a readable .xlsx file: {err}") from err
    try:
        rows = book.worksheets[0].iter_rows(values_only=True)
        header = [str(h) for h in next(rows, ())]
        return [dict(zip(header, row, strict=False)) for row in rows if any(v is not None for v in row)]
    finally:
        book.close()


# --------------------------------------------------------------------------------------------
# VLMEvalKit
# --------------------------------------------------------------------------------------------

_VLM_DATASETS = (("MMMU", "mmmu"), ("MathVista", "mathvista"), ("POPE", "pope"), ("MME", "mme"))
_VLM_NAME = re.compile(r"(?:^|_)(MMMU|MathVista|POPE|MME)(?:_[A-Z]+)*(?=[_.]|$)")


def detect_vlmevalkit_task(path: PathLike) -> str:
    """The lmmkit task of ``<model>_<dataset>[_...].<ext>``: the last dataset name in the file name."""
    found = _VLM_NAME.findall(Path(path).name)
    if not found:
        raise HarnessLogError(f"{path}: cannot tell the dataset from the file name (POPE, MME, MMMU_DEV_VAL, "
                              "MathVista_MINI); name the task")
    return dict(_VLM_DATASETS)[found[-1]]


def _response(value: Any) -> str | None:
    """VLMEvalKit stores str(prediction): keep "" as "", only a truly absent cell is None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return text(value) if not isinstance(value, str) else value


def _first(row: Mapping, *keys: str) -> Any:
    return next((row[k] for k in keys if k in row and not missing(row[k])), None)


def _vlm_yes_no(row: Mapping, task: str, where: str) -> dict:
    gold_raw = text(row["answer"]) or ""
    if gold_raw.lower() not in ("yes", "no"):
        raise HarnessLogError(f"{where}: answer must be Yes or No, got {gold_raw!r}")
    extracted = text(row.get("extracted"))
    score = flag(row.get("score"))
    if score is None and extracted is not None:
        score = float(extracted == gold_raw)  # VLMEvalKit's score column: answer == extracted, exactly
    meta: dict[str, Any] = {"index": text(row["index"])}
    if task == "pope":  # one question can belong to several splits: "popular,adversarial"
        meta["categories"] = [c.strip() for c in (text(row.get("category")) or "").split(",") if c.strip()]
    else:
        meta.update(category=text(row.get("category")), image=text(row.get("image_path")))
    return record(text(row["index"]), task, _response(row["prediction"]),
                  gold_raw.lower(), text(row.get("question")), meta, score, extracted, "parse")


def _mmmu_subject(row: Mapping, item_id: str) -> str:
    names = [text(row.get(k)) for k in ("category", "l2-category")] + [subject_of(item_id)]
    names = [n.replace(" ", "_") for n in names if n]
    return next((n for n in names if n in SUBJECTS), names[0] if names else "unknown")


def _vlm_mmmu(row: Mapping, where: str) -> dict:
    options = [text(row[c]) for c in "ABCDEFGHIJ" if c in row and not missing(row[c])]
    gold = text(row["answer"])
    if len(options) == 2 and options[1] == "Other Answers" and options[0] == gold:
        options = []  # an open question VLMEvalKit's MMMU_preproc turned into "A = gold, B = Other Answers"
    qtype = text(row.get("question_type")) or (MULTIPLE_CHOICE if options else "open")
    item_id = text(row.get("id")) or text(row["index"])
    letters = [chr(ord("A") + i) for i in range(len(options))]
    log, model = text(row.get("log")), text(row.get("extract_model"))
    prediction = _response(row["prediction"])
    # the rule matcher logs the prediction itself (or "Rule extract ..."); anything else is the judge's reply
    judged = (model not in (None, "rule")) if model is not None else (
        log is not None and log != prediction and not log.startswith("Rule extract"))
    meta = {"index": text(row["index"]), "question_type": qtype, "subject": _mmmu_subject(row, item_id),
            "split": text(row.get("split")) or item_id.split("_")[0], "all_choices": letters,
            "index2ans": dict(zip(letters, options, strict=True))}
    return record(item_id, "mmmu", prediction, mmmu_gold(gold, qtype), text(row.get("question")), meta,
                  flag(_first(row, "hit", "score")), text(_first(row, "opt", "extracted")),
                  "judge" if judged else "parse", log if judged else None)


def _precision(row: Mapping, answer: str | None, answer_type: str) -> int | None:
    value = _first(row, "precision")
    if value is not None:
        return int(float(value))
    if answer_type == "float" and answer and "." in answer:  # not in the file: the answer's decimals
        return len(answer.split(".")[1])
    return None


def _vlm_mathvista(row: Mapping, where: str) -> dict:
    qtype, atype = text(row.get("question_type")), text(row.get("answer_type"))
    if qtype is None or atype is None:
        raise HarnessLogError(f"{where}: a MathVista row needs question_type and answer_type")
    choices = literal(row.get("choices")) if not missing(row.get("choices")) else None
    answer = text(row["answer"])
    meta_keys = [k for k in GROUP_KEYS
                 if k not in ("question_type", "answer_type") and not missing(row.get(k))]
    problem = {"question_type": qtype, "answer_type": atype,
               "choices": choices if isinstance(choices, list) else None,
               "precision": _precision(row, answer, atype), "unit": text(row.get("unit")),
               "metadata": {k: literal(row[k]) if k == "skills" else row[k] for k in meta_keys}}
    res, log = text(row.get("res")), text(row.get("log"))
    judged = res is not None and log != "Prefetch succeed"  # prefetch = VLMEvalKit's own rule match
    return record(text(_first(row, "pid", "index")), "mathvista", _response(row["prediction"]), answer,
                  text(row.get("question")), {"index": text(row["index"]), "problem": problem,
                                               "harness_extraction": res},
                  flag(_first(row, "hit", "true_false", "score")), None, "judge" if judged else "parse",
                  res if judged else None)


def read_vlmevalkit(path: PathLike, task: str | None = None) -> tuple[str, list[dict]]:
    """(task, records) of a VLMEvalKit prediction (or evaluation output) file."""
    task = task or detect_vlmevalkit_task(path)
    if task not in TASKS:
        raise HarnessLogError(f"unknown task {task!r}; choose from {list(TASKS)}")
    rows = read_table(path)
    if not rows:
        raise HarnessLogError(f"{path}: no rows")
    missing_cols = [c for c in ("index", "prediction", "answer") if c not in rows[0]]
    if missing_cols:
        raise HarnessLogError(f"{path}: no {', '.join(missing_cols)} column (a VLMEvalKit prediction file "
                              "has index, question, answer, prediction, ...)")
    out = []
    for k, row in enumerate(rows, 2):  # row 1 is the header
        where = f"{path}: row {k}"
        if task in ("pope", "mme"):
            out.append(_vlm_yes_no(row, task, where))
        elif task == "mmmu":
            out.append(_vlm_mmmu(row, where))
        else:
            out.append(_vlm_mathvista(row, where))
    return task, out
