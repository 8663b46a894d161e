"""Rescore lmms-eval ``--log_samples`` files and VLMEvalKit prediction files with the official rules.

`read_log` turns either harness's file into lmmkit's normalized records (`lmmkit.eval.harness_readers`,
`lmmkit.eval.harness_lmms_eval`); `rescore_log` scores them with lmmkit's oracle-tested scorers, strict (the
official rules) and robust (lmmkit's parsers), and recomputes the harness's own aggregate from its per-item
fields where it can. MathVista's official pipeline ends in an LLM extractor: where the official rules cannot
read a response, strict uses the extraction the harness recorded instead (counted in "judge_extractions").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmmkit.eval import pope
from lmmkit.eval.harness_diff import diff_scorings, reason_counts, scoring_view
from lmmkit.eval.harness_lmms_eval import read_lmms_eval
from lmmkit.eval.harness_readers import HARNESSES, TASKS, HarnessLogError, PathLike, read_vlmevalkit
from lmmkit.eval.scoring import mme
from lmmkit.eval.scoring.mathvista import quick_extract, robust_extract, score_mathvista
from lmmkit.eval.scoring.mmmu import (
    MULTIPLE_CHOICE,
    parse_and_eval,
    parse_multi_choice_robust,
    parse_open_robust,
    score_mmmu,
)
from lmmkit.eval.tasks.mme import as_result_file_text

__all__ = ["HARNESSES", "TASKS", "HarnessLogError", "detect_harness", "read_log", "rescore_log",
           "rescore_records"]


def detect_harness(path: PathLike) -> str:
    """Which harness wrote `path`: vlmevalkit for a table (or rows with "prediction"), else lmms-eval."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".tsv", ".csv"):
        return "vlmevalkit"
    if suffix in (".jsonl", ".json"):
        try:
            with open(path, encoding="utf-8") as f:
                head = f.read(4096 if suffix == ".jsonl" else 2**16)
        except OSError as err:
            raise HarnessLogError(f"{path}: cannot read: {err.strerror or err}") from err
        if '"doc_id"' in head or '"logs"' in head:
            return "lmms-eval"
        if '"prediction"' in head:
            return "vlmevalkit"
    raise HarnessLogError(f"{path}: cannot tell which harness wrote it; give --from lmms-eval|vlmevalkit")


def read_log(path: PathLike, task: str | None = None,
             harness: str | None = None) -> tuple[str, str, list[dict]]:
    """(harness, task, records) of an lmms-eval or VLMEvalKit file; either is detected when left out."""
    harness = harness or detect_harness(path)
    if harness not in HARNESSES:
        raise HarnessLogError(f"unknown harness {harness!r}; choose from {list(HARNESSES)}")
    task, records = (read_lmms_eval if harness == "lmms-eval" else read_vlmevalkit)(path, task)
    if not records:
        raise HarnessLogError(f"{path}: no items")
    return harness, task, records


def _entry(parsed: Any, correct: bool | None, method: str = "parse", judge: Any = None, **extra: Any) -> dict:
    return {"parsed": parsed, "correct": correct, "judge": judge, "method": method, **extra}


def _text_or_none(parser: Callable[[str], Any], response: str | None) -> Any:
    return parser(response) if isinstance(response, str) else None  # no response: nothing to parse


# --------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------

def _pope_metrics(parsed: Sequence[str | None], recs: Sequence[Mapping]) -> dict:
    labels = [r["answer"] for r in recs]
    cats = list(dict.fromkeys(c for r in recs for c in r["meta"].get("categories", [])))
    cats = [c for c in pope.SPLITS if c in cats] + [c for c in cats if c not in pope.SPLITS]
    splits = {}
    for c in cats:
        idx = [i for i, r in enumerate(recs) if c in r["meta"].get("categories", [])]
        splits[c] = pope.score_pope([parsed[i] for i in idx], [labels[i] for i in idx])
    mean_f1 = sum(s["f1"] for s in splits.values()) / len(splits) if splits else None
    return {"overall": pope.score_pope(parsed, labels), "splits": splits, "mean_f1": mean_f1}


