"""Write evaluation results as results.json plus a self-contained report.html.

The HTML needs no external assets and no JavaScript: tables, inline SVG charts, and the
sample image inline (data: URI) or as a relative path. It renders whatever keys it knows
("pope", "timings", "stages", "loss_curves", "sample") and shows every other key as JSON.
Metric values are fractions (as ``score_pope`` returns them) and are shown as percentages.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmmkit.atomic import atomic_write
from lmmkit.eval.charts import esc, f1_chart, is_number, loss_chart, pct, split_metrics
from lmmkit.eval.harness_report import intervals_section, stage_effects_section
from lmmkit.eval.html import json_default, page

METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1", "yes_ratio")
_HEADERS = {
    "accuracy": "acc",
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    "yes_ratio": "yes-ratio",
}
_KNOWN = ("pope", "pope_intervals", "stage_effects", "benchmarks", "timings", "stages", "loss_curves", "sample")



# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _mean_row(rows: Sequence[Mapping]) -> dict:
    """Mean of each metric over the splits (LLaVA's single POPE number is mean F1); n summed."""
    mean: dict[str, Any] = {}
    for key in METRICS:
        values = [r[key] for r in rows if is_number(r.get(key))]
        mean[key] = sum(values) / len(values) if values else None
    ns = [r["n"] for r in rows if is_number(r.get("n"))]
    mean["n"] = sum(ns) if ns else None
    unp = [r["unparseable"] for r in rows if is_number(r.get("unparseable"))]
    if unp:
        mean["unparseable"] = sum(unp)
    return mean


def _target_fraction(results: Mapping) -> float | None:
    """targets.pope_f1 as a fraction; values above 1 are taken as percentages (85.9 -> 0.859)."""
    targets = results.get("targets")
    target = targets.get("pope_f1") if isinstance(targets, Mapping) else None
    if not is_number(target) or not math.isfinite(target):
        return None
    return target / 100 if target > 1 else float(target)


# --------------------------------------------------------------------------------------------
# Plain-text table for the terminal
# --------------------------------------------------------------------------------------------


def format_table(results: dict) -> str:
    """Plain-text POPE table: one row per condition, split (and parser), plus a mean row."""
    pope = results.get("pope")
    if not isinstance(pope, Mapping) or not pope:
        return "(no POPE results)"
    has_robust = any(
        split_metrics(cell)[1] is not None
        for splits in pope.values()
        if isinstance(splits, Mapping)
        for cell in splits.values()
    )
    header = (
        ["condition", "split"] + (["parser"] if has_robust else []) + [_HEADERS[m] for m in METRICS] + ["n"]
    )
    body: list[list[str]] = []
    for condition, splits in pope.items():
        if not isinstance(splits, Mapping):
            continue
        parsed = {split: split_metrics(cell) for split, cell in splits.items()}
        parsers = [("strict", 0), ("robust", 1)] if has_robust else [("strict", 0)]
        for parser, idx in parsers:
            rows = {s: pair[idx] for s, pair in parsed.items() if pair[idx] is not None}
            if not rows:
                continue
            items = list(rows.items())
            if len(items) > 1:
                items.append(("mean", _mean_row(list(rows.values()))))
            for split, metrics in items:
                line = [str(condition), str(split)] + ([parser] if has_robust else [])
                line += [pct(metrics.get(m)) for m in METRICS] + [str(metrics.get("n", ""))]
                body.append(line)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    n_text = 3 if has_robust else 2

    def fmt(row: list[str]) -> str:
        cells = [
            c.ljust(w) if i < n_text else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
    lines.append("(metrics in %; yes-ratio = predicted yes / N)")
    target = _target_fraction(results)
    if target is not None:
        lines.append(f"target POPE F1: {100 * target:.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# HTML sections
# --------------------------------------------------------------------------------------------


def _metric_cells(metrics: Mapping | None, with_unparseable: bool) -> str:
    if metrics is None:
        return "".join("<td></td>" for _ in range(len(METRICS) + 1 + with_unparseable))
    cells = "".join(f"<td>{esc(pct(metrics.get(m)))}</td>" for m in METRICS)
    cells += f"<td>{esc(metrics.get('n', ''))}</td>"
    if with_unparseable:
        cells += f"<td>{esc(metrics.get('unparseable', ''))}</td>"
    return cells


def _pope_table(condition: str, splits: Mapping) -> str:
    parsed = [(split, *split_metrics(cell)) for split, cell in splits.items()]
    has_robust = any(robust is not None for _, _, robust in parsed)
    cols = "".join(f"<th>{esc(_HEADERS[m])}</th>" for m in METRICS) + "<th>n</th>"
    if has_robust:
        head = (
            f'<tr><th rowspan="2">split</th><th colspan="{len(METRICS) + 1}">strict (official parser)</th>'
            f'<th colspan="{len(METRICS) + 2}">robust (lmmkit parser)</th></tr>'
            f"<tr>{cols}{cols}<th>unparseable</th></tr>"
        )
    else:
        head = f"<tr><th>split</th>{cols}</tr>"
    body = []
    for split, strict, robust in parsed:
        cells = _metric_cells(strict, False) + (_metric_cells(robust, True) if has_robust else "")
        body.append(f"<tr><td>{esc(split)}</td>{cells}</tr>")
    if len(parsed) > 1:
        cells = _metric_cells(_mean_row([s for _, s, _ in parsed]), False)
        if has_robust:
            robusts = [r for _, _, r in parsed if r is not None]
            cells += _metric_cells(_mean_row(robusts) if robusts else None, True)
        body.append(f'<tr class="mean"><td>mean</td>{cells}</tr>')
    return f"<h3>{esc(condition)}</h3>\n<table>\n<thead>{head}</thead>\n<tbody>{''.join(body)}</tbody>\n</table>"


def _pope_section(pope: Mapping, results: Mapping) -> str:
    if not isinstance(pope, Mapping):
        raise TypeError("pope must be {condition: {split: metrics}}")
    target = _target_fraction(results)
    out = [
        "<h2>POPE</h2>",
        '<p class="note">Metrics in %, yes = positive; yes-ratio = predicted yes / N. '
        "Strict = the official parser; robust = lmmkit's parser (unparseable answers scored wrong).</p>",
    ]
    for condition, splits in pope.items():
        if not isinstance(splits, Mapping):
            raise TypeError(f"pope[{condition!r}] must be {{split: metrics}}")
        out.append(_pope_table(str(condition), splits))
    chart = f1_chart(pope, target)
    if chart:
        out.append("<h3>F1 per split</h3>")
        out.append(chart)
    return "\n".join(out)


def _fmt_seconds(seconds: Any) -> str:
    if not is_number(seconds) or not math.isfinite(seconds):
        return str(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)} min {secs:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes)} min"


def _timings_section(timings: Mapping) -> str:
    if not isinstance(timings, Mapping):
        raise TypeError("timings must be {stage: seconds}")
    rows = [
        f"<tr><td>{esc(stage)}</td><td>{esc(_fmt_seconds(sec))}</td>"
        f"<td>{esc(f'{sec:.2f}' if is_number(sec) else sec)}</td></tr>"
        for stage, sec in timings.items()
    ]
    numbers = [s for s in timings.values() if is_number(s) and math.isfinite(s)]
    if len(numbers) > 1:
        total = sum(numbers)
        rows.append(
            f'<tr class="mean"><td>total</td><td>{esc(_fmt_seconds(total))}</td><td>{total:.2f}</td></tr>'
        )
    return (
        "<h2>Timings</h2>\n<table>\n<thead><tr><th>stage</th><th>time</th><th>seconds</th></tr></thead>\n"
        f"<tbody>{''.join(rows)}</tbody>\n</table>"
    )


def _cell(value: Any) -> str:
    if is_number(value) and isinstance(value, float):
        return esc(f"{value:.6g}")
    if isinstance(value, Mapping | list | tuple):
        return esc(json.dumps(value, default=json_default))
    return esc("" if value is None else value)


def _stages_section(stages: Sequence) -> str:
    if isinstance(stages, str | bytes) or not isinstance(stages, Sequence):
        raise TypeError("stages must be a list of dicts")
    if not all(isinstance(s, Mapping) for s in stages):
        raise TypeError("stages must be a list of dicts")
    columns: list[str] = []
    for stage in stages:
        for key in stage:
            if key not in columns:
                columns.append(key)
    if "name" in columns:
        columns.insert(0, columns.pop(columns.index("name")))
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(s.get(c))}</td>" for c in columns) + "</tr>" for s in stages)
    return (
        f"<h2>Training stages</h2>\n<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>"
    )


