"""The files `lmmkit ablate` writes: ablation.json, a markdown table, an SVG plot and an HTML page.

The plot has two panels: POPE F1 (mean of the three splits, on the fixed probe subset) against the
training tokens each design had consumed when it was measured, and final POPE F1 (all questions)
against the visual tokens each image costs in the LLM's sequence. Plain SVG, no plotting library.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmmkit.atomic import atomic_write
from lmmkit.eval.charts import PALETTE, esc, nice_ticks
from lmmkit.eval.html import json_default, page
from lmmkit.eval.pope import SPLITS

PANEL_W, PANEL_H = 470, 340
LEFT, RIGHT, TOP, BOTTOM = 55, 15, 30, 45
# POPE is half yes, half no: answering "yes" to everything scores F1 2/3 (accuracy 0.5). A design near
# that line has not learned to read the image, whatever its F1 looks like.
ALWAYS_YES_F1 = 2 / 3


def _millions(n: float) -> str:
    """Token and parameter counts, short: 950, 12.3k, 4.56M."""
    if abs(n) >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}k" if abs(n) >= 1e3 else f"{n:g}"


def table_rows(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row of display strings per design (the markdown and HTML tables share them)."""
    rows = []
    for name, r in summary["designs"].items():
        pope, tok, sec = r["pope"], r["training_tokens"], r["seconds"]
        rows.append({
            "design": name,
            "visual tokens / image": str(r["tokens_per_image"]),
            "trainable params (align / sft)": f"{_millions(r['params']['trainable_align'])} / "
                                              f"{_millions(r['params']['trainable_sft'])}",
            "total params": _millions(r["params"]["total"]),
            "training tokens (visual)": f"{_millions(tok['total'])} ({_millions(tok['align']['visual'] + tok['sft']['visual'])})",
            **{f"F1 {s}": f"{pope[s]['f1']:.3f}" for s in SPLITS},
            "F1 mean": f"**{pope['mean_f1']:.3f}**",
            "accuracy": " / ".join(f"{pope[s]['accuracy']:.3f}" for s in SPLITS),
            "yes-ratio": " / ".join(f"{pope[s]['yes_ratio']:.2f}" for s in SPLITS),
            "LM loss": f"{r['lm_loss']['loss']:.3f}",
            "align s": f"{sec['align']:.0f}",
            "sft s": f"{sec['sft']:.0f}",
        })
    return rows


def format_markdown(summary: Mapping[str, Any]) -> str:
    """The main table, then POPE F1 on the probe subset at each measurement during SFT."""
    rows = table_rows(summary)
    if not rows:
        return "(no designs)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row[c] for c in cols) + " |" for row in rows]
    b = summary["budget"]
    lines += ["", f"Every design: align {b['align_steps']} + SFT {b['sft_steps']} steps, batch {b['batch_size']}, "
              f"lr {b['align_lr']:g} / {b['sft_lr']:g} (warmup {b['warmup_ratio']:g} + cosine), seed {b['seed']}, "
              f"{b['n_train']} training images. POPE: strict (official) parser, all questions of the held-out "
              "split; accuracy and yes-ratio per split (random / popular / adversarial). Answering \"yes\" to "
              "everything scores F1 0.667 at accuracy 0.5.", "",
              "POPE F1 (mean of 3 splits) on the probe subset during SFT, at SFT step (training tokens):", ""]
    for name, r in summary["designs"].items():
        points = ", ".join(f"{p['sft_step']} ({_millions(p['tokens'])}): {p['mean_f1']:.3f}" for p in r["curve"])
        lines.append(f"- {name}: {points}")
    return "\n".join(lines) + "\n"


def _axes(ox: float, x_range: tuple[float, float], y_range: tuple[float, float], x_label: str, title: str,
          x_fmt: Any = lambda v: f"{v:g}") -> tuple[list[str], Any, Any]:
    """A panel's frame, grid and labels at horizontal offset `ox`; returns (svg parts, sx, sy)."""
    (x_lo, x_hi), (y_lo, y_hi) = x_range, y_range
    w, h = PANEL_W - LEFT - RIGHT, PANEL_H - TOP - BOTTOM

    def sx(x: float) -> float:
        return ox + LEFT + w * (x - x_lo) / (x_hi - x_lo)

    def sy(y: float) -> float:
        return TOP + h * (1 - (y - y_lo) / (y_hi - y_lo))

    parts = [f'<text x="{ox + LEFT + w / 2:.1f}" y="18" font-size="13" text-anchor="middle">{esc(title)}</text>']
    for t in nice_ticks(y_lo, y_hi):
        parts.append(f'<line x1="{ox + LEFT}" y1="{sy(t):.1f}" x2="{ox + LEFT + w}" y2="{sy(t):.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{ox + LEFT - 6}" y="{sy(t) + 4:.1f}" font-size="11" text-anchor="end">{t:g}</text>')
    for t in nice_ticks(x_lo, x_hi):
        parts.append(f'<text x="{sx(t):.1f}" y="{TOP + h + 16}" font-size="11" text-anchor="middle">'
                     f"{esc(x_fmt(t))}</text>")
    parts.append(f'<rect x="{ox + LEFT}" y="{TOP}" width="{w}" height="{h}" fill="none" stroke="#333"/>')
    parts.append(f'<text x="{ox + LEFT + w / 2:.1f}" y="{PANEL_H - 8}" font-size="11" text-anchor="middle">'
                 f"{esc(x_label)}</text>")
    if y_lo < ALWAYS_YES_F1 < y_hi:
        y = sy(ALWAYS_YES_F1)
        parts.append(f'<line x1="{ox + LEFT}" y1="{y:.1f}" x2="{ox + LEFT + w}" y2="{y:.1f}" stroke="#888" '
                     'stroke-dasharray="5,4"/>')
        parts.append(f'<text x="{ox + LEFT + w - 4}" y="{y - 4:.1f}" font-size="10" fill="#666" text-anchor="end">'
                     'always "yes" (F1 0.667)</text>')
    mid = TOP + h / 2
    parts.append(f'<text x="{ox + 14}" y="{mid:.1f}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 {ox + 14} {mid:.1f})">POPE F1 (mean of 3 splits)</text>')
    return parts, sx, sy


