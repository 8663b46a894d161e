"""Write evaluation results as results.json plus a self-contained report.html.

The HTML needs no external assets and no JavaScript: tables, inline SVG charts, and the
sample image inline (data: URI) or as a relative path. It renders whatever keys it knows
("pope", "timings", "stages", "loss_curves", "sample") and shows every other key as JSON.
Metric values are fractions (as ``score_pope`` returns them) and are shown as percentages.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1", "yes_ratio")
_HEADERS = {
    "accuracy": "acc",
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    "yes_ratio": "yes-ratio",
}
_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")
_KNOWN = ("pope", "timings", "stages", "loss_curves", "sample")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1000px;
color:#222;padding:0 1rem}
h1{border-bottom:2px solid #4e79a7;padding-bottom:.3rem}
h2{margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0 1rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#f3f5f8} td:first-child,th:first-child{text-align:left}
tr.mean td{font-weight:600;background:#fafafa}
pre{background:#f6f8fa;padding:.75rem;overflow:auto;border-radius:4px}
.turn{margin:.4rem 0;padding:.5rem .75rem;border-radius:6px;white-space:pre-wrap}
.role{font-weight:600;display:block;margin-bottom:.2rem;text-transform:capitalize}
.user,.human{background:#eef3fb} .assistant,.gpt{background:#f1f8ee} .system{background:#f5f5f5}
img.sample{max-width:384px;max-height:384px;border:1px solid #ccc}
.note{color:#666;font-size:.9em}
"""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=str)
    return str(obj)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _pct(value: Any) -> str:
    """A metric fraction as a percentage with 2 decimals; non-numbers as they are."""
    if not _is_number(value):
        return "" if value is None else str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{100 * value:.2f}"


def _split_metrics(cell: Any) -> tuple[Mapping, Mapping | None]:
    """(strict, robust or None) from either {metrics} or {"strict": {...}, "robust": {...}}."""
    if not isinstance(cell, Mapping):
        raise TypeError(f"POPE metrics must be a mapping, got {type(cell).__name__}")
    if isinstance(cell.get("strict"), Mapping):
        robust = cell.get("robust")
        return cell["strict"], robust if isinstance(robust, Mapping) else None
    return cell, None


def _mean_row(rows: Sequence[Mapping]) -> dict:
    """Mean of each metric over the splits (LLaVA's single POPE number is mean F1); n summed."""
    mean: dict[str, Any] = {}
    for key in METRICS:
        values = [r[key] for r in rows if _is_number(r.get(key))]
        mean[key] = sum(values) / len(values) if values else None
    ns = [r["n"] for r in rows if _is_number(r.get("n"))]
    mean["n"] = sum(ns) if ns else None
    unp = [r["unparseable"] for r in rows if _is_number(r.get("unparseable"))]
    if unp:
        mean["unparseable"] = sum(unp)
    return mean


def _target_fraction(results: Mapping) -> float | None:
    """targets.pope_f1 as a fraction; values above 1 are taken as percentages (85.9 -> 0.859)."""
    targets = results.get("targets")
    target = targets.get("pope_f1") if isinstance(targets, Mapping) else None
    if not _is_number(target) or not math.isfinite(target):
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
        _split_metrics(cell)[1] is not None
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
        parsed = {split: _split_metrics(cell) for split, cell in splits.items()}
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
                line += [_pct(metrics.get(m)) for m in METRICS] + [str(metrics.get("n", ""))]
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
    cells = "".join(f"<td>{_esc(_pct(metrics.get(m)))}</td>" for m in METRICS)
    cells += f"<td>{_esc(metrics.get('n', ''))}</td>"
    if with_unparseable:
        cells += f"<td>{_esc(metrics.get('unparseable', ''))}</td>"
    return cells


def _pope_table(condition: str, splits: Mapping) -> str:
    parsed = [(split, *_split_metrics(cell)) for split, cell in splits.items()]
    has_robust = any(robust is not None for _, _, robust in parsed)
    cols = "".join(f"<th>{_esc(_HEADERS[m])}</th>" for m in METRICS) + "<th>n</th>"
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
        body.append(f"<tr><td>{_esc(split)}</td>{cells}</tr>")
    if len(parsed) > 1:
        cells = _metric_cells(_mean_row([s for _, s, _ in parsed]), False)
        if has_robust:
            robusts = [r for _, _, r in parsed if r is not None]
            cells += _metric_cells(_mean_row(robusts) if robusts else None, True)
        body.append(f'<tr class="mean"><td>mean</td>{cells}</tr>')
    return f"<h3>{_esc(condition)}</h3>\n<table>\n<thead>{head}</thead>\n<tbody>{''.join(body)}</tbody>\n</table>"


