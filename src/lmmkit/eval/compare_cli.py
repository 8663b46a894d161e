"""The `lmmkit compare RUN_A RUN_B` subcommand: per task, B - A with a 95% interval and a paired test.

The numbers come from `lmmkit.eval.task_stats.compare_runs`; this module loads the runs, prints the table
and writes the optional JSON and HTML (a table per task and an inline-SVG forest plot).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from lmmkit.atomic import atomic_write
from lmmkit.eval.charts import esc
from lmmkit.eval.html import page
from lmmkit.eval.summary import fmt
from lmmkit.eval.task_stats import compare_runs

COLUMNS = ("metric", "A", "B", "B-A", "95% CI", "test", "p", "significant")


def load_run(path: str | Path) -> dict:
    """An `lmmkit eval` results dict from its output folder or its results.json."""
    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (pass an `lmmkit eval` output folder)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "tasks" not in data:
        raise ValueError(f"{path}: not an `lmmkit eval` results file (no 'tasks')")
    return data


def _num(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt(value)


def _signed(value: float) -> str:
    return ("+" if value > 0 else "") + _num(value)


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _cells(row: Mapping) -> list[str]:
    """One comparison row as the table's cells (A and B carry their own intervals)."""
    return [f"{row['metric']} ({row['parser']})",
            f"{_num(row['a'])} [{_num(row['a_low'])}, {_num(row['a_high'])}]",
            f"{_num(row['b'])} [{_num(row['b_low'])}, {_num(row['b_high'])}]",
            _signed(row["difference"]), f"[{_num(row['low'])}, {_num(row['high'])}]",
            row["test"], _p(row["p_value"]), "yes" if row["significant"] else "no"]


def _task_line(task: str, t: Mapping) -> str:
    how = "clustered by image" if t["clustered"] else "by item"
    return (f"{task}: {t['n_paired']} paired items (bootstrap {how}); "
            f"only in A {t['only_a']}, only in B {t['only_b']}")


def format_comparison(result: Mapping, names: Sequence[str] = ("A", "B")) -> str:
    """The plain-text table of `compare_runs`'s result, one block per task."""
    lines = [f"A: {names[0]}", f"B: {names[1]}",
             f"{result['n_boot']} bootstrap resamples (seed {result['seed']}); "
             f"significant: p < {result['alpha']}"]
    for task, t in result["tasks"].items():
        table = [list(COLUMNS)] + [_cells(row) for row in t["rows"]]
        widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
        lines += ["", _task_line(task, t)]
        for r in table:
            cells = [c.rjust(w) for c, w in zip(r, widths, strict=True)]
            lines.append("  " + "  ".join([r[0].ljust(widths[0]), *cells[1:]]))
    for task, why in result.get("skipped", {}).items():
        lines.append(f"\n{task}: not compared ({why})")
    return "\n".join(lines)


