"""The `lmmkit data inspect` page: one self-contained HTML file (inline SVG, no scripts, no assets)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from lmmkit.atomic import atomic_write
from lmmkit.data.inspect_data import InspectStats, summarize
from lmmkit.eval.charts import PALETTE, esc, nice_ticks
from lmmkit.eval.html import page

MAX_BARS = 30
_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 460, 240, 52, 12, 26, 44


def bins(counts: Counter, max_bars: int = MAX_BARS) -> list[tuple[str, int]]:
    """(label, count) bars: one per value when there are few distinct values, else equal-width
    integer ranges from min to max."""
    if not counts:
        return []
    lo, hi = min(counts), max(counts)
    if hi - lo < max_bars:
        return [(str(v), counts.get(v, 0)) for v in range(lo, hi + 1)]
    width = math.ceil((hi - lo + 1) / max_bars)
    bars = [0] * math.ceil((hi - lo + 1) / width)
    for value, n in counts.items():
        bars[(value - lo) // width] += n
    return [(f"{lo + i * width}-{lo + (i + 1) * width - 1}", n) for i, n in enumerate(bars)]


def _frame(title: str, xlabel: str, ylabel: str, y_max: float) -> tuple[list[str], float, float]:
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
             f'role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>',
             f'<text x="{_W / 2}" y="15" font-size="13" text-anchor="middle" font-weight="600">{esc(title)}</text>']
    for tick in nice_ticks(0, y_max, 4):
        y = _TOP + plot_h * (1 - tick / y_max)
        parts.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + plot_w}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{_LEFT - 5}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{tick:g}</text>')
    parts.append(f'<line x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{_LEFT + plot_w}" y2="{_TOP + plot_h}" stroke="#333"/>')
    parts.append(f'<text x="{_LEFT + plot_w / 2}" y="{_H - 6}" font-size="11" text-anchor="middle">{esc(xlabel)}</text>')
    parts.append(f'<text x="12" y="{_TOP + plot_h / 2}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 12 {_TOP + plot_h / 2})">{esc(ylabel)}</text>')
    return parts, plot_w, plot_h


def bar_chart(bars: list[tuple[str, int]], title: str, xlabel: str, color: str = PALETTE[0],
              ylabel: str = "records") -> str:
    """A histogram as SVG bars; each bar's tooltip gives its range and count."""
    if not bars:
        return f'<p class="note">{esc(title)}: no data</p>'
    y_max = max(1, max(n for _, n in bars))
    parts, plot_w, plot_h = _frame(title, xlabel, ylabel, y_max)
    step = plot_w / len(bars)
    label_every = max(1, math.ceil(len(bars) / 8))  # keep the axis labels from overlapping
    for i, (label, n) in enumerate(bars):
        h = plot_h * n / y_max
        x = _LEFT + i * step
        parts.append(f'<rect x="{x + step * 0.08:.1f}" y="{_TOP + plot_h - h:.1f}" width="{step * 0.84:.1f}" '
                     f'height="{h:.1f}" fill="{color}"><title>{esc(label)}: {n}</title></rect>')
        if i % label_every == 0:
            parts.append(f'<text x="{x + step / 2:.1f}" y="{_TOP + plot_h + 14}" font-size="9" '
                         f'text-anchor="middle">{esc(label.split("-")[0])}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def scatter(points: list[tuple[int, int]], title: str) -> str:
    """Image width x height, one dot per sampled image."""
    if not points:
        return f'<p class="note">{esc(title)}: no images</p>'
    x_max = max(w for w, _ in points) * 1.05
    y_max = max(h for _, h in points) * 1.05
    parts, plot_w, plot_h = _frame(title, "width (px)", "height (px)", y_max)
    for w, h in points:
        parts.append(f'<circle cx="{_LEFT + plot_w * w / x_max:.1f}" cy="{_TOP + plot_h * (1 - h / y_max):.1f}" '
                     f'r="2.2" fill="{PALETTE[1]}" fill-opacity="0.55"/>')
    for tick in nice_ticks(0, x_max, 4):
        parts.append(f'<text x="{_LEFT + plot_w * tick / x_max:.1f}" y="{_TOP + plot_h + 14}" font-size="9" '
                     f'text-anchor="middle">{tick:g}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _summary_rows(stats: InspectStats) -> str:
    rows = []
    for label, counts in (("images per sample", stats.images_per_sample), ("image width (px)", stats.widths),
                          ("image height (px)", stats.heights), ("answer length (chars)", stats.answer_chars),
                          (f"text tokens ({stats.tokenizer})", stats.token_lengths)):
        s = summarize(counts)
        if s is not None:
            rows.append(f"<tr><td>{esc(label)}</td>" + "".join(f"<td>{s[k]:g}</td>" for k in
                                                                 ("min", "median", "p95", "max", "mean")) + "</tr>")
    return ("<table><tr><th>distribution</th><th>min</th><th>median</th><th>p95</th><th>max</th><th>mean</th></tr>"
            + "".join(rows) + "</table>")


def render_inspect_page(stats: InspectStats) -> str:
    limited = f" (stopped at --limit {stats.limit})" if stats.limit_reached else ""
    counts = (f'<table id="counts"><tr><th>records</th><td id="n-records">{stats.n_records}</td></tr>'
              f'<tr><th>bad records (skipped)</th><td id="n-bad">{stats.n_bad}</td></tr>'
              f'<tr><th>images</th><td id="n-images">{stats.n_images}</td></tr>'
              f"<tr><th>seconds</th><td>{stats.seconds:.1f}</td></tr></table>"
              f'<p class="note">source <code>{esc(stats.source)}</code>{esc(limited)}</p>')
    bad = ['<h2>Bad records</h2>']
    if stats.n_bad:
        bad.append("<table><tr><th>reason</th><th>count</th><th style=\"text-align:left\">examples</th></tr>")
        for reason, n in stats.counter.as_dict().items():
            examples = "<br>".join(esc(e) for e in stats.counter.examples(reason))
            bad.append(f'<tr><td>{esc(reason)}</td><td>{n}</td><td style="text-align:left">{examples}</td></tr>')
        bad.append("</table>")
    else:
        bad.append('<p class="note">none</p>')
    charts = [bar_chart(bins(stats.images_per_sample), "Images per sample", "images"),
              bar_chart(bins(stats.long_sides), "Image size: longer side", "pixels", PALETTE[2], "images"),
              scatter(stats.size_sample, f"Image sizes ({len(stats.size_sample)} sampled)"),
              bar_chart(bins(stats.token_lengths), f"Text tokens per sample ({stats.tokenizer})", "tokens",
                        PALETTE[3]) if stats.token_lengths else '<p class="note">no tokenizer: no token lengths</p>',
              bar_chart(bins(stats.answer_chars), "Answer length", "characters", PALETTE[4])]
    body = (counts + "".join(bad) + "<h2>Distributions</h2>" + _summary_rows(stats)
            + '<div class="charts">' + "\n".join(charts) + "</div>"
            + '<p class="note">Token lengths are the chat-template text; each image adds the model\'s visual '
              "tokens on top.</p>")
    return page(f"Data inspection: {stats.source}", body)


def write_inspect(stats: InspectStats, out_dir: Path) -> tuple[Path, Path]:
    """inspect.html and inspect.json in `out_dir`."""
    out_dir = Path(out_dir)
    html_path = atomic_write(out_dir / "inspect.html", render_inspect_page(stats))
    json_path = atomic_write(out_dir / "inspect.json", json.dumps(stats.as_dict(), indent=1) + "\n")
    return html_path, json_path