def _f1_chart(pope: Mapping, target: float | None) -> str:
    """Grouped bar chart: one group per split, one bar per condition, strict F1 (0-100 %)."""
    conditions = [c for c, s in pope.items() if isinstance(s, Mapping)]
    splits: list[str] = []
    for c in conditions:
        for s in pope[c]:
            if s not in splits:
                splits.append(s)
    if not conditions or not splits:
        return ""
    width, height = 760, 320
    left, right, top, bottom = 50, 230, 20, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    group_w = plot_w / len(splits)
    bar_w = group_w * 0.8 / len(conditions)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="POPE F1 per split">',
        "<title>POPE F1 (strict) per split and condition</title>",
    ]
    for tick in range(0, 101, 20):
        y = top + plot_h * (1 - tick / 100)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{tick}</text>')
    parts.append(
        f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">F1 (%)</text>'
    )
    for gi, split in enumerate(splits):
        x0 = left + gi * group_w + group_w * 0.1
        for ci, condition in enumerate(conditions):
            cell = pope[condition].get(split)
            if cell is None:
                continue
            f1 = _split_metrics(cell)[0].get("f1")
            if not _is_number(f1) or not math.isfinite(f1):
                continue
            value = min(max(float(f1), 0.0), 1.0)
            bar_h = plot_h * value
            x = x0 + ci * bar_w
            y = top + plot_h - bar_h
            color = _PALETTE[ci % len(_PALETTE)]
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w * 0.92:.1f}" height="{bar_h:.1f}" fill="{color}">'
                f"<title>{_esc(condition)} / {_esc(split)}: F1 {_pct(f1)}</title></rect>"
            )
            parts.append(
                f'<text x="{x + bar_w * 0.46:.1f}" y="{y - 3:.1f}" font-size="10" '
                f'text-anchor="middle">{_pct(f1)}</text>'
            )
        parts.append(
            f'<text x="{left + (gi + 0.5) * group_w:.1f}" y="{top + plot_h + 18}" font-size="12" '
            f'text-anchor="middle">{_esc(split)}</text>'
        )
    parts.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>'
    )
    if target is not None:
        y = top + plot_h * (1 - min(max(target, 0.0), 1.0))
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#c00" '
            f'stroke-width="1.5" stroke-dasharray="6 4"><title>target F1 {100 * target:.1f}</title></line>'
        )
    for ci, condition in enumerate(conditions):
        y = top + 10 + ci * 18
        color = _PALETTE[ci % len(_PALETTE)]
        parts.append(f'<rect x="{left + plot_w + 10}" y="{y - 9}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{left + plot_w + 25}" y="{y}" font-size="11">{_esc(condition)}</text>')
    if target is not None:
        y = top + 10 + len(conditions) * 18
        parts.append(
            f'<line x1="{left + plot_w + 8}" y1="{y - 4}" x2="{left + plot_w + 22}" y2="{y - 4}" stroke="#c00" '
            f'stroke-width="1.5" stroke-dasharray="4 2"/>'
        )
        parts.append(
            f'<text x="{left + plot_w + 25}" y="{y}" font-size="11">target F1 {100 * target:.1f}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


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
    chart = _f1_chart(pope, target)
    if chart:
        out.append("<h3>F1 per split</h3>")
        out.append(chart)
    return "\n".join(out)


def _fmt_seconds(seconds: Any) -> str:
    if not _is_number(seconds) or not math.isfinite(seconds):
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
        f"<tr><td>{_esc(stage)}</td><td>{_esc(_fmt_seconds(sec))}</td>"
        f"<td>{_esc(f'{sec:.2f}' if _is_number(sec) else sec)}</td></tr>"
        for stage, sec in timings.items()
    ]
    numbers = [s for s in timings.values() if _is_number(s) and math.isfinite(s)]
    if len(numbers) > 1:
        total = sum(numbers)
        rows.append(
            f'<tr class="mean"><td>total</td><td>{_esc(_fmt_seconds(total))}</td><td>{total:.2f}</td></tr>'
        )
    return (
        "<h2>Timings</h2>\n<table>\n<thead><tr><th>stage</th><th>time</th><th>seconds</th></tr></thead>\n"
        f"<tbody>{''.join(rows)}</tbody>\n</table>"
    )