def _safe_image_src(src: str) -> bool:
    """Inline data: images and relative paths only (self-contained; no remote or script URLs)."""
    lowered = src.strip().lower()
    if lowered.startswith("data:"):
        return lowered.startswith("data:image/")
    return ":" not in lowered.split("/", 1)[0] and not lowered.startswith("//")


def _sample_section(sample: Mapping) -> str:
    if not isinstance(sample, Mapping):
        raise TypeError("sample must be {'image': ..., 'conversation': [...]}")
    out = ["<h2>Sample</h2>"]
    image = sample.get("image")
    if isinstance(image, str | os.PathLike) and str(image):
        src = os.fspath(image)
        if _safe_image_src(src):
            out.append(f'<p><img class="sample" src="{esc(src)}" alt="sample image"></p>')
        else:
            out.append(f'<p class="note">image: {esc(src)} (not embedded)</p>')
    for turn in sample.get("conversation") or []:
        if isinstance(turn, Mapping):
            role, content = str(turn.get("role", "")), turn.get("content", "")
        else:
            role, content = "", turn
        if not isinstance(content, str):
            content = json.dumps(content, indent=2, default=json_default)
        cls = role.lower() if role.lower() in ("user", "human", "assistant", "gpt", "system") else ""
        out.append(f'<div class="turn {cls}"><span class="role">{esc(role)}</span>{esc(content)}</div>')
    return "\n".join(out)


