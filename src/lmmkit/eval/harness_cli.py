"""``lmmkit score TASK --from lmms-eval|vlmevalkit FILE`` and ``lmmkit score --diff A B``: the options and the
command, to be wired into ``lmmkit score`` (`add_log_options` on its parser, `run_log_command` when
``args.log_from`` or ``args.diff`` is set)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmmkit.eval.harness_diff import (
    SCORINGS,
    diff_scorings,
    diff_text,
    reason_counts,
    results_view,
    scoring_view,
)
from lmmkit.eval.harness_logs import HARNESSES, TASKS, HarnessLogError, dump_result, rescore_log
from lmmkit.eval.rescore_format import run_and_print


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """Add --from, --diff, --a-scoring, --b-scoring, --show, and --task, --json unless the parser has them."""
    g = parser.add_argument_group("other harnesses' per-item outputs")
    g.add_argument("--from", dest="log_from", choices=HARNESSES, metavar="HARNESS",
                   help="FILE is an lmms-eval --log_samples file (*_samples_<task>.jsonl) or a VLMEvalKit "
                        "prediction file (<model>_<dataset>.xlsx/.tsv/.csv); rescore it with the official "
                        "rules")
    g.add_argument("--diff", nargs=2, metavar=("A", "B"),
                   help="list the items on which two scorings disagree, and why: A and B are harness files "
                        "or `lmmkit eval` results.json files (one file twice with --a-scoring/--b-scoring)")
    g.add_argument("--a-scoring", choices=SCORINGS,
                   help="A's scoring: the harness's own verdicts (default for harness files), lmmkit strict "
                        "(default for results.json) or robust")
    g.add_argument("--b-scoring", choices=SCORINGS, help="B's scoring (defaults as for A)")
    g.add_argument("--show", type=int, default=50, metavar="N",
                   help="disagreements printed (all go to --json)")
    for flag, kwargs in (("--task", {"choices": TASKS, "help": "the task, when the file name does not tell"}),
                         ("--json", {"metavar": "OUT", "help": "also write every number and item as JSON"})):
        try:
            g.add_argument(flag, **kwargs)
        except argparse.ArgumentError:
            pass  # the host parser has its own (lmmkit score's --json)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _headline(task: str, m: Mapping | None, harness: str | None = None) -> str:
    """One line of the scoring's main numbers."""
    if m is None:
        return "not recomputable (no per-item verdicts in the file)"
    if task == "pope":
        o = m.get("overall", m)
        line = (f"accuracy {_pct(o['accuracy'])}, precision {_pct(o['precision'])}, "
                f"recall {_pct(o['recall'])}, F1 {_pct(o['f1'])}")
        if "yes_ratio" in o:  # lmms-eval's is the share of yes labels
            line += f", yes ratio{' (of labels)' if 'yes_ratio_is' in o else ''} {_pct(o['yes_ratio'])}"
        if m.get("mean_f1") is not None:
            line += f"; mean F1 over {len(m['splits'])} splits {_pct(m['mean_f1'])}"
        elif harness == "vlmevalkit" and m.get("splits"):
            line += "; " + ", ".join(f"{c} F1 {_pct(s['f1'])}" for c, s in m["splits"].items())
        return line
    if task == "mme":
        return f"perception {m['perception_total']:.2f}, cognition {m['cognition_total']:.2f}" + (
            f", other {m['other_total']:.2f}" if m.get("other_total") else "")
    if task == "mmmu":
        return f"accuracy {_pct(m.get('acc_official', m['acc']))} ({m['correct']}/{m['total']})"
    line = f"accuracy {_pct(m.get('accuracy', m.get('acc')))} ({m['correct']}/{m['total']})"
    if m.get("judge_extractions"):
        line += f"; {m['judge_extractions']} by the harness's recorded extraction"
    return line


