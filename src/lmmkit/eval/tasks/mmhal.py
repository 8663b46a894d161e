"""MMHal-Bench: hallucination probes rated 0-6 by an LLM judge; average and hallucination rate.

Files: the released `mmhal/response_template.json` (a list of {question_type, image_src,
image_content, question, gt_answer, ...}) with the images in `mmhal/images/`, named as the
basename of image_src. The judge sees the image's object labels, the question, the reference
answer and the response; its rating is the single "rating: s" in its reply (else 0, the official
rule). --judge-runs N repeats the rating; the report gives each run and the mean and spread.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lmmkit.atomic import atomic_write
from lmmkit.eval.backends.base import GenerationSettings
from lmmkit.eval.scoring.mmhal import aggregate_mmhal, build_judge_prompt, parse_rating
from lmmkit.eval.tasks.base import Item, Judge, Loaded, LoadError, read_json_file, task_folder
from lmmkit.eval.tasks.judged import judge_map, mean_std


class MMHalTask:
    name = "mmhal"
    settings = GenerationSettings(max_new_tokens=128)
    needs_judge = True

    def load(self, root: Path) -> Loaded:
        folder = task_folder(root, "mmhal")
        path, data = read_json_file(folder, "response_template.json")
        items, errors = [], []
        for i, row in enumerate(data):
            missing = [k for k in ("image_src", "question", "gt_answer") if k not in row]
            if missing:
                errors.append(LoadError(str(path), f"item {i}", f"missing field(s) {', '.join(missing)}"))
                continue
            image = folder / "images" / str(row["image_src"]).rsplit("/", 1)[-1]
            if not image.is_file():
                errors.append(LoadError(str(path), f"item {i}", f"image {image} not found"))
                continue
            # The official type is the index mod 8, so item ids keep the original index.
            items.append(Item(str(i), row["question"], [image], row["gt_answer"], {"row": row, "index": i}))
        return Loaded(items, errors, str(folder))

    def score(self, items: Sequence[Item], responses: Sequence[str | None], judge: Judge | None = None,
              judge_runs: int = 1) -> dict:
        if judge is None:
            raise ValueError("mmhal needs a judge")
        runs, replies = [], []
        for run in range(judge_runs):
            def rate(i: int, run: int = run) -> str:
                return judge.ask(build_judge_prompt(items[i].meta["row"], responses[i] or ""), 0.0, run=run)
            got = judge_map(judge, rate, len(items), f"mmhal rating (run {run + 1}/{judge_runs})")
            replies.append(got)
            runs.append([parse_rating(r) for r in got])
        # aggregate_mmhal types items by position, so it only sees a full, ordered list.
        complete = [int(it.meta["index"]) for it in items] == list(range(len(items)))
        per_run = [aggregate_mmhal(r) if complete else _plain_aggregate(r) for r in runs]
        strict = {**per_run[0], "average": mean_std([p["average"] for p in per_run]),
                  "hallucination_rate": mean_std([p["hallucination_rate"] for p in per_run])}
        records = [{"id": it.id, "response": r, "answer": it.answer, "ratings": [run[i] for run in runs],
                    "judge_replies": [rep[i] for rep in replies]}
                   for i, (it, r) in enumerate(zip(items, responses, strict=True))]
        no_rating = sum(sum(f"rating: {s}" in rep.lower() for s in range(7)) != 1 for rep_run in replies
                        for rep in rep_run)
        return {"strict": strict, "robust": None, "unparseable": {"strict": no_rating, "robust": None},
                "items": records}

    @staticmethod
    def write_results(items: Sequence[Item], responses: Sequence[str | None], out: Path,
                      scored: dict | None = None) -> list[Path]:
        """The response template with `model_answer` filled in: what the official judge script reads."""
        rows = [{**it.meta["row"], "model_answer": r or ""} for it, r in zip(items, responses, strict=True)]
        return [atomic_write(out / "response_template.json", json.dumps(rows, indent=2, ensure_ascii=False))]


def _plain_aggregate(ratings: list[int]) -> dict:
    """Average and hallucination rate when items are missing (per-type needs every index)."""
    return {"average": sum(ratings) / len(ratings), "hallucination_rate": sum(r < 3 for r in ratings) / len(ratings),
            "n": len(ratings), "per_type": None}
