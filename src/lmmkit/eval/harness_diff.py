"""Compare two scorings of the same items, item by item, and say why they disagree.

A *scoring view* maps item id -> {response, parsed, correct, judge, method}: `correct` is the verdict
(None: no verdict), `parsed` the answer the scorer read out of the response (None: not recorded), `judge`
the LLM-judged field the verdict rests on (None: no LLM was involved) and `method` how the scorer decided
("parse", "exact": the whole response compared as it is, "judge"). Views come from `scoring_view` (a
`rescore_log` result: "strict", "robust" or "harness") or `results_view` (an ``lmmkit eval`` results.json).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmmkit.eval.rescore_format import RescoreError

REASONS: tuple[str, ...] = ("response", "judge", "exact match", "parsing")
SCORINGS: tuple[str, ...] = ("strict", "robust", "harness")


def scoring_view(result: Mapping, which: str) -> dict[str, dict]:
    """One scoring of a `rescore_log` result as a view (items without a verdict left out)."""
    if which not in SCORINGS:
        raise RescoreError(f"scoring must be one of {SCORINGS}, got {which!r}")
    view = {}
    for item in result["items"]:
        entry = item[which]
        if entry.get("correct") is not None:
            view[item["id"]] = {"response": item["response"], **entry, "correct": bool(entry["correct"])}
    return view


def results_view(results: Mapping | str | Path, task: str | None = None,
                 which: str = "strict") -> tuple[str, dict]:
    """(task, view) of an ``lmmkit eval`` results.json (a path or the loaded dict): its per-item strict or
    robust verdicts. `task` may be left out when the file holds one task."""
    if which not in ("strict", "robust"):
        raise RescoreError(f"an lmmkit results.json holds strict and robust scorings, not {which!r}")
    if not isinstance(results, Mapping):
        try:
            results = json.loads(Path(results).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise RescoreError(f"{results}: cannot read as results.json: {err}") from err
    tasks = {name: t for name, t in (results.get("tasks") or {}).items()
             if isinstance(t, Mapping) and t.get("items")}
    if task is None and len(tasks) == 1:
        task = next(iter(tasks))
    if task not in tasks:
        raise RescoreError(f"results.json: no items for task {task!r} (tasks with items: {sorted(tasks)})")
    view = {}
    for item in tasks[task]["items"]:
        correct = item.get(f"correct_{which}")
        if correct is not None:
            view[str(item["id"])] = {"response": item.get("response"), "parsed": item.get(which),
                                     "correct": bool(correct), "judge": None, "method": "parse"}
    return task, view


def _canon(value: Any) -> Any:
    """Parsed answers compared up to case, outer spaces and order (MMMU's open parse is a set)."""
    if isinstance(value, list | tuple | set):
        return tuple(sorted(repr(_canon(v)) for v in value))
    if isinstance(value, str):
        return value.strip().lower()
    return value


def _same_response(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()  # a result file's trailing newline is not a different answer
    return a == b


def _reason(a: Mapping, b: Mapping) -> tuple[str, str]:
    if not _same_response(a.get("response"), b.get("response")):
        return "response", "the two scorings saw different responses"
    ja, jb = a.get("judge"), b.get("judge")
    if (ja is not None or jb is not None) and _canon(ja) != _canon(jb):
        return "judge", f"LLM-judged field {ja!r} vs {jb!r}"
    exact = [side for side, e in (("A", a), ("B", b)) if e.get("method") == "exact"]
    if exact:
        return "exact match", f"{' and '.join(exact)} compared the whole response exactly, not a parse"
    pa, pb = a.get("parsed"), b.get("parsed")
    if pa is None or pb is None or _canon(pa) != _canon(pb):
        return "parsing", f"parsed {pa!r} vs {pb!r}" + (" (not recorded)" if pa is None or pb is None else "")
    return "exact match", f"both parsed {pa!r} but compared it with the gold differently"


def diff_scorings(a: Mapping[str, Mapping], b: Mapping[str, Mapping]) -> list[dict]:
    """The items (by id, in A's order) on which two scoring views disagree, each with both verdicts, both
    parsed answers, both responses and the reason: "response" (different responses), "judge" (an LLM-judged
    field differs), "exact match" (parsed the same, or one side compared the raw response exactly, and the
    comparison differs), "parsing" (same response, different parsed answer)."""
    out = []
    for item_id, ea in a.items():
        eb = b.get(item_id)
        if eb is None or ea.get("correct") is None or eb.get("correct") is None:
            continue
        if bool(ea["correct"]) == bool(eb["correct"]):
            continue
        reason, detail = _reason(ea, eb)
        out.append({"id": item_id, "reason": reason, "verdict_a": bool(ea["correct"]),
                    "verdict_b": bool(eb["correct"]), "parsed_a": ea.get("parsed"),
                    "parsed_b": eb.get("parsed"), "response_a": ea.get("response"),
                    "response_b": eb.get("response"), "detail": detail})
    return out


def reason_counts(diffs: list[dict]) -> dict[str, int]:
    """{reason: count} in REASONS order, zeros included."""
    counts = Counter(d["reason"] for d in diffs)
    return {r: counts.get(r, 0) for r in REASONS}


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def diff_text(diffs: list[dict], a_name: str, b_name: str, n_a: int, n_b: int, common: int,
              show: int = 50) -> str:
    """What ``lmmkit score --diff`` prints: the counts, then up to `show` disagreements."""
    counts = reason_counts(diffs)
    lines = [f"A: {a_name} ({n_a} items with a verdict)", f"B: {b_name} ({n_b} items with a verdict)",
             f"compared: {common} items in both (only in A: {n_a - common}, only in B: {n_b - common})",
             f"disagreements: {len(diffs)} (" + ", ".join(f"{r} {n}" for r, n in counts.items()) + ")"]
    for d in diffs[:show]:
        verdicts = f"A {'right' if d['verdict_a'] else 'wrong'}, B {'right' if d['verdict_b'] else 'wrong'}"
        responses = _short(d["response_a"])
        if d["reason"] == "response":
            responses += f" | {_short(d['response_b'])}"
        detail = d["detail"] if len(d["detail"]) <= 100 else d["detail"][:97] + "..."
        lines.append(f"  {d['id']}: {d['reason']}: {verdicts}; {detail}; response {responses}")
    if len(diffs) > show:
        lines.append(f"  ... {len(diffs) - show} more (all in --json)")
    return "\n".join(lines) + "\n"