def _pope_harness(recs: Sequence[Mapping], harness: str) -> dict | None:
    if any(r["harness_score"] is None or r["harness_parsed"] is None for r in recs):
        return None
    if harness == "lmms-eval":  # its aggregation: answers other than yes/no count in neither P nor R
        pairs = [(r["harness_parsed"], r["answer"]) for r in recs]
        tp = sum(p == "yes" and g == "yes" for p, g in pairs)
        fp = sum(p == "yes" and g == "no" for p, g in pairs)
        fn = sum(p == "no" and g == "yes" for p, g in pairs)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"accuracy": sum(r["harness_score"] for r in recs) / len(recs), "precision": precision,
                "recall": recall, "f1": f1,
                "yes_ratio": sum(g == "yes" for _, g in pairs) / len(pairs), "n": len(recs),
                "yes_ratio_is": "the share of yes labels (lmms-eval's pope_yes_ratio), not of yes answers"}

    def block(rows: Sequence[Mapping]) -> dict:  # VLMEvalKit: anything but "Yes" (Unknown too) is a no
        said = ["yes" if r["harness_parsed"] == "Yes" else "no" for r in rows]
        m = pope.score_pope(said, [r["answer"] for r in rows])
        return {"f1": m["f1"], "accuracy": sum(r["harness_score"] for r in rows) / len(rows),
                "precision": m["precision"], "recall": m["recall"], "n": len(rows)}

    exploded = [(r, c) for r in recs for c in (r["meta"].get("categories") or [None])]
    cats = list(dict.fromkeys(c for _, c in exploded if c is not None))
    return {"overall": block([r for r, _ in exploded]),
            "splits": {c: block([r for r, cc in exploded if cc == c]) for c in cats},
            "overall_counts": "each question once per split it belongs to (VLMEvalKit explodes the category)"}


def _score_pope(recs: Sequence[Mapping], harness: str, result: dict) -> None:
    for mode, parser in (("strict", pope.parse_official), ("robust", pope.parse_robust)):
        parsed = [_text_or_none(parser, r["response"]) for r in recs]
        result[mode] = _pope_metrics(parsed, recs)
        result["unparseable"][mode] = result[mode]["overall"]["unparseable"]
        for item, p, r in zip(result["items"], parsed, recs, strict=True):
            item[mode] = _entry(p, p == r["answer"])
    result["harness_own"] = _pope_harness(recs, harness)


# --------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------

def _mme_pairs(recs: Sequence[Mapping], warnings: list[str]) -> list[list[int]]:
    """Record indices by (category, image) in first-seen order; an image without exactly two questions is
    left out (acc+ needs both). Without an image name, consecutive questions of a category pair up."""
    groups: dict[tuple, list[int]] = {}
    counts: dict[Any, int] = {}
    for i, r in enumerate(recs):
        cat = r["meta"].get("category")
        image = r["meta"].get("image")
        if image is None:
            counts[cat] = counts.get(cat, 0) + 1
            image = f"pair {(counts[cat] + 1) // 2}"
        groups.setdefault((cat, image), []).append(i)
    bad = [key for key, idx in groups.items() if len(idx) != 2]
    if bad:
        warnings.append(f"{len(bad)} MME images without exactly two questions left out of all scores: "
                        f"{bad[:5]}")
    return [idx for idx in groups.values() if len(idx) == 2]


def _mme_score(recs: Sequence[Mapping], pairs: list[list[int]], labels: Sequence[str]) -> dict:
    subtasks: dict[str, list] = {}
    for idx in pairs:
        for i in idx:
            r = recs[i]
            row = (r["meta"].get("image"), r["answer"], labels[i])
            subtasks.setdefault(str(r["meta"].get("category")), []).append(row)
    return mme.score_mme(subtasks)


def _score_mme(recs: Sequence[Mapping], harness: str, result: dict) -> None:
    pairs = _mme_pairs(recs, result["warnings"])
    kept = {i for idx in pairs for i in idx}

    def official(response: str) -> str:  # as the tool reads it back from a result file
        return mme.parse_official(as_result_file_text(response))

    for mode, parser in (("strict", official), ("robust", mme.parse_robust)):
        labels = [_text_or_none(parser, r["response"]) or "other" for r in recs]
        result[mode] = _mme_score(recs, pairs, labels)
        result["unparseable"][mode] = sum(t["other_num"] for t in result[mode]["tasks"].values())
        for i, (item, r) in enumerate(zip(result["items"], recs, strict=True)):
            item[mode] = _entry(labels[i], labels[i] == r["answer"] if i in kept else None)
    if all(r["harness_score"] is not None for r in recs):  # the same arithmetic as both harnesses
        labels = [r["answer"] if r["harness_score"] else "other" for r in recs]
        own = _mme_score(recs, pairs, labels)
        # only verdicts are recorded: the confusion counts of a wrong answer are unknown
        own["tasks"] = {t: {k: v[k] for k in ("acc", "acc_plus", "score", "n", "images")}
                        for t, v in own["tasks"].items()}
        result["harness_own"] = own


