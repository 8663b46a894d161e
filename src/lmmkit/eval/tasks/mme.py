"""MME: paired yes/no questions per image, 14 subtasks; acc, acc+ and score per subtask.

Files as released: the eval tool's templates `mme/eval_tool/Your_Results/<subtask>.txt`
(image \\t question \\t Yes/No, two consecutive lines per image) and the images in
`mme/MME_Benchmark_release_version/<subtask>/` (directly, or in its `images/` folder). The
prompt is LLaVA-1.5's: the question without " Please answer yes or no." plus the short-answer
instruction. Strict scoring parses each response as the official tool reads it back from a
result file (tabs and line breaks turned to spaces, a trailing newline), and `write_results`
writes those files so the official calculation.py can be run on them too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from lmmkit.eval.backends.base import GenerationSettings
from lmmkit.eval.scoring.mme import (
    COGNITION,
    PERCEPTION,
    MMERow,
    parse_official,
    parse_robust,
    read_mme_file,
    write_mme_file,
)
from lmmkit.eval.scoring.mme import score_mme as score_mme_rows
from lmmkit.eval.tasks.base import LLAVA_SHORT, Item, Judge, Loaded, LoadError, TaskDataError, task_folder

SUFFIX = " Please answer yes or no."


def as_result_file_text(response: str) -> str:
    """The response as the official tool reads it from a result line: one line, newline-terminated."""
    return re.sub(r"[\t\r\n]", " ", response) + "\n"


class MMETask:
    name = "mme"
    settings = GenerationSettings(max_new_tokens=8)
    needs_judge = False

    def load(self, root: Path) -> Loaded:
        folder = task_folder(root, "mme")
        templates = folder / "eval_tool" / "Your_Results"
        files = {p.stem: p for p in sorted(templates.glob("*.txt"))}
        if not files:
            raise TaskDataError(f"{templates}: no MME template files (<subtask>.txt)")
        order = [t for t in (*PERCEPTION, *COGNITION) if t in files] + sorted(set(files) - {*PERCEPTION, *COGNITION})
        items: list[Item] = []
        errors: list[LoadError] = []
        for subtask in order:
            path = files[subtask]
            try:
                rows = read_mme_file(path)
            except ValueError as err:
                errors.append(LoadError(str(path), "(file)", str(err)))
                continue
            image_dir = folder / "MME_Benchmark_release_version" / subtask
            for start in range(0, len(rows) - 1, 2):
                pair = rows[start:start + 2]
                # acc+ needs both questions of an image: a pair with a problem is dropped whole.
                problems = []
                if pair[0].image != pair[1].image:
                    problems.append(f"lines {start + 1}-{start + 2} are not a pair (images {pair[0].image!r}, "
                                    f"{pair[1].image!r})")
                image = next((p for p in (image_dir / pair[0].image, image_dir / "images" / pair[0].image)
                              if p.is_file()), None)
                if image is None:
                    problems.append(f"image {pair[0].image} not found in {image_dir} or its images/ folder")
                if problems:
                    errors.append(LoadError(str(path), f"lines {start + 1}-{start + 2}", "; ".join(problems)))
                    continue
                for k, row in enumerate(pair):
                    prompt = row.question.removesuffix(SUFFIX).rstrip() + LLAVA_SHORT
                    items.append(Item(f"{subtask}/{start + k + 1}", prompt, [image], row.answer,
                                      {"subtask": subtask, "image": row.image, "question": row.question}))
            if len(rows) % 2:
                errors.append(LoadError(str(path), f"line {len(rows)}", "an unpaired last question (dropped)"))
        return Loaded(items, errors, str(folder))

    def select(self, items: Sequence[Item], limit: int) -> list[Item]:
        """--limit keeps whole pairs: at most `limit` questions per subtask."""
        kept, per = [], {}
        for it in items:
            per[it.meta["subtask"]] = per.get(it.meta["subtask"], 0) + 1
            if per[it.meta["subtask"]] <= limit - limit % 2:
                kept.append(it)
        return kept

    def score(self, items: Sequence[Item], responses: Sequence[str | None], judge: Judge | None = None,
              judge_runs: int = 1) -> dict:
        strict_rows: dict[str, list] = {}
        robust_rows: dict[str, list] = {}
        records = []
        for it, r in zip(items, responses, strict=True):
            official = parse_official(as_result_file_text(r)) if r is not None else "other"
            mine = (parse_robust(r) if r is not None else None) or "other"
            sub = it.meta["subtask"]
            strict_rows.setdefault(sub, []).append((it.meta["image"], it.answer, official))
            robust_rows.setdefault(sub, []).append((it.meta["image"], it.answer, mine))
            records.append({"id": it.id, "cluster": f"{sub}/{it.meta['image']}", "response": r, "answer": it.answer,
                            "strict": official, "robust": mine,
                            "correct_strict": official == it.answer.lower(),
                            "correct_robust": mine == it.answer.lower()})
        strict, robust = score_mme_rows(strict_rows), score_mme_rows(robust_rows)
        return {"strict": strict, "robust": robust,
                "unparseable": {"strict": sum(t["other_num"] for t in strict["tasks"].values()),
                                "robust": sum(t["other_num"] for t in robust["tasks"].values())},
                "items": records}

    @staticmethod
    def write_results(items: Sequence[Item], responses: Sequence[str | None], out: Path,
                      scored: dict | None = None) -> list[Path]:
        """The official result files (<subtask>.txt, 4 fields) for the official calculation.py."""
        by_task: dict[str, list[MMERow]] = {}
        for it, r in zip(items, responses, strict=True):
            by_task.setdefault(it.meta["subtask"], []).append(
                MMERow(it.meta["image"], it.meta["question"], it.answer, r or ""))
        return [write_mme_file(out / f"{task}.txt", rows) for task, rows in by_task.items()]