def forest_plot(result: Mapping) -> str:
    """Inline SVG: one row per compared metric, B - A as a dot with its interval as a whisker.

    Metrics have different units (F1, MME points, ratings), so each row has its own scale, centred on 0
    (the dashed line) and spanning the row's largest |value|."""
    rows = [(f"{task}: {r['metric']} ({r['parser']})", r)
            for task, t in result["tasks"].items() for r in t["rows"]]
    width, left, right, row_h, top = 820, 250, 170, 26, 34
    mid, half = left + (width - left - right) / 2, (width - left - right) / 2 - 6
    height = top + row_h * len(rows) + 24
    title = "B - A with 95% intervals (each row on its own scale, centred on 0)"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}"><title>{esc(title)}</title>',
             f'<text x="4" y="16" font-size="13" font-weight="600">{esc(title)}</text>',
             f'<line x1="{mid}" y1="{top - 6}" x2="{mid}" y2="{height - 20}" stroke="#999" '
             'stroke-dasharray="4 3"/>',
             f'<text x="{mid}" y="{height - 6}" font-size="11" text-anchor="middle" fill="#666">'
             "0 (no difference)</text>"]
    for i, (label, r) in enumerate(rows):
        y = top + i * row_h + row_h / 2
        known = [abs(v) for v in (r["difference"], r["low"], r["high"]) if not math.isnan(v)]
        span = max(known + [0.0]) or 1.0

        def x(v: float, span: float = span) -> float:
            return mid + v / span * half
        color = "#e15759" if r["significant"] else "#4e79a7"
        parts.append(f'<text x="4" y="{y + 4}" font-size="12">{esc(label[:40])}</text>')
        if not (math.isnan(r["low"]) or math.isnan(r["high"])):
            parts.append(f'<line x1="{x(r["low"]):.1f}" y1="{y}" x2="{x(r["high"]):.1f}" y2="{y}" '
                         f'stroke="{color}" stroke-width="2"/>')
            parts += [f'<line x1="{x(v):.1f}" y1="{y - 5}" x2="{x(v):.1f}" y2="{y + 5}" stroke="{color}" '
                      'stroke-width="2"/>' for v in (r["low"], r["high"])]
        parts.append(f'<circle cx="{x(r["difference"]):.1f}" cy="{y}" r="4.5" fill="{color}"/>')
        numbers = f'{_signed(r["difference"])} [{_num(r["low"])}, {_num(r["high"])}]'
        parts.append(f'<text x="{width - right + 8}" y="{y + 4}" font-size="12">{esc(numbers)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(result: Mapping, names: Sequence[str] = ("A", "B")) -> str:
    """A self-contained page: the runs, the forest plot and a table per task."""
    title = "lmmkit compare"
    body = [f"<p>A: <b>{esc(names[0])}</b><br>B: <b>{esc(names[1])}</b></p>",
            f'<p class="note">{result["n_boot"]} paired bootstrap resamples (seed {result["seed"]}); red = '
            f'significant at p &lt; {result["alpha"]} (McNemar for right/wrong items, else the paired '
            "bootstrap).</p>", forest_plot(result)]
    for task, t in result["tasks"].items():
        head = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
        rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in _cells(r)) + "</tr>" for r in t["rows"])
        body.append(f"<h2>{esc(task)}</h2>\n<p class=\"note\">{esc(_task_line(task, t))}</p>\n"
                    f"<table style=\"white-space:nowrap\"><tr>{head}</tr>{rows}</table>")
    if result.get("skipped"):
        body.append("<h2>Not compared</h2><ul>" + "".join(f"<li>{esc(t)}: {esc(why)}</li>"
                                                          for t, why in result["skipped"].items()) + "</ul>")
    return page(title, "\n".join(body))


def _compare(args: argparse.Namespace) -> int:
    try:
        a, b = load_run(args.run_a), load_run(args.run_b)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = [f"{run.get('model', '?')} [{path}]" for run, path in ((a, args.run_a), (b, args.run_b))]
    result = compare_runs(a, b, n_boot=args.n_boot, seed=args.seed)
    result["runs"] = {"a": str(args.run_a), "b": str(args.run_b)}
    print(format_comparison(result, names))
    if args.json:
        text = json.dumps(result, indent=2) + "\n"
        print(f"json: {atomic_write(args.json, text)}")
    if args.html:
        print(f"html: {atomic_write(args.html, render_html(result, names))}")
    return 0


def add_compare_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``compare RUN_A RUN_B [--json OUT] [--html OUT] [--n-boot N] [--seed S]`` to a CLI's subparsers."""
    p = subparsers.add_parser(
        "compare", help="paired comparison of two eval runs: B - A per task with 95%% intervals and tests",
        description="Pair the items of two `lmmkit eval` runs by id and, per task, report the main metric's "
                    "difference B - A with a paired-bootstrap 95% interval (clustered by image for POPE and "
                    "MME) and a paired test: exact McNemar for right/wrong items, the paired bootstrap "
                    "otherwise.")
    p.add_argument("run_a", metavar="RUN_A", help="the baseline eval output folder (or its results.json)")
    p.add_argument("run_b", metavar="RUN_B", help="the eval output folder compared with A (or its JSON)")
    p.add_argument("--json", metavar="OUT", help="also write every number as JSON")
    p.add_argument("--html", metavar="OUT", help="also write an HTML page with a forest plot of B - A")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=_compare)
