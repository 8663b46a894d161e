"""The poison study as one hand-written SVG: attack success and clean accuracy against the poison ratio."""

from __future__ import annotations

from typing import Any

from lmmkit.eval.charts import PALETTE, esc

WIDTH, HEIGHT = 760, 340
LEFT, RIGHT, TOP, BOTTOM = 56, 270, 28, 46


def _series(study: dict[str, Any]) -> list[tuple[str, str, bool, list[tuple[float, float]]]]:
    """(label, colour, dashed, [(ratio, value)]) per line; the clean run is every line's p = 0 point."""
    runs = study["runs"]
    clean = next(r for r in runs if r["poisoned_stage"] == "none")
    out = []
    specs = [("align", "after_align", "asr_caption", "ASR after align (align poisoned)", PALETTE[1], False),
             ("align", "after_sft", "asr_caption", "ASR after clean SFT (align poisoned)", PALETTE[0], False),
             ("sft", "after_sft", "asr_caption", "ASR, caption prompt (SFT poisoned)", PALETTE[3], False),
             ("sft", "after_sft", "asr_question", "ASR, question prompt (SFT poisoned)", PALETTE[6], False),
             ("align", "after_sft", "pope_f1_mean", "clean POPE F1 (align poisoned)", PALETTE[2], True),
             ("sft", "after_sft", "pope_f1_mean", "clean POPE F1 (SFT poisoned)", PALETTE[4], True)]
    for stage, when, key, label, colour, dashed in specs:
        rows = [clean] + [r for r in runs if r["poisoned_stage"] == stage]
        points = [(r["ratio"], r[when][key]) for r in rows if r.get(when) and key in r[when]]
        if len(points) > 1:
            out.append((label, colour, dashed, sorted(points)))
    return out


def study_svg(study: dict[str, Any]) -> str:
    """Lines over the ratios, placed evenly (they are usually 0, 0.01, 0.05, 0.2: a linear axis would crowd
    the small ones), y from 0 to 1; legend on the right."""
    ratios = sorted({r["ratio"] for r in study["runs"]})
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(1, len(ratios) - 1)

    def sx(p: float) -> float:
        return LEFT + step * ratios.index(p)

    def sy(v: float) -> float:
        return TOP + plot_h * (1 - v)

    s = study.get("settings", {})
    title = f"ImgTrojan on the demo model: trigger {s.get('trigger', '?')}"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" role="img" '
             'aria-label="attack success rate and clean accuracy against the poison ratio">',
             f"<title>{esc(title)}</title>", f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
             f'<text x="{LEFT}" y="16" font-size="12">{esc(title)}</text>']
    for t in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<line x1="{LEFT}" y1="{sy(t):.1f}" x2="{LEFT + plot_w}" y2="{sy(t):.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{sy(t) + 4:.1f}" font-size="11" text-anchor="end">{t:g}</text>')
    for p in ratios:
        parts.append(f'<text x="{sx(p):.1f}" y="{TOP + plot_h + 16}" font-size="11" text-anchor="middle">{p:g}</text>')
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    parts.append(f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 8}" font-size="11" text-anchor="middle">'
                 "poison ratio p (share of the stage's pairs; evenly spaced)</text>")
    parts.append(f'<text x="14" y="{TOP + plot_h / 2:.1f}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 14 {TOP + plot_h / 2:.1f})">rate / F1</text>')
    for i, (label, colour, dashed, points) in enumerate(_series(study)):
        coords = " ".join(f"{sx(p):.1f},{sy(v):.1f}" for p, v in points)
        dash = ' stroke-dasharray="6 3"' if dashed else ""
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{dash}>'
                     f"<title>{esc(label)}</title></polyline>")
        for p, v in points:
            parts.append(f'<circle cx="{sx(p):.1f}" cy="{sy(v):.1f}" r="3" fill="{colour}">'
                         f"<title>{esc(label)} at p={p:g}: {v:.3f}</title></circle>")
        y = TOP + 10 + i * 20
        x = LEFT + plot_w + 12
        parts.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 20}" y2="{y - 4}" stroke="{colour}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{x + 26}" y="{y}" font-size="11">{esc(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
