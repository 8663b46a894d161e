"""Task statistics for the bootstrap (POPE F1 by image, accuracy, MME scores, judge grades), each
task's intervals, and the paired comparison of two eval runs (`lmmkit compare`)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lmmkit.eval.pope import SPLITS, score_pope
from lmmkit.eval.scoring.mme import COGNITION, PERCEPTION
from lmmkit.eval.stats import (
    ALPHA,
    RIGHT_WRONG,
    Record,
    Resample,
    Statistic,
    _evaluate,
    _interval,
    _paired_summary,
    mcnemar,
)


def _ratio(num: np.ndarray, den: np.ndarray, empty: float = math.nan) -> np.ndarray:
    return np.divide(num, den, out=np.full(np.shape(num), empty), where=den != 0)


def _split(r: Record) -> str:
    return str(r["id"]).split("/", 1)[0]  # POPE ids are "split/question_id"


def _subtask(r: Record) -> str:
    return str(r["id"]).rsplit("/", 1)[0]  # MME ids are "subtask/line"


def pope_f1(records: Sequence[Record], parser: str = "strict") -> float:
    """F1 (yes = positive) of the records' parsed answers against their labels: `score_pope`'s number."""
    return score_pope([r[parser] for r in records], [r["answer"] for r in records])["f1"]


def pope_statistic(parser: str = "strict", split: str | None = None) -> Statistic:
    """F1 of one split, or (split None) the mean F1 over the splits present, as POPE's mean_f1."""
    def splits(records: Sequence[Record]) -> list[str]:
        return [split] if split else [s for s in SPLITS if any(_split(r) == s for r in records)]

    def fn(records: Sequence[Record]) -> float:
        f1s = [pope_f1([r for r in records if _split(r) == s], parser) for s in splits(records)]
        return sum(f1s) / len(f1s) if f1s else 0.0

    def vectorised(records: Sequence[Record]) -> Callable[[Resample], np.ndarray]:
        # score_pope itself classifies each item (its unparseable rule included) as TP, FP or FN;
        # the resamples only recount those cells, with score_pope's arithmetic (zero denominator -> 0)
        pairs = [(r[parser], r["answer"]) for r in records]
        memo = {pair: score_pope([pair[0]], [pair[1]]) for pair in dict.fromkeys(pairs)}
        cells = np.array([[memo[p][k] for k in ("tp", "fp", "fn")] for p in pairs], dtype=np.float64)
        cells = cells.reshape(-1, 3)
        masks = [np.array([_split(r) == s for r in records], dtype=np.float64) for s in splits(records)]

        def f1s(block: Resample) -> np.ndarray:
            out = []
            for mask in masks:
                tp, fp, fn = (block.total(cells[:, j] * mask) for j in range(3))
                precision, recall = _ratio(tp, tp + fp, 0.0), _ratio(tp, tp + fn, 0.0)
                out.append(_ratio(2 * precision * recall, precision + recall, 0.0))
            return sum(out) / len(out)
        return f1s
    return Statistic(fn, vectorised)


def _flags(records: Sequence[Record], parser: str) -> np.ndarray:
    return np.array([bool(r[f"correct_{parser}"]) for r in records], dtype=np.float64)


def _item_mean(values: Callable[[Sequence[Record]], np.ndarray], scale: float = 1.0) -> Statistic:
    """The mean of a per-item value, times `scale`."""
    def vectorised(records: Sequence[Record]) -> Callable[[Resample], np.ndarray]:
        x = values(records)
        return lambda block: _ratio(block.total(x), block.total(np.ones_like(x))) * scale

    def fn(records: Sequence[Record]) -> float:
        return float(values(records).mean() * scale) if len(records) else 0.0
    return Statistic(fn, vectorised)


def accuracy_statistic(parser: str = "strict") -> Statistic:
    """Accuracy: the share of records with correct_<parser> true."""
    return _item_mean(lambda records: _flags(records, parser))


