"""MM-Vet: open-ended questions graded 0-1 by an LLM judge against the reference answer.

Files: the released `mmvet/mm-vet.json` ({id: {imagename, question, answer, capability}}) with
images in `mmvet/images/`. The prompt is the raw question. Grading follows the official protocol
(few-shot grader prompt, temperature 0, retries with a hint up to 5 tries, else 0); with
--judge-runs N the grading is repeated and the mean and spread are reported. lmmkit's grader prompt
is its own wording of the official one: scores from different prompts or judges are not
comparable, so the judge is always reported beside the score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lmmkit.atomic import atomic_write
from lmmkit.eval.backends.base import GenerationSettings
from lmmkit.eval.scoring.mmvet import (
    aggregate_mmvet,
    build_grader_prompt,
    grade_with_retries,
    parse_grader_score,
)
from lmmkit.eval.tasks.base import Item, Judge, Loaded, LoadError, read_json_file, task_folder
from lmmkit.eval.tasks.judged import judge_map


class MMVetTask:
    name = "mmvet"
    settings = GenerationSettings(max_new_tokens=128)
    needs_judge = True

    def load(self, root: Path) -> Loaded:
        folder = task_folder(root, "mmvet")
        path, data = read_json_file(folder, "mm-vet.json")
        items, errors = [], []
        for qid, row in data.items():
            missing = [k for k in ("imagename", "question", "answer") if k not in row]
            if missing:
                errors.append(LoadError(str(path), qid, f"missing field(s) {', '.join(missing)}"))
                continue
            image = folder / "images" / row["imagename"]
            if not image.is_file():
                errors.append(LoadError(str(path), qid, f"image {image} not found"))
                continue
            items.append(Item(qid, row["question"], [image], row["answer"],
                              {"capability": list(row.get("capability") or [])}))
        return Loaded(items, errors, str(folder))

    def score(self, items: Sequence[Item], responses: Sequence[str | None], judge: Judge | None = None,
              judge_runs: int = 1) -> dict:
        if judge is None:
            raise ValueError("mmvet needs a judge")
        runs, failed = [], 0
        replies: list[list[list[str]]] = []
        for run in range(judge_runs):
            def grade(i: int, run: int = run) -> tuple[float, list[str]]:
                prompt = build_grader_prompt(items[i].prompt, items[i].answer,
                                             responses[i] or "")
                return grade_with_retries(lambda p, t: judge.ask(p, t, run=run, max_new_tokens=8), prompt)
            graded = judge_map(judge, grade, len(items), f"mmvet grading (run {run + 1}/{judge_runs})")
            runs.append({it.id: score for it, (score, _) in zip(items, graded, strict=True)})
            replies.append([r for _, r in graded])
            failed += sum(parse_grader_score(r[-1]) is None for _, r in graded)
        caps = {it.id: it.meta["capability"] for it in items} if all(it.meta["capability"] for it in items) else None
        total = aggregate_mmvet(runs, caps)
        records = [{"id": it.id, "response": r, "answer": it.answer, "scores": [run[it.id] for run in runs],
                    "grader_replies": [rep[i] for rep in replies]}
                   for i, (it, r) in enumerate(zip(items, responses, strict=True))]
        return {"strict": total, "robust": None,
                "unparseable": {"strict": failed, "robust": None}, "items": records}

    @staticmethod
    def write_results(items: Sequence[Item], responses: Sequence[str | None], out: Path,
                      scored: dict | None = None) -> list[Path]:
        """The official evaluator's input: {id: answer} JSON."""
        answers = {it.id: r or "" for it, r in zip(items, responses, strict=True)}
        return [atomic_write(out / "results.json", json.dumps(answers, indent=2, ensure_ascii=False))]
