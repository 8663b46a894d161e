"""HTML + JSON for harness runs: one eval's report, and a comparison of several runs with plots."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from lmmkit.atomic import atomic_write
from lmmkit.eval.charts import PALETTE, esc
from lmmkit.eval.html import json_default, page
from lmmkit.eval.summary import fmt, headline, interval, main_metric

MAX_ITEMS_SHOWN = 50
CONTROLS = {"blind_control": "blank image", "no_image_control": "no image"}  # results key -> column label


def _task_section(task: str, res: Mapping, controls: Mapping[str, Mapping]) -> str:
    """Strict beside robust, then one column per blind control that ran this task (strict)."""
    head = ("<tr><th>metric</th><th>strict (official)</th><th>95% CI</th><th>robust (lmmkit)</th>"
            + "".join(f"<th>{esc(name)} (strict)</th>" for name in controls) + "</tr>")
    control_rows = {name: {m: sv for m, sv, _ in headline(task, r)} for name, r in controls.items()}
    rows = "".join(f"<tr><td>{esc(name)}</td><td>{fmt(sv)}</td><td>{esc(interval(res, name))}</td><td>{fmt(rv)}</td>"
                   + "".join(f"<td>{fmt(c.get(name))}</td>" for c in control_rows.values()) + "</tr>"
                   for name, sv, rv in headline(task, res))
    unp = res.get("unparseable") or {}
    notes = [f"{res.get('n_items', 0)} items from {esc(res.get('source', '?'))}",
             f"{res.get('model_calls', 0)} model calls, {res.get('from_cache', 0)} answers from the cache",
             f"unparseable answers: strict {esc(unp.get('strict', '-'))}, robust {esc(unp.get('robust', '-'))}",
             f"{len(res.get('failures') or [])} failed calls, {len(res.get('load_errors') or [])} bad records"]
    if res.get("judge"):
        notes.append(f"judge: {esc(res['judge'])}")
    problems = (res.get("load_errors") or [])[:20] + (res.get("failures") or [])[:20]
    problem_html = ("<details><summary>bad records and failures</summary><ul>"
                    + "".join(f"<li>{esc(p)}</li>" for p in problems) + "</ul></details>") if problems else ""
    items = res.get("items") or []
    item_html = ""
    if items:
        keys = [k for k in items[0] if k not in ("grader_replies", "judge_replies")]
        body = "".join("<tr>" + "".join(f"<td>{esc(json.dumps(it.get(k), default=str)[:120])}</td>" for k in keys)
                       + "</tr>" for it in items[:MAX_ITEMS_SHOWN])
        item_html = (f"<details><summary>first {min(len(items), MAX_ITEMS_SHOWN)} of {len(items)} items "
                     "(all are in results.json)</summary><table><tr>"
                     + "".join(f"<th>{esc(k)}</th>" for k in keys) + f"</tr>{body}</table></details>")
    return (f"<h2>{esc(task)}</h2>\n<table>{head}{rows}</table>\n<p class=\"note\">{' &middot; '.join(notes)}</p>"
            f"\n{problem_html}\n{item_html}")


def render_eval_html(results: Mapping) -> str:
    controls = {label: results.get(key) or {} for key, label in CONTROLS.items()}
    sections = [f"<p>model <b>{esc(results.get('model'))}</b>; data {esc(results.get('data_root'))}"
                + (f"; judge {esc(results['judge'])} x {results.get('judge_runs', 1)} runs" if results.get("judge")
                   else "") + "</p>"]
    sections += [_task_section(t, r, {label: c[t] for label, c in controls.items() if t in c})
                 for t, r in results.get("tasks", {}).items()]
    return page("lmmkit eval", "\n".join(sections))


def write_eval_report(results: Mapping, out: Path) -> tuple[Path, Path]:
    """out/results.json (every item's prediction, parse and score) and out/report.html, atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "results.json", out / "report.html"
    atomic_write(json_path, json.dumps(results, indent=2, ensure_ascii=False, default=json_default) + "\n")
    atomic_write(html_path, render_eval_html(results))
    return json_path, html_path


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float | None]) -> str:
    """A small horizontal bar chart (inline SVG), one bar per run."""
    known = [v for v in values if v is not None]
    top = max(known + [1e-9])
    row_h, left, width = 26, 220, 640
    height = row_h * len(labels) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}"><title>{esc(title)}</title>',
             f'<text x="4" y="16" font-size="13" font-weight="600">{esc(title)}</text>']
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        y = 26 + i * row_h
        w = 0 if v is None else (width - left - 70) * v / top
        parts.append(f'<text x="4" y="{y + 15}" font-size="12">{esc(label[:32])}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" '
                     f'fill="{PALETTE[i % len(PALETTE)]}"/>')
        parts.append(f'<text x="{left + w + 4:.1f}" y="{y + 15}" font-size="12">{fmt(v)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _load_run(path: Path) -> dict:
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (pass an `lmmkit eval` output folder)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if "tasks" not in data:
        raise ValueError(f"{path}: not an `lmmkit eval` results file (no 'tasks')")
    return data


def write_comparison(runs: Sequence[Path], out: Path) -> Path:
    """One HTML page: per task, a table of every headline metric by run and a bar chart of the main one."""
    loaded = [_load_run(Path(r)) for r in runs]
    names = [f"{d.get('model', '?')} [{Path(r).name}]" for d, r in zip(loaded, runs, strict=True)]
    tasks: list[str] = []
    for d in loaded:
        tasks += [t for t in d["tasks"] if t not in tasks]
    sections = []
    for task in tasks:
        present = [(n, d["tasks"][task]) for n, d in zip(names, loaded, strict=True) if task in d["tasks"]]
        metrics = [m for m, _, _ in headline(task, present[0][1])]
        table = ("<table><tr><th>metric (strict / robust)</th>" + "".join(f"<th>{esc(n)}</th>" for n, _ in present)
                 + "</tr>")
        for m in metrics:
            cells = []
            for _, res in present:
                row = {name: (sv, rv) for name, sv, rv in headline(task, res)}.get(m, (None, None))
                cells.append(f"<td>{fmt(row[0])}" + (f" / {fmt(row[1])}" if row[1] is not None else "") + "</td>")
            table += f"<tr><td>{esc(m)}</td>{''.join(cells)}</tr>"
        table += "</table>"
        metric = main_metric(task, present[0][1])[0]
        chart = bar_chart(f"{task}: {metric} (strict)", [n for n, _ in present],
                          [main_metric(task, r)[1] for _, r in present])
        sections.append(f"<h2>{esc(task)}</h2>\n{chart}\n{table}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, page(f"lmmkit: {len(runs)} eval runs compared", "\n".join(sections)))
    return out


def intervals_section(intervals: Mapping, title: str = "95% intervals (bootstrap, clustered by image)") -> str:
    """{parser: {metric: {estimate, low, high}}} as a table."""
    rows = "".join(f"<tr><td>{esc(parser)}</td><td>{esc(metric)}</td><td>{fmt(ci['estimate'])}</td>"
                   f"<td>[{fmt(ci['low'])}, {fmt(ci['high'])}]</td></tr>"
                   for parser, metrics in intervals.items() for metric, ci in metrics.items())
    return (f"<h2>{esc(title)}</h2>\n<table><tr><th>parser</th><th>metric</th><th>estimate</th><th>95% CI</th>"
            f"</tr>{rows}</table>")


def stage_effects_section(effects: Mapping) -> str:
    """{"a -> b": [compare rows]}: what each training stage changed, with a paired test."""
    rows = "".join(
        f"<tr><td>{esc(stage)}</td><td>{esc(r['parser'])}</td><td>{esc(r['metric'])}</td><td>{fmt(r['a'])}</td>"
        f"<td>{fmt(r['b'])}</td><td>{fmt(r['difference'])}</td><td>[{fmt(r['low'])}, {fmt(r['high'])}]</td>"
        f"<td>{esc(r['test'])}</td><td>{r['p_value']:.2g}</td><td>{'yes' if r['significant'] else 'no'}</td></tr>"
        for stage, stage_rows in effects.items() for r in stage_rows)
    return ("<h2>What each stage changed (paired, same questions)</h2>\n<table><tr><th>stages</th><th>parser</th>"
            "<th>metric</th><th>before</th><th>after</th><th>difference</th><th>95% CI</th><th>test</th><th>p</th>"
            f"<th>significant (0.05)</th></tr>{rows}</table>")
