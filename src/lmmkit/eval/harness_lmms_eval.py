"""lmms-eval ``--log_samples`` output read into lmmkit's normalized records (see `harness_readers`).

Files: ``<output>/<model>/<date>_samples_<task>.jsonl``, one sample per line: doc_id, target, filtered_resps
(and resps when they differ), doc_hash, prompt_hash, target_hash, input (the prompt), and the task's own
per-item metric fields (recent versions drop ``doc``); or the older ``<task>.json`` with a ``logs`` list of
samples that keep ``doc`` (the dataset row without its image fields). Fields used, per task:

* pope (``pope``, ``pope_*``): ``pope_accuracy`` {question_id, score, prediction, ground_truth}; doc
  question_id, question, answer, category.
* mme: ``mme_percetion_score`` or ``mme_cognition_score`` {question_id (the image), category, score}; doc
  question, answer.
* mmmu (``mmmu_val``): ``mmmu_acc`` {id, subdomain, question_type, answer, parsed_pred}; doc options (else
  the "A. ..." lines of ``input``).
* mathvista (``mathvista_testmini``): ``llm_as_judge_eval`` (``gpt_eval_score`` in older versions)
  {question_id, query, choices, answer, extraction, prediction, true_false, question_type, answer_type,
  precision, metadata}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmmkit.eval.harness_readers import (
    TASKS,
    HarnessLogError,
    PathLike,
    flag,
    literal,
    mmmu_gold,
    record,
)
from lmmkit.eval.scoring.mathvista import _QUOTED_ANSWER as QUOTED_ANSWER
from lmmkit.eval.scoring.mathvista import quick_extract
from lmmkit.eval.scoring.mmmu import MULTIPLE_CHOICE, eval_multi_choice, eval_open, subject_of


def load_lmms_eval_samples(path: PathLike) -> list[dict]:
    """The samples of an lmms-eval log: JSON lines, or the older JSON file with a "logs" list."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise HarnessLogError(f"{path}: cannot read: {err.strerror or err}") from err
    data = None
    if path.suffix.lower() == ".json":  # the older layout; a .json holding JSON lines is read as lines
        try:
            data = json.loads(text)
        except ValueError:
            data = None
    if data is not None:
        if not isinstance(data, dict) or not isinstance(data.get("logs"), list):
            raise HarnessLogError(f"{path}: expected lmms-eval's samples file with a 'logs' list")
        samples = data["logs"]
    else:
        samples = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    samples.append(json.loads(line))
                except ValueError as err:
                    raise HarnessLogError(f"{path}:{lineno}: not a JSON object: {err}") from err
    for k, s in enumerate(samples, 1):
        if not isinstance(s, dict) or "doc_id" not in s:
            raise HarnessLogError(f"{path}: sample {k}: not an lmms-eval sample (no doc_id)")
    return samples


_LMMS_METRIC_TASK = {"pope_accuracy": "pope", "mme_percetion_score": "mme", "mme_cognition_score": "mme",
                     "mmmu_acc": "mmmu", "llm_as_judge_eval": "mathvista", "gpt_eval_score": "mathvista"}
_LMMS_FILE = re.compile(r"_samples_(?P<task>.+)\.jsonl$")


def detect_lmms_eval_task(path: PathLike, samples: Sequence[Mapping]) -> str:
    """The lmmkit task of an lmms-eval log, from its per-item metric keys, else its file name."""
    for sample in samples[:5]:
        for key, task in _LMMS_METRIC_TASK.items():
            if key in sample:
                return task
    name = Path(path).name
    m = _LMMS_FILE.search(name)
    stem = (m["task"] if m else Path(path).stem).lower()
    for prefix, task in (("pope", "pope"), ("mmmu_val", "mmmu"), ("mathvista_testmini", "mathvista")):
        if stem.startswith(prefix):
            return task
    if stem == "mme":
        return "mme"
    raise HarnessLogError(f"{path}: cannot tell the task (no pope/mme/mmmu/mathvista metric field); name it")


def _lmms_response(sample: Mapping) -> str | None:
    """The model's answer: filtered_resps (or resps), unwrapped from its one-element lists."""
    for key in ("filtered_resps", "resps"):
        value = sample.get(key)
        while isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, str):
            return value
    return None


_PROMPT_OPTION = re.compile(r"^([A-Z])\. (.*)$", re.M)


def _options_from_prompt(prompt: Any) -> list[str]:
    """MMMU options from lmms-eval's logged prompt ("A. text" lines, A first): used when `doc` was dropped."""
    found = _PROMPT_OPTION.findall(prompt) if isinstance(prompt, str) else []
    options = []
    for letter, text in found:
        if letter == chr(ord("A") + len(options)):
            options.append(text)
        elif letter == "A":  # a later "A." list restarts it (the question itself may contain one)
            options = [text]
    return options


def _lmms_pope(s: Mapping, doc: Mapping, response: str | None, where: str) -> dict:
    m = s.get("pope_accuracy") or {}
    gold = str(doc.get("answer", m.get("ground_truth", s.get("target", "")))).strip().lower()
    if gold not in ("yes", "no"):
        raise HarnessLogError(f"{where}: POPE answer must be yes or no, got {gold!r}")
    item_id = doc.get("question_id", m.get("question_id", s["doc_id"]))
    # lmms-eval scores the lower-cased, stripped response by exact comparison with the label
    return record(item_id, "pope", response, gold, doc.get("question"),
                  {"doc_id": s["doc_id"], "categories": [doc["category"]] if doc.get("category") else []},
                  flag(m.get("score")), m.get("prediction"), "exact")