# --------------------------------------------------------------------------------------------
# MMMU
# --------------------------------------------------------------------------------------------

def _score_mmmu(recs: Sequence[Mapping], harness: str, result: dict) -> None:
    splits = list(dict.fromkeys(r["meta"].get("split") for r in recs))
    scored = list(range(len(recs)))
    if "validation" in splits and len(splits) > 1:
        scored = [i for i, r in enumerate(recs) if r["meta"].get("split") == "validation"]
        result["notes"].append(f"scored the {len(scored)} validation items (the official MMMU val score); "
                               f"{len(recs) - len(scored)} items of other splits ({splits}) left out")
    no_options = [recs[i]["id"] for i in scored if recs[i]["meta"]["question_type"] == MULTIPLE_CHOICE
                  and not recs[i]["meta"]["all_choices"]]
    if no_options:
        result["warnings"].append(f"{len(no_options)} multiple-choice items without options left out: "
                                  f"{no_options[:5]}")
        scored = [i for i in scored if recs[i]["id"] not in set(no_options)]
    by_subject: dict[str, list[dict]] = {}
    robust_items = []
    for i in scored:
        r, meta = recs[i], recs[i]["meta"]
        out = {"id": r["id"], "question_type": meta["question_type"], "answer": r["answer"],
               "all_choices": meta["all_choices"], "index2ans": meta["index2ans"],
               "response": r["response"] or ""}
        by_subject.setdefault(meta["subject"], []).append(out)
        mine = (parse_multi_choice_robust(out["response"], meta["all_choices"], meta["index2ans"])
                if meta["question_type"] == MULTIPLE_CHOICE else parse_open_robust(out["response"]))
        robust_items.append({**out, "parsed_pred": mine, "subject": meta["subject"]})
    try:
        strict = parse_and_eval(by_subject)
        robust = score_mmmu(robust_items)
    except (ValueError, TypeError, KeyError) as err:  # e.g. a duplicate id
        raise HarnessLogError(f"MMMU: {type(err).__name__}: {err}") from err
    fallbacks = set(strict["random_fallbacks"])
    robust_parsed = {x["id"]: x["parsed_pred"] for x in robust_items}
    for i in scored:
        item, rid = result["items"][i], recs[i]["id"]
        got = strict["items"][rid]
        item["strict"] = _entry(got["parsed_pred"], got["correct"], random_letter=rid in fallbacks)
        item["robust"] = _entry(robust_parsed[rid], robust["judges"][rid])
    for agg in (strict, robust):
        agg.pop("judges", None)
    strict.pop("items", None)
    result["strict"], result["robust"] = strict, robust
    result["unparseable"] = {"strict": len(fallbacks),
                             "robust": sum(x["parsed_pred"] is None for x in robust_items)}
    result["harness_own"] = _accuracy([recs[i] for i in scored], "subject", every=recs)


def _accuracy(recs: Sequence[Mapping], group: str | None = None,
              every: Sequence[Mapping] | None = None) -> dict | None:
    """The harness's own accuracy from its per-item verdicts (and per `group`; per split over `every`)."""
    if not recs or any(r["harness_score"] is None for r in recs):
        return None
    out: dict[str, Any] = {"correct": int(sum(r["harness_score"] for r in recs)), "total": len(recs)}
    out["acc"] = out["correct"] / out["total"]
    if group is not None:
        groups: dict[str, list[float]] = {}
        for r in recs:
            groups.setdefault(str(r["meta"].get(group)), []).append(r["harness_score"])
        out[f"by_{group}"] = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
    if every is not None and all(r["harness_score"] is not None for r in every):
        splits: dict[str, list[float]] = {}
        for r in every:
            splits.setdefault(str(r["meta"].get("split")), []).append(r["harness_score"])
        out["by_split"] = {s: sum(v) / len(v) for s, v in splits.items()}
    return out