def rescore_text(result: Mapping) -> str:
    """What ``lmmkit score TASK --from HARNESS FILE`` prints."""
    task, harness, unp = result["task"], result["harness"], result["unparseable"]
    dis = result["disagreements"]
    lines = [f"{task} from {harness}: {result['file']} ({result['n_items']} items)",
             f"strict (official rules):  {_headline(task, result.get('strict'))}; "
             + ("seeded random letters" if task == "mmmu" else "unparseable") + f" {unp.get('strict')}",
             f"robust (lmmkit's parser): {_headline(task, result.get('robust'))}; "
             f"unparseable {unp.get('robust')}",
             f"{harness} as recorded: {_headline(task, result.get('harness_own'), harness)}",
             f"items where strict and {harness} disagree: {dis['n']} ("
             + ", ".join(f"{r} {n}" for r, n in dis["strict_vs_harness"].items()) + ")"]
    return "\n".join(lines) + "\n"


def _is_results_json(path: str) -> Any:
    """The loaded dict when `path` is an ``lmmkit eval`` results.json, else None."""
    if Path(path).suffix.lower() != ".json":
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("tasks"), dict) else None


def _side(path: str, results: Any, task: str | None, scoring: str | None,
          notes: list[str]) -> tuple[str, str, dict]:
    """(task, scoring, view) of one --diff side; `results` is the loaded results.json, or None."""
    if results is not None:
        task, view = results_view(results, task, scoring or "strict")
        return task, scoring or "strict", view
    result = rescore_log(path, task)
    which = scoring or "harness"
    view = scoring_view(result, which)
    if not view and scoring is None:  # the file holds no per-item verdict of the harness's own
        notes.append(f"{path}: no per-item verdicts of {result['harness']}'s own; "
                     "comparing lmmkit strict instead")
        which, view = "strict", scoring_view(result, "strict")
    return result["task"], which, view


def _diff_command(args: argparse.Namespace, task: str | None) -> dict:
    a_path, b_path = args.diff
    notes: list[str] = []
    order = [(0, a_path, _is_results_json(a_path), args.a_scoring),
             (1, b_path, _is_results_json(b_path), args.b_scoring)]
    order.sort(key=lambda side: side[2] is not None)  # harness files first: they tell the task
    sides: list[Any] = [None, None]
    for k, path, results, scoring in order:
        sides[k] = _side(path, results, task, scoring, notes)
        task = task or sides[k][0]
    (ta, sa, va), (tb, sb, vb) = sides
    if ta != tb:
        raise HarnessLogError(f"{a_path} is {ta} but {b_path} is {tb}")
    diffs = diff_scorings(va, vb)
    common = sum(1 for i in va if i in vb)
    a_name, b_name = f"{a_path} [{sa}]", f"{b_path} [{sb}]"
    text = diff_text(diffs, a_name, b_name, len(va), len(vb), common, args.show)
    if not common:
        notes.append("no item id is in both: the two files name their items differently")
    return {"task": ta, "a": {"file": a_path, "scoring": sa, "n": len(va)},
            "b": {"file": b_path, "scoring": sb, "n": len(vb)}, "common": common,
            "counts": reason_counts(diffs), "disagreements": diffs, "text": text, "warnings": [],
            "notes": notes}


def _task_and_file(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    task = getattr(args, "task", None) or getattr(args, "score_task", None)
    paths = list(getattr(args, "paths", None) or [])
    return task, paths


def run_log_command(args: argparse.Namespace) -> int:
    """Run --from or --diff as parsed by `add_log_options`; print the summary; 0 on success, 2 on bad input.
    The task comes from --task or ``args.score_task``, the file from ``args.paths`` (lmmkit score's PATH)."""
    task, paths = _task_and_file(args)

    def compute() -> dict:
        if getattr(args, "diff", None):
            return _diff_command(args, task)
        if getattr(args, "log_from", None):
            if len(paths) != 1:
                raise HarnessLogError(f"--from {args.log_from} takes one FILE, got {len(paths)}")
            result = rescore_log(paths[0], task, args.log_from)
            result["text"] = rescore_text(result)
            return result
        raise HarnessLogError("give --from HARNESS FILE, or --diff A B")
    return run_and_print(compute, getattr(args, "json", None), dump_result)