def _lmms_mme(s: Mapping, doc: Mapping, response: str | None, where: str, seen: dict[str, int]) -> dict:
    m = s.get("mme_percetion_score") or s.get("mme_cognition_score") or {}
    gold = str(doc.get("answer", s.get("target", ""))).strip().rstrip(".").lower()
    if gold not in ("yes", "no"):
        raise HarnessLogError(f"{where}: MME answer must be Yes or No, got {gold!r}")
    image = str(doc.get("question_id", m.get("question_id", s["doc_id"])))
    category = doc.get("category", m.get("category"))
    seen[image] = seen.get(image, 0) + 1
    return record(f"{image}#{seen[image]}", "mme", response, gold, doc.get("question"),
                  {"doc_id": s["doc_id"], "category": category, "image": image},
                  flag(m.get("score")), None, "parse")


def mmmu_harness_verdict(question_type: str, answer: Any, parsed: Any) -> float | None:
    """lmms-eval's per-item MMMU verdict from its recorded parsed_pred (a list of them in its pass@k form):
    the official judges on its own gold, unconverted."""
    if parsed is None:
        return None
    judge: Callable[[Any, Any], bool] = eval_multi_choice if question_type == MULTIPLE_CHOICE else eval_open
    return float(any(judge(answer, p) for p in _passes(question_type, parsed)))


def _passes(question_type: str, parsed: Any) -> list:
    """parsed_pred as a list of attempts: the pass@k form is a list (of letters, or of open-parse lists)."""
    multiple = question_type == MULTIPLE_CHOICE
    several = isinstance(parsed, list) and (multiple or all(isinstance(p, list) for p in parsed))
    return parsed if several else [parsed]


def _lmms_mmmu(s: Mapping, doc: Mapping, response: str | None, where: str) -> dict:
    m = s.get("mmmu_acc") or s.get("mmmu_acc_pass_at_k") or {}
    item_id, qtype = doc.get("id", m.get("id")), doc.get("question_type", m.get("question_type"))
    if item_id is None or qtype is None:
        raise HarnessLogError(f"{where}: an MMMU sample needs doc or mmmu_acc with id and question_type")
    raw_answer = doc.get("answer", m.get("answer", s.get("target")))
    if "options" in doc:
        options = [str(o) for o in literal(doc["options"])]
    else:
        options = _options_from_prompt(s.get("input"))
    letters = [chr(ord("A") + i) for i in range(len(options))]
    meta = {"doc_id": s["doc_id"], "question_type": qtype, "subject": subject_of(str(item_id)),
            "split": str(item_id).split("_")[0], "all_choices": letters,
            "index2ans": dict(zip(letters, options, strict=True))}
    parsed = m.get("parsed_pred")
    passes = _passes(qtype, parsed) if parsed is not None else []
    return record(item_id, "mmmu", response, mmmu_gold(raw_answer, qtype), doc.get("question"), meta,
                  mmmu_harness_verdict(qtype, raw_answer, parsed), passes[0] if len(passes) == 1 else parsed,
                  "parse")


def _lmms_mathvista(s: Mapping, doc: Mapping, response: str | None, where: str) -> dict:
    m = s.get("llm_as_judge_eval") or s.get("gpt_eval_score") or s.get("submission") or {}
    src = {**m, **doc}
    if "question_type" not in src or "answer_type" not in src:
        raise HarnessLogError(f"{where}: a MathVista sample needs doc or llm_as_judge_eval with the problem")
    keys = ("question_type", "answer_type", "choices", "precision", "unit", "query")
    problem = {k: src.get(k) for k in keys}
    problem["metadata"] = src.get("metadata") or {}
    extraction = m.get("extraction")
    # lmms-eval runs the official rule steps on the stripped response before its LLM extractor, except the
    # quoted-answer rule, which its default (quick_extract: false) leaves to the LLM
    text = (response or "").strip()
    by_rules = quick_extract(text, problem) is not None and not QUOTED_ANSWER.search(text)
    judged = extraction is not None and not by_rules
    return record(src.get("pid", m.get("question_id", s["doc_id"])), "mathvista", response, src.get("answer"),
                  src.get("question"),
                  {"doc_id": s["doc_id"], "problem": problem, "harness_extraction": extraction},
                  flag(m.get("true_false")), m.get("prediction"), "judge" if judged else "parse",
                  extraction if judged else None)


def read_lmms_eval(path: PathLike, task: str | None = None) -> tuple[str, list[dict]]:
    """(task, records) of an lmms-eval ``--log_samples`` file."""
    samples = load_lmms_eval_samples(path)
    task = task or detect_lmms_eval_task(path, samples)
    if task not in TASKS:
        raise HarnessLogError(f"unknown task {task!r}; choose from {list(TASKS)}")
    seen: dict[str, int] = {}
    out = []
    for k, s in enumerate(sorted(samples, key=lambda x: x["doc_id"]), 1):
        doc = s.get("doc") if isinstance(s.get("doc"), dict) else {}
        where, response = f"{path}: sample {k} (doc_id {s['doc_id']})", _lmms_response(s)
        if task == "pope":
            out.append(_lmms_pope(s, doc, response, where))
        elif task == "mme":
            out.append(_lmms_mme(s, doc, response, where, seen))
        elif task == "mmmu":
            out.append(_lmms_mmmu(s, doc, response, where))
        else:
            out.append(_lmms_mathvista(s, doc, response, where))
    return task, out