def chair_statistic(kind: str = "s") -> Statistic:
    """CHAIR_s (share of captions with a hallucinated object) or CHAIR_i (hallucinated mentions over all
    mentions, a ratio of per-caption totals, so resampled as one)."""
    if kind == "s":
        return _item_mean(lambda records: np.array([bool(r["hallucinated"]) for r in records], dtype=np.float64))

    def counts(records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([len(r["hallucinated"]) for r in records], dtype=np.float64),
                np.array([len(r["mentioned"]) for r in records], dtype=np.float64))

    def vectorised(records: Sequence[Record]) -> Callable[[Resample], np.ndarray]:
        fake, said = counts(records)
        return lambda block: _ratio(block.total(fake), block.total(said), empty=0.0)

    def fn(records: Sequence[Record]) -> float:
        fake, said = counts(records)
        return float(fake.sum() / said.sum()) if said.sum() else 0.0
    return Statistic(fn, vectorised)


def grade_statistic(field: str = "scores", scale: float = 1.0) -> Statistic:
    """Mean over items of each item's mean grade over judge runs (`field`), times `scale` (MM-Vet: 100)."""
    return _item_mean(lambda records: np.array([sum(r[field]) / len(r[field]) if r[field] else 0.0
                                                for r in records], dtype=np.float64), scale)


def accuracy(records: Sequence[Record], parser: str = "strict") -> float:
    """Share of records with correct_<parser> true (MMMU, MathVista)."""
    return accuracy_statistic(parser)(records)


def mean_grade(records: Sequence[Record], field: str = "scores", scale: float = 1.0) -> float:
    """Mean of the per-item mean grades over judge runs, times `scale` (MM-Vet: "scores", 100)."""
    return grade_statistic(field, scale)(records)


def _images_right(records: Sequence[Record], right: Sequence[float]) -> dict[str, bool]:
    """Per cluster (image), whether every one of its answers is right."""
    out: dict[str, bool] = {}
    for r, ok in zip(records, right, strict=True):
        out[r["cluster"]] = out.get(r["cluster"], True) and bool(ok)
    return out


def mme_score(records: Sequence[Record], parser: str = "strict") -> float:
    """One subtask's official score, acc*100 + acc+*100 (acc+: share of images with every answer right)."""
    if not records:
        return 0.0
    right = _flags(records, parser)
    images = _images_right(records, right)
    score = 0.0  # the official tool's float order: 0, + acc*100, + acc_plus*100
    score += int(right.sum()) / len(right) * 100
    score += sum(images.values()) / len(images) * 100
    return score


def mme_statistic(parser: str = "strict", subtasks: Sequence[str] = ()) -> Statistic:
    """The sum of the given subtasks' scores (one subtask: its score; a group: its total)."""
    def fn(records: Sequence[Record]) -> float:
        total = 0.0
        for s in subtasks:
            total += mme_score([r for r in records if _subtask(r) == s], parser)
        return total

    def vectorised(records: Sequence[Record]) -> Callable[[Resample], np.ndarray]:
        right = _flags(records, parser)
        images, size = _images_right(records, right), Counter(r["cluster"] for r in records)
        # each item carries 1/size of its image, so item sums count images (clusters move whole)
        share = np.array([1 / size[r["cluster"]] for r in records])
        both = np.array([images[r["cluster"]] for r in records]) * share
        masks = [np.array([_subtask(r) == s for r in records], dtype=np.float64) for s in subtasks]

        def scores(block: Resample) -> np.ndarray:
            total = np.zeros(block.counts.shape[0])
            for m in masks:
                total = total + _ratio(block.total(right * m), block.total(m)) * 100
                total = total + _ratio(block.total(both * m), block.total(share * m)) * 100
            return total
        return scores
    return Statistic(fn, vectorised)


def _specs(task: str, records: Sequence[Record]) -> tuple[list | None, list | None, dict[str, list]]:
    """(clusters, strata, {parser: [(metric, Statistic)], main metric first}) for a task's records."""
    parsers = [p for p in ("strict", "robust") if records and all(f"correct_{p}" in r for r in records)]
    if task == "pope":
        present = [s for s in SPLITS if any(_split(r) == s for r in records)]
        return [r["cluster"] for r in records], None, {
            p: [("F1 mean", pope_statistic(p))] + [(f"F1 {s}", pope_statistic(p, s)) for s in present]
            for p in parsers}
    if task == "mme":
        subs = list(dict.fromkeys(_subtask(r) for r in records))
        groups = {"perception": [s for s in PERCEPTION if s in subs],
                  "cognition": [s for s in COGNITION if s in subs],
                  "other": [s for s in subs if s not in PERCEPTION and s not in COGNITION]}
        return [r["cluster"] for r in records], [_subtask(r) for r in records], {
            p: [(f"{g} score", mme_statistic(p, m)) for g, m in groups.items() if m]
            + [(f"{s} score", mme_statistic(p, [s])) for s in subs] for p in parsers}
    if task in ("mmmu", "mathvista"):
        return None, None, {p: [("accuracy", accuracy_statistic(p))] for p in parsers}
    if task == "mmvet":
        return None, None, {"strict": [("total (0-100)", grade_statistic("scores", 100.0))]}
    if task == "mmhal":
        return None, None, {"strict": [("average rating (0-6)", grade_statistic("ratings", 1.0))]}
    if task == "chair":
        return None, None, {"strict": [("CHAIR_s", chair_statistic("s")), ("CHAIR_i", chair_statistic("i"))]}
    return None, None, {}


