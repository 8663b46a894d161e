"""The `lmmkit score` subcommand: argument parsing and printing around `lmmkit.eval.rescore`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmmkit.eval.harness_cli import add_log_options, run_log_command
from lmmkit.eval.rescore import (
    MODES,
    RescoreError,
    score_mathvista_output,
    score_mme_results,
    score_mmmu_eval_only,
    score_mmmu_outputs,
    score_mmvet_grades,
    score_pope_llava,
    score_pope_pairs,
)
from lmmkit.eval.rescore_format import run_and_print

LOG_TASKS = ("pope", "mme", "mmmu", "mathvista")  # tasks other harnesses' logs are read for


def _run(args: argparse.Namespace) -> dict:
    task, mode, paths = args.score_task, args.mode, args.paths
    if task == "pope":
        if args.llava:
            if paths or not (args.questions and args.labels_dir):
                raise RescoreError("pope --llava ANSWERS needs --questions and --labels-dir, and no other PATH")
            return score_pope_llava(args.llava, args.questions, args.labels_dir, mode)
        if not paths or len(paths) % 2:
            raise RescoreError("pope needs ANSWERS LABELS pairs (or --llava ANSWERS --questions Q --labels-dir DIR)")
        return score_pope_pairs(list(zip(paths[::2], paths[1::2], strict=True)), mode)
    if task == "mmmu":
        if len(paths) == 1 and Path(paths[0]).is_dir():
            return score_mmmu_outputs(paths[0], mode, all_subjects=args.all_subjects)
        if len(paths) != 2:
            raise RescoreError("mmmu needs OUTPUTS_DIR, or PREDICTIONS.json ANSWER_DICT.json (eval-only)")
        return score_mmmu_eval_only(paths[0], paths[1], mode)
    if len(paths) != 1:
        raise RescoreError(f"{task} takes one PATH, got {len(paths)}")
    if task == "mme":
        return score_mme_results(paths[0], mode)
    if task == "mathvista":
        return score_mathvista_output(paths[0], mode, args.scores_out)
    return score_mmvet_grades(paths[0], mode, args.mmvet_json)


def _score_command(args: argparse.Namespace) -> int:
    if getattr(args, "log_from", None) or getattr(args, "diff", None):
        return run_log_command(args)
    return run_and_print(lambda: _run(args), args.json, lambda r: json.dumps(r, indent=2, default=str) + "\n")


_TASK_HELP = {
    "pope": ("ANSWERS LABELS [ANSWERS LABELS ...]: JSON lines with 'answer' and with 'label', paired by "
             "position (RUCAIBox/POPE evaluate.py); or --llava ANSWERS --questions Q --labels-dir DIR"),
    "mme": "RESULTS_DIR: the MME eval tool's <subtask>.txt result files (calculation.py)",
    "mmmu": "OUTPUTS_DIR with <Subject>/output.json (parse-and-eval), or PREDICTIONS.json ANSWER_DICT.json (eval-only)",
    "mathvista": "OUTPUT.json: the released output format {pid: problem with 'extraction'} (calculate_score.py)",
    "mmvet": "GRADES.json: the evaluator's <model>_<judge>-grade-<N>runs.json",
}


def add_score_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``score TASK PATH... [--mode strict|robust|both] [--json OUT]`` to a CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--mode", choices=MODES, default="strict",
                        help="strict: the official scorer's numbers and text; robust: lmmkit's parser on the raw "
                             "responses, with the unparseable count; both (default: strict)")
    common.add_argument("--json", metavar="OUT", help="also write every number, warning and the text as JSON")
    p = subparsers.add_parser("score", help="rescore existing prediction files with a benchmark's own scorer (no model)",
                              description="Rescore released prediction files exactly as the official scorer does.")
    tasks = p.add_subparsers(dest="score_task", required=True, metavar="TASK")
    for task, usage in _TASK_HELP.items():
        q = tasks.add_parser(task, parents=[common], help=usage, description=usage)
        q.add_argument("paths", nargs="*", metavar="PATH")
        if task == "pope":
            q.add_argument("--llava", metavar="ANSWERS", help="LLaVA's answers (JSON lines {question_id, text})")
            q.add_argument("--questions", help="LLaVA's question file (llava_pope_test.jsonl, with 'category')")
            q.add_argument("--labels-dir", help="folder of coco_pope_<category>.json label files")
        if task == "mmmu":
            q.add_argument("--all-subjects", action="store_true",
                           help="also score subject folders outside the official 30 (the official skips them)")
        if task == "mathvista":
            q.add_argument("--scores-out", metavar="FILE",
                           help="write the scores file in the released scores_<model>.json format")
        if task == "mmvet":
            q.add_argument("--mmvet-json", metavar="FILE", help="mm-vet.json, for the per-capability totals")
        if task in LOG_TASKS:  # lmms-eval / VLMEvalKit per-item logs, and --diff of two scorings
            add_log_options(q)
        q.set_defaults(func=_score_command)