def _cell(value: Any) -> str:
    if _is_number(value) and isinstance(value, float):
        return _esc(f"{value:.6g}")
    if isinstance(value, Mapping | list | tuple):
        return _esc(json.dumps(value, default=_json_default))
    return _esc("" if value is None else value)


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
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(s.get(c))}</td>" for c in columns) + "</tr>" for s in stages)
    return (
        f"<h2>Training stages</h2>\n<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>"
    )


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _loss_chart(curves: Mapping) -> str:
    if not isinstance(curves, Mapping):
        raise TypeError("loss_curves must be {stage: [[step, loss], ...]}")
    series: list[tuple[str, list[tuple[float, float]]]] = []
    for stage, points in curves.items():
        clean = []
        for point in points:
            step, loss = point[0], point[1]
            if _is_number(step) and _is_number(loss) and math.isfinite(step) and math.isfinite(loss):
                clean.append((float(step), float(loss)))
        series.append((str(stage), sorted(clean)))
    all_points = [p for _, pts in series for p in pts]
    out = ["<h2>Loss curves</h2>"]
    if not all_points:
        out.append('<p class="note">(no finite loss values)</p>')
        return "\n".join(out)
    width, height = 760, 320
    left, right, top, bottom = 60, 230, 20, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    x_lo, x_hi = min(p[0] for p in all_points), max(p[0] for p in all_points)
    y_lo, y_hi = min(p[1] for p in all_points), max(p[1] for p in all_points)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pad = (y_hi - y_lo) * 0.05
    y_lo, y_hi = (max(y_lo - pad, 0.0) if y_lo >= 0 else y_lo - pad), y_hi + pad

    def sx(x: float) -> float:
        return left + plot_w * (x - x_lo) / (x_hi - x_lo)

    def sy(y: float) -> float:
        return top + plot_h * (1 - (y - y_lo) / (y_hi - y_lo))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="training loss">',
        "<title>Training loss per step</title>",
    ]
    for t in _nice_ticks(y_lo, y_hi):
        y = sy(t)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{t:g}</text>')
    for t in _nice_ticks(x_lo, x_hi):
        x = sx(t)
        parts.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 16}" font-size="11" text-anchor="middle">{t:g}</text>'
        )
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle">step</text>'
    )
    parts.append(
        f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">loss</text>'
    )
    for i, (stage, pts) in enumerate(series):
        color = _PALETTE[i % len(_PALETTE)]
        if len(pts) == 1:
            parts.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        elif pts:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(
                f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5">'
                f"<title>{_esc(stage)}</title></polyline>"
            )
        y = top + 10 + i * 18
        parts.append(f'<rect x="{left + plot_w + 10}" y="{y - 9}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{left + plot_w + 25}" y="{y}" font-size="11">{_esc(stage)}</text>')
    parts.append("</svg>")
    out.append("\n".join(parts))
    return "\n".join(out)


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
            out.append(f'<p><img class="sample" src="{_esc(src)}" alt="sample image"></p>')
        else:
            out.append(f'<p class="note">image: {_esc(src)} (not embedded)</p>')
    for turn in sample.get("conversation") or []:
        if isinstance(turn, Mapping):
            role, content = str(turn.get("role", "")), turn.get("content", "")
        else:
            role, content = "", turn
        if not isinstance(content, str):
            content = json.dumps(content, indent=2, default=_json_default)
        cls = role.lower() if role.lower() in ("user", "human", "assistant", "gpt", "system") else ""
        out.append(f'<div class="turn {cls}"><span class="role">{_esc(role)}</span>{_esc(content)}</div>')
    return "\n".join(out)


def _json_section(key: str, value: Any) -> str:
    body = json.dumps(value, indent=2, ensure_ascii=False, default=_json_default)
    return f"<h2>{_esc(key)}</h2>\n<pre>{_esc(body)}</pre>"


def render_html(results: Mapping, title: str = "lmmkit report") -> str:
    """The report page as a string (what write_report saves as report.html)."""
    sections: list[str] = []
    renderers = {
        "pope": lambda v: _pope_section(v, results),
        "timings": _timings_section,
        "stages": _stages_section,
        "loss_curves": _loss_chart,
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
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


def write_report(results: dict, out_dir: Path, title: str = "lmmkit report") -> tuple[Path, Path]:
    """Write out_dir/results.json and out_dir/report.html (both atomically); return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "results.json", out_dir / "report.html"
    _atomic_write(json_path, json.dumps(results, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    _atomic_write(html_path, render_html(results, title))
    return json_path, html_path