def _y_range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values, default=0.0), max(values, default=1.0)
    lo, hi = max(0.0, lo - 0.05), min(1.0, hi + 0.05)
    return (lo, hi) if hi > lo else (max(0.0, lo - 0.1), min(1.0, hi + 0.1) if hi < 1 else 1.0)


def plot_svg(summary: Mapping[str, Any]) -> str:
    """Two panels: F1 vs training tokens (probe subset, one line per design); final F1 vs visual tokens."""
    designs = summary["designs"]
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(designs)}
    width = 2 * PANEL_W
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{PANEL_H + 30}" '
             f'viewBox="0 0 {width} {PANEL_H + 30}" role="img" aria-label="bridge ablation" font-family="sans-serif">',
             "<title>POPE F1 against training tokens and against visual tokens per image</title>",
             f'<rect width="{width}" height="{PANEL_H + 30}" fill="white"/>']
    curves = {n: [(p["tokens"], p["mean_f1"]) for p in r["curve"]] for n, r in designs.items()}
    xs = [x for pts in curves.values() for x, _ in pts] or [0.0, 1.0]
    x_hi = max(xs) if max(xs) > 0 else 1.0
    panel, sx, sy = _axes(0, (0.0, x_hi), _y_range([y for pts in curves.values() for _, y in pts]),
                          "training tokens (align + SFT)", "F1 during SFT (probe subset)", lambda v: _millions(v))
    parts += panel
    for name, pts in curves.items():
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colors[name]}" stroke-width="2">'
                     f"<title>{esc(name)}</title></polyline>")
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colors[name]}"/>' for x, y in pts]
    finals = {n: (r["tokens_per_image"], r["pope"]["mean_f1"]) for n, r in designs.items()}
    t_hi = max([t for t, _ in finals.values()] + [1]) * 1.1
    panel, sx, sy = _axes(PANEL_W, (0.0, t_hi), _y_range([f for _, f in finals.values()]),
                          "visual tokens per image (in the LLM sequence)", "final F1 (all POPE questions)")
    parts += panel
    for name, (t, f) in finals.items():
        parts.append(f'<circle cx="{sx(t):.1f}" cy="{sy(f):.1f}" r="5" fill="{colors[name]}">'
                     f"<title>{esc(name)}: {f:.3f}</title></circle>")
        parts.append(f'<text x="{sx(t) + 7:.1f}" y="{sy(f) + 4:.1f}" font-size="11">{esc(name)}</text>')
    for i, name in enumerate(designs):  # legend under both panels
        x = LEFT + i * (width - LEFT) / max(1, len(designs))
        parts.append(f'<rect x="{x:.1f}" y="{PANEL_H + 8}" width="12" height="12" fill="{colors[name]}"/>')
        parts.append(f'<text x="{x + 16:.1f}" y="{PANEL_H + 18}" font-size="12">{esc(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(summary: Mapping[str, Any], svg: str) -> str:
    rows = table_rows(summary)
    cols = list(rows[0]) if rows else []
    # 14 columns: smaller type, cells kept on one line, and a scroll bar rather than an overflowing page
    table = ['<div style="overflow-x:auto"><table style="font-size:.8em">',
             "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"]
    table += ["<tr>" + "".join(f'<td style="white-space:nowrap">{esc(r[c].strip("*"))}</td>' for c in cols) + "</tr>"
              for r in rows]
    table.append("</table></div>")
    notes = esc(format_markdown(summary).split("\n\n", 1)[-1]).replace("\n", "<br>\n")
    body = ("\n".join(table) + f'\n<p class="note">{notes}</p>\n{svg}\n<h2>Settings</h2>\n'
            f"<pre>{esc(json.dumps(summary['settings'], indent=1, default=json_default))}</pre>")
    return page("lmmkit ablate: bridge designs on ShapesWorld", body)


def write_outputs(summary: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Write ablation.json / .md / .svg / .html under `out`; returns their paths and the markdown table."""
    out = Path(out)
    svg = plot_svg(summary)
    table = format_markdown(summary)
    paths = {"json": atomic_write(out / "ablation.json", json.dumps(summary, indent=1, default=json_default)),
             "markdown": atomic_write(out / "ablation.md", "# lmmkit ablate\n\n" + table),
             "plot": atomic_write(out / "ablation.svg", svg),
             "html": atomic_write(out / "ablation.html", render_html(summary, svg))}
    return {**paths, "table": table}