# --------------------------------------------------------------------------------------------
# MathVista
# --------------------------------------------------------------------------------------------

def _score_mathvista(recs: Sequence[Mapping], harness: str, result: dict) -> None:
    problems = {r["id"]: {**r["meta"]["problem"], "answer": r["answer"]} for r in recs}
    if len(problems) != len(recs):
        raise HarnessLogError("MathVista: duplicate problem ids")
    strict_ext, judged = {}, {}
    for r in recs:
        ext = quick_extract(r["response"] or "", problems[r["id"]])
        if ext is None and r["meta"].get("harness_extraction") is not None:
            ext = judged[r["id"]] = str(r["meta"]["harness_extraction"])  # stands in for the official LLM
        strict_ext[r["id"]] = ext
    robust_ext = {r["id"]: robust_extract(r["response"] or "", problems[r["id"]]) for r in recs}
    for mode, exts in (("strict", strict_ext), ("robust", robust_ext)):
        scored = score_mathvista({pid: {**p, "extraction": exts[pid]} for pid, p in problems.items()})
        for item in result["items"]:
            got = scored["per_pid"][item["id"]]
            judge = judged.get(item["id"]) if mode == "strict" else None
            method = "judge" if judge is not None else "parse"
            item[mode] = _entry(got["prediction"], got["true_false"], method, judge,
                                extraction=exts[item["id"]])
        scored.pop("per_pid")
        result[mode] = scored
        result["unparseable"][mode] = sum(e is None for e in exts.values())
    result["strict"]["judge_extractions"] = len(judged)
    if judged:
        result["notes"].append(f"{len(judged)} responses the official rules cannot read were scored with the "
                               f"extraction {harness} recorded (the official pipeline asks its LLM there)")
    own = _accuracy(recs)
    if own is not None:
        own["accuracy_pct"] = round(own["acc"] * 100, 2)  # lmms-eval's reported number
    elif harness == "vlmevalkit":
        result["notes"].append("VLMEvalKit keeps no per-item MathVista verdict (MathVista_acc recomputes "
                               "it from 'res'); its own aggregate is not recomputed")
    result["harness_own"] = own


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

_SCORERS = {"pope": _score_pope, "mme": _score_mme, "mmmu": _score_mmmu, "mathvista": _score_mathvista}


def rescore_records(records: Sequence[Mapping], task: str, harness: str, source: str = "") -> dict:
    """Score normalized records strictly and robustly; the harness's own aggregate when recomputable."""
    if task not in _SCORERS:
        raise HarnessLogError(f"unknown task {task!r}; choose from {list(TASKS)}")
    result: dict[str, Any] = {
        "task": task, "harness": harness, "file": source, "n_items": len(records), "warnings": [],
        "notes": [], "unparseable": {}, "harness_own": None,
        "items": [{"id": r["id"], "response": r["response"], "answer": r["answer"],
                   "strict": _entry(None, None), "robust": _entry(None, None),
                   "harness": _entry(r["harness_parsed"],
                                     None if r["harness_score"] is None else bool(r["harness_score"]),
                                     r["harness_method"] or "parse", r["harness_judge"])} for r in records]}
    _SCORERS[task](records, harness, result)
    diffs = diff_scorings(scoring_view(result, "strict"), scoring_view(result, "harness"))
    result["disagreements"] = {"strict_vs_harness": reason_counts(diffs), "n": len(diffs)}
    return result


def rescore_log(path: PathLike, task: str | None = None, harness: str | None = None) -> dict:
    """Read an lmms-eval or VLMEvalKit file and rescore it (see `rescore_records`); harness and task are
    detected when left out. Returns metrics per scoring ("strict", "robust", "harness_own"; None when the file
    holds no per-item verdicts), "unparseable", "items" (each with its strict, robust and harness verdict),
    "disagreements" (strict vs harness, by reason), "warnings" and "notes"."""
    harness, task, records = read_log(path, task, harness)
    return rescore_records(records, task, harness, str(path))


def dump_result(result: Mapping) -> str:
    """`result` as the --json file holds it."""
    return json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n"
