"""ROC curves of the probe study as one hand-written SVG (no plotting library is a dependency)."""

from __future__ import annotations

from lmmkit.analysis.probe import SIGNALS
from lmmkit.analysis.probe_study import AGGREGATIONS
from lmmkit.eval.charts import PALETTE, esc

PANEL, MARGIN, GAP = 220, 48, 22
COLUMNS = 2
CELL_W, CELL_H = PANEL + MARGIN + GAP, PANEL + 76


def _panel(x0: float, y0: float, title: str, curves: dict) -> list[str]:
    """One square ROC panel: axes, the chance diagonal, one polyline per signal."""
    def sx(v: float) -> float:
        return x0 + PANEL * v

    def sy(v: float) -> float:
        return y0 + PANEL * (1 - v)

    parts = [f'<rect x="{x0}" y="{y0}" width="{PANEL}" height="{PANEL}" fill="none" stroke="#333"/>',
             f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(1)}" y2="{sy(1)}" stroke="#bbb" stroke-dasharray="4 3"/>',
             f'<text x="{x0 + PANEL / 2}" y="{y0 - 8}" font-size="12" text-anchor="middle">{esc(title)}</text>',
             f'<text x="{x0 + PANEL / 2}" y="{y0 + PANEL + 30}" font-size="10" text-anchor="middle">'
             "hallucinated mentions above threshold</text>",
             f'<text x="{x0 - 30}" y="{y0 + PANEL / 2}" font-size="10" text-anchor="middle" '
             f'transform="rotate(-90 {x0 - 30} {y0 + PANEL / 2})">grounded above threshold</text>']
    for t in (0, 0.5, 1):
        parts.append(f'<text x="{sx(t)}" y="{y0 + PANEL + 13}" font-size="9" text-anchor="middle">{t:g}</text>')
        parts.append(f'<text x="{x0 - 4}" y="{sy(t) + 3}" font-size="9" text-anchor="end">{t:g}</text>')
    for i, signal in enumerate(SIGNALS):
        entry = curves.get(signal)
        if not entry or not entry["roc"]:
            continue
        # A thousand thresholds land on a few hundred pixels: keep one point per distinct pixel position.
        coords = " ".join(dict.fromkeys(f"{sx(f):.0f},{sy(t):.0f}" for f, t in entry["roc"]))
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{PALETTE[i]}" stroke-width="1.6">'
                     f"<title>{esc(signal)}: AUROC {entry['estimate']:.3f}</title></polyline>")
        parts.append(f'<text x="{x0 + PANEL - 4}" y="{y0 + PANEL - 8 - 13 * (len(SIGNALS) - 1 - i)}" '
                     f'font-size="10" text-anchor="end" fill="{PALETTE[i]}">{entry["estimate"]:.2f}</text>')
    return parts


def roc_svg(study: dict) -> str:
    """Panels per (mention kind, aggregation), curves per signal, legend below."""
    panels = [(kind, agg) for kind, aggs in AGGREGATIONS.items() for agg in aggs
              if study[kind].get("auroc")]
    rows = max(1, -(-len(panels) // COLUMNS))
    width = MARGIN + COLUMNS * CELL_W
    height = rows * CELL_H + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" role="img" '
             'aria-label="ROC curves of hallucination probes">',
             "<title>Probe ROC: grounded (positive) vs hallucinated object mentions</title>",
             f'<rect width="{width}" height="{height}" fill="white"/>']
    for p, (kind, agg) in enumerate(panels):
        curves = {s: study[kind]["auroc"].get(f"{s}/{agg}") for s in SIGNALS}
        part = study[kind]
        where = "mean over tokens" if agg == "mean" else f"{agg} token"
        title = f"{kind}, {where} ({part['grounded']} vs {part['hallucinated']})"
        parts += _panel(MARGIN + (p % COLUMNS) * CELL_W, 24 + (p // COLUMNS) * CELL_H, title, curves)
    y = rows * CELL_H + 14
    for i, signal in enumerate(SIGNALS):
        x = MARGIN + i * 170
        parts.append(f'<line x1="{x}" y1="{y}" x2="{x + 22}" y2="{y}" stroke="{PALETTE[i]}" stroke-width="2"/>')
        parts.append(f'<text x="{x + 28}" y="{y + 4}" font-size="11">{esc(signal)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