def _benchmarks_section(benchmarks: Mapping) -> str:
    """The harness's headline rows per ShapesWorld twin task (strict = official scorer)."""
    from lmmkit.eval.summary import fmt

    rows = []
    for task, b in benchmarks.items():
        unp = b.get("unparseable") or {}
        for i, (name, strict, robust) in enumerate(b["rows"]):
            first = f"<td rowspan=\"{len(b['rows'])}\">{esc(task)} ({esc(b.get('n'))} items; unparseable " \
                    f"{esc(unp.get('strict'))} / {esc(unp.get('robust'))})</td>" if i == 0 else ""
            ci = (b.get("intervals") or {}).get("strict", {}).get(name)
            ci_text = f"[{fmt(ci['low'])}, {fmt(ci['high'])}]" if ci else ""
            rows.append(f"<tr>{first}<td>{esc(name)}</td><td>{fmt(strict)}</td><td>{ci_text}</td>"
                        f"<td>{fmt(robust)}</td></tr>")
    return ("<h2>Benchmark twins (ShapesWorld, official formats and scorers)</h2>\n<table><tr><th>task</th>"
            "<th>metric</th><th>strict (official)</th><th>95% CI</th><th>robust (lmmkit)</th></tr>"
            + "".join(rows) + "</table>")


def _json_section(key: str, value: Any) -> str:
    body = json.dumps(value, indent=2, ensure_ascii=False, default=json_default)
    return f"<h2>{esc(key)}</h2>\n<pre>{esc(body)}</pre>"


def render_html(results: Mapping, title: str = "lmmkit report") -> str:
    """The report page as a string (what write_report saves as report.html)."""
    sections: list[str] = []
    renderers = {
        "pope": lambda v: _pope_section(v, results),
        "pope_intervals": lambda v: intervals_section(v, "POPE: 95% intervals (bootstrap, clustered by image)"),
        "stage_effects": stage_effects_section,
        "benchmarks": _benchmarks_section,
        "timings": _timings_section,
        "stages": _stages_section,
        "loss_curves": loss_chart,
        "sample": _sample_section,
    }
    for key in _KNOWN:
        if key not in results:
            continue
        try:
            sections.append(renderers[key](results[key]))
        except (TypeError, ValueError, KeyError, IndexError, AttributeError):
            sections.append(_json_section(key, results[key]))  # unexpected shape: show it raw
    for key, value in results.items():
        if key not in _KNOWN:
            sections.append(_json_section(str(key), value))
    body = "\n".join(sections) if sections else '<p class="note">(no results)</p>'
    return page(title, body)


def write_report(results: dict, out_dir: Path, title: str = "lmmkit report") -> tuple[Path, Path]:
    """Write out_dir/results.json and out_dir/report.html (both atomically); return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "results.json", out_dir / "report.html"
    atomic_write(json_path, json.dumps(results, indent=2, ensure_ascii=False, default=json_default) + "\n")
    atomic_write(html_path, render_html(results, title))
    return json_path, html_path
