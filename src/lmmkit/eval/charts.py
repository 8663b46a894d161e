"""Inline SVG charts for the HTML report (no JavaScript, no external assets)."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def pct(value: Any) -> str:
    """A metric fraction as a percentage with 2 decimals; non-numbers as they are."""
    if not is_number(value):
        return "" if value is None else str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{100 * value:.2f}"


def split_metrics(cell: Any) -> tuple[Mapping, Mapping | None]:
    """(strict, robust or None) from either {metrics} or {"strict": {...}, "robust": {...}}."""
    if not isinstance(cell, Mapping):
        raise TypeError(f"POPE metrics must be a mapping, got {type(cell).__name__}")
    if isinstance(cell.get("strict"), Mapping):
        robust = cell.get("robust")
        return cell["strict"], robust if isinstance(robust, Mapping) else None
    return cell, None


def f1_chart(pope: Mapping, target: float | None) -> str:
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
            f1 = split_metrics(cell)[0].get("f1")
            if not is_number(f1) or not math.isfinite(f1):
                continue
            value = min(max(float(f1), 0.0), 1.0)
            bar_h = plot_h * value
            x = x0 + ci * bar_w
            y = top + plot_h - bar_h
            color = PALETTE[ci % len(PALETTE)]
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w * 0.92:.1f}" height="{bar_h:.1f}" fill="{color}">'
                f"<title>{esc(condition)} / {esc(split)}: F1 {pct(f1)}</title></rect>"
            )
            parts.append(
                f'<text x="{x + bar_w * 0.46:.1f}" y="{y - 3:.1f}" font-size="10" '
                f'text-anchor="middle">{pct(f1)}</text>'
            )
        parts.append(
            f'<text x="{left + (gi + 0.5) * group_w:.1f}" y="{top + plot_h + 18}" font-size="12" '
            f'text-anchor="middle">{esc(split)}</text>'
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
        color = PALETTE[ci % len(PALETTE)]
        parts.append(f'<rect x="{left + plot_w + 10}" y="{y - 9}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{left + plot_w + 25}" y="{y}" font-size="11">{esc(condition)}</text>')
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


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
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


def loss_chart(curves: Mapping) -> str:
    if not isinstance(curves, Mapping):
        raise TypeError("loss_curves must be {stage: [[step, loss], ...]}")
    series: list[tuple[str, list[tuple[float, float]]]] = []
    for stage, points in curves.items():
        clean = []
        for point in points:
            step, loss = point[0], point[1]
            if is_number(step) and is_number(loss) and math.isfinite(step) and math.isfinite(loss):
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
    for t in nice_ticks(y_lo, y_hi):
        y = sy(t)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{t:g}</text>')
    for t in nice_ticks(x_lo, x_hi):
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
        color = PALETTE[i % len(PALETTE)]
        if len(pts) == 1:
            parts.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        elif pts:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(
                f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5">'
                f"<title>{esc(stage)}</title></polyline>"
            )
        y = top + 10 + i * 18
        parts.append(f'<rect x="{left + plot_w + 10}" y="{y - 9}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{left + plot_w + 25}" y="{y}" font-size="11">{esc(stage)}</text>')
    parts.append("</svg>")
    out.append("\n".join(parts))
    return "\n".join(out)