def task_intervals(task: str, result: Mapping, n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> dict:
    """{parser: {metric: bootstrap_ci dict}} for the task's headline metrics; {} without per-item records."""
    records = list(result.get("items") or [])
    if not records:
        return {}
    clusters, strata, specs = _specs(task, records)
    flat = [(p, name, stat) for p, metrics in specs.items() for name, stat in metrics]
    if not flat:
        return {}
    values = _evaluate([(stat, records) for _, _, stat in flat], len(records), clusters, strata, n_boot, seed)
    out: dict[str, dict] = {}
    for (p, name, stat), v in zip(flat, values, strict=True):
        low, high = _interval(v, level)
        out.setdefault(p, {})[name] = {"estimate": stat(records), "low": low, "high": high, "n_boot": n_boot,
                                       "clustered": clusters is not None, "level": level}
    return out


def compare_runs(a: Mapping, b: Mapping, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                 alpha: float = ALPHA) -> dict:
    """Per task in both runs: items paired by id, the main metric's B - A with a paired-bootstrap interval,
    and McNemar (right/wrong tasks) or the paired bootstrap's p; one row per parser (strict, robust)."""
    ta, tb = a.get("tasks") or {}, b.get("tasks") or {}
    skipped = {t: f"only in run {side}" for side, mine, other in (("A", ta, tb), ("B", tb, ta))
               for t in mine if t not in other}
    out: dict[str, Any] = {"a": {k: a.get(k) for k in ("model", "fingerprint")},
                           "b": {k: b.get(k) for k in ("model", "fingerprint")}, "n_boot": n_boot,
                           "seed": seed, "level": level, "alpha": alpha, "tasks": {}, "skipped": skipped}
    for task in (t for t in ta if t in tb):
        items_a, items_b = ta[task].get("items") or [], tb[task].get("items") or []
        by_b = {r["id"]: r for r in items_b}
        ra = [r for r in items_a if r["id"] in by_b]
        rb = [by_b[r["id"]] for r in ra]
        clusters, strata, specs = _specs(task, ra)
        if not ra or not specs:
            out["skipped"][task] = "no per-item records in common" if not ra else "no per-item metric"
            continue
        ids_a, ids_b = {r["id"] for r in items_a}, set(by_b)
        rows = []
        for parser, metrics in specs.items():
            name, stat = metrics[0]
            va, vb = _evaluate([(stat, ra), (stat, rb)], len(ra), clusters, strata, n_boot, seed)
            boot = _paired_summary(stat(ra), stat(rb), va, vb, level, n_boot)
            (a_low, a_high), (b_low, b_high) = _interval(va, level), _interval(vb, level)
            row = {"parser": parser, "metric": name, "a": boot["a"], "a_low": a_low, "a_high": a_high,
                   "b": boot["b"], "b_low": b_low, "b_high": b_high, "difference": boot["difference"],
                   "low": boot["low"], "high": boot["high"], "bootstrap_p": boot["p_value"]}
            if task in RIGHT_WRONG:
                test = mcnemar([r[f"correct_{parser}"] for r in ra], [r[f"correct_{parser}"] for r in rb])
                row.update(test="McNemar", p_value=test["p_value"], mcnemar=test)
            else:
                row.update(test="paired bootstrap", p_value=boot["p_value"])
            row["significant"] = row["p_value"] < alpha
            rows.append(row)
        out["tasks"][task] = {"n_paired": len(ra), "only_a": len(ids_a - ids_b), "only_b": len(ids_b - ids_a),
                              "clustered": clusters is not None, "rows": rows}
    return out
