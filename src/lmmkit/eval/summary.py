"""The headline numbers of each task's result, for tables, reports and run comparisons."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def headline(task: str, result: Mapping) -> list[tuple[str, float | None, float | None]]:
    """(metric, strict value, robust value) rows; robust is None where the task has no robust scorer."""
    s, r = result.get("strict"), result.get("robust")
    if task == "pope":
        rows = [("F1 mean", _get(s, "mean_f1"), _get(r, "mean_f1"))]
        for split in ("random", "popular", "adversarial"):
            rows.append((f"F1 {split}", _get(s, split, "f1"), _get(r, split, "f1")))
            rows.append((f"yes-ratio {split}", _get(s, split, "yes_ratio"), _get(r, split, "yes_ratio")))
        return rows
    if task == "mme":
        rows = []
        for group in ("perception", "cognition", "other"):
            if _get(s, f"{group}_total"):
                rows.append((f"{group} score", _get(s, f"{group}_total"), _get(r, f"{group}_total")))
        for name in _get(s, "tasks") or {}:
            rows.append((f"{name} acc", _get(s, "tasks", name, "acc"), _get(r, "tasks", name, "acc")))
            rows.append((f"{name} acc+", _get(s, "tasks", name, "acc_plus"), _get(r, "tasks", name, "acc_plus")))
        return rows
    if task == "mmmu":
        return [("accuracy", _get(s, "acc"), _get(r, "acc"))]
    if task == "mathvista":
        return [("accuracy", _get(s, "accuracy"), _get(r, "accuracy"))]
    if task == "mmvet":
        return [("total (0-100)", _get(s, "total"), None), ("std over judge runs", _get(s, "std"), None)]
    if task == "mmhal":
        return [("average rating (0-6)", _get(s, "average", "mean"), None),
                ("hallucination rate", _get(s, "hallucination_rate", "mean"), None)]
    if task.startswith("rtvlm"):  # rtvlm, rtvlm_<aspect>, rtvlm_<subtask>: means of 1-10 grades (docs/safety.md)
        rows = [("mean score (1-10)", _get(s, "overall", "mean"), None),
                ("std over judge runs", _get(s, "overall", "std"), None)]
        rows += [(f"aspect {a}", _get(v, "mean"), None) for a, v in (_get(s, "aspects") or {}).items()]
        return rows + [(t, _get(v, "mean"), None) for t, v in (_get(s, "subtasks") or {}).items()]
    if task.startswith("attacks"):  # attacks, attacks_<family>: attack success rates (docs/safety.md)
        rows = [("mean ASR", _get(s, "mean_asr"), None)]
        for fam, v in (_get(s, "families") or {}).items():
            rows += [(f"ASR {fam}", v.get("asr"), None), (f"control {fam}", v.get("control_rate"), None)]
        return rows
    if task == "chair":
        return [("CHAIR_s", _get(s, "chair_s"), None), ("CHAIR_i", _get(s, "chair_i"), None),
                ("object recall", _get(s, "recall"), None)]
    if task == "lmloss":
        return [("answer-token loss", _get(s, "loss"), None), ("perplexity", _get(s, "perplexity"), None)]
    return []


def main_metric(task: str, result: Mapping) -> tuple[str, float | None]:
    """The one number per task that a comparison plot shows (strict)."""
    rows = headline(task, result)
    return (rows[0][0], rows[0][1]) if rows else ("", None)


def interval(result: Mapping, metric: str, parser: str = "strict") -> str:
    """"[low, high]" of a headline metric's 95% interval, or "" when none was computed."""
    ci = _get(result, "intervals", parser, metric)
    return f"[{fmt(ci['low'])}, {fmt(ci['high'])}]" if ci else ""


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def format_results(results: Mapping) -> str:
    """A plain-text table of every task's headline rows, unparseable counts and failures."""
    lines = [f"model: {results.get('model')}" + (f"   judge: {results['judge']}" if results.get("judge") else "")]
    for task, res in results.get("tasks", {}).items():
        unp = res.get("unparseable") or {}
        lines.append(f"\n{task}  ({res.get('n_items', 0)} items, {res.get('model_calls', 0)} model calls, "
                     f"{len(res.get('failures') or [])} failed, {len(res.get('load_errors') or [])} bad records; "
                     f"unparseable strict {unp.get('strict', '-')}, robust {unp.get('robust', '-')})")
        controls = [(label, {m: v for m, v, _ in headline(task, results[key][task])})
                    for key, label in (("blind_control", "blank img"), ("no_image_control", "no image"))
                    if task in (results.get(key) or {})]
        lines.append(f"  {'metric':<28}{'strict':>10}{'95% CI':>18}{'robust':>10}"
                     + "".join(f"{label:>11}" for label, _ in controls))
        for name, sv, rv in headline(task, res):
            lines.append(f"  {name:<28}{fmt(sv):>10}{interval(res, name):>18}{fmt(rv):>10}"
                         + "".join(f"{fmt(c.get(name)):>11}" for _, c in controls))
    return "\n".join(lines)


def format_benchmarks(benchmarks: Mapping) -> str:
    """{task: {"rows": headline rows, "n", "unparseable"}} as a plain-text table (the demo's)."""
    lines = [f"\n{'task':<10}{'metric':<24}{'strict':>9}{'95% CI':>18}{'robust':>9}   items, unparseable (s/r)"]
    for task, b in benchmarks.items():
        unp = b.get("unparseable") or {}
        for i, (name, sv, rv) in enumerate(b["rows"]):
            extra = f"   {b.get('n')}, {unp.get('strict')}/{unp.get('robust')}" if i == 0 else ""
            lines.append(f"{task if i == 0 else '':<10}{name:<24}{fmt(sv):>9}{interval(b, name):>18}{fmt(rv):>9}{extra}")
    return "\n".join(lines)


def format_stage_effects(effects: Mapping) -> str:
    """What each training stage changed: before, after, difference with its 95% CI, test and p."""
    lines = ["\nstage effect (paired, same questions)      before    after   diff          95% CI   test        p"]
    for stage, rows in effects.items():
        for r in rows:
            lines.append(f"{stage:<14}{r['parser']:<7}{r['metric']:<20}{fmt(r['a']):>8}{fmt(r['b']):>9}"
                         f"{fmt(r['difference']):>7}{'[' + fmt(r['low']) + ', ' + fmt(r['high']) + ']':>16}   "
                         f"{r['test']:<10}{r['p_value']:>7.2g}{'  significant' if r['significant'] else ''}")
    return "\n".join(lines)
