"""MathVista: math questions over figures; answers extracted, normalised to the item's type.

Files: the released `mathvista/testmini.json` ({pid: problem}) with images under `mathvista/`
(the problem's "image" field, e.g. images/1.jpg). The prompt is the problem's own `query`.
Strict = the official pipeline: rule-based extraction, then the LLM extractor for what the
rules cannot read (needs --judge; without one those answers are counted unparseable and wrong),
then the official normalisation and exact comparison. Robust = lmmkit's rule parser, no LLM.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lmmkit.atomic import atomic_write
from lmmkit.eval.backends.base import GenerationSettings
from lmmkit.eval.scoring.mathvista import (
    build_extraction_prompt,
    parse_extractor_reply,
    quick_extract,
    robust_extract,
    score_mathvista,
)
from lmmkit.eval.tasks.base import Item, Judge, Loaded, LoadError, TaskDataError, task_folder
from lmmkit.eval.tasks.judged import judge_map

REQUIRED = ("question", "image", "answer", "question_type", "answer_type", "query")


class MathVistaTask:
    name = "mathvista"
    settings = GenerationSettings(max_new_tokens=128)
    needs_judge = False  # only for answers the rules cannot read

    def load(self, root: Path) -> Loaded:
        folder = task_folder(root, "mathvista")
        path = folder / "testmini.json"
        if not path.is_file():
            found = sorted(folder.glob("*.json"))
            if not found:
                raise TaskDataError(f"{folder}: no MathVista data file (testmini.json)")
            path = found[0]
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise TaskDataError(f"{path}: not JSON: {err}") from err
        if isinstance(data, list):
            data = {str(p.get("pid", i)): p for i, p in enumerate(data)}
        items: list[Item] = []
        errors: list[LoadError] = []
        for pid, problem in data.items():
            missing = [k for k in REQUIRED if k not in problem]
            if missing:
                errors.append(LoadError(str(path), f"pid {pid}", f"missing field(s) {', '.join(missing)}"))
                continue
            image = folder / problem["image"]
            if not image.is_file():
                errors.append(LoadError(str(path), f"pid {pid}", f"image {image} not found"))
                continue
            items.append(Item(str(pid), problem["query"], [image], problem["answer"], {"problem": problem}))
        return Loaded(items, errors, str(folder))

    def score(self, items: Sequence[Item], responses: Sequence[str | None], judge: Judge | None = None,
              judge_runs: int = 1) -> dict:
        texts = [r or "" for r in responses]
        strict_ext = [quick_extract(t, it.meta["problem"]) for it, t in zip(items, texts, strict=True)]
        need_llm = [i for i, e in enumerate(strict_ext) if e is None]
        if judge is not None and need_llm:
            def extract(k: int) -> str:
                i = need_llm[k]
                reply = judge.ask(build_extraction_prompt(items[i].meta["problem"], texts[i]), 0.0)
                return parse_extractor_reply(reply)
            for i, ext in zip(need_llm, judge_map(judge, extract, len(need_llm), "mathvista extract"), strict=True):
                strict_ext[i] = ext
        robust_ext = [robust_extract(t, it.meta["problem"]) for it, t in zip(items, texts, strict=True)]
        strict = score_mathvista({it.id: {**it.meta["problem"], "extraction": e}
                                  for it, e in zip(items, strict_ext, strict=True)})
        robust = score_mathvista({it.id: {**it.meta["problem"], "extraction": e}
                                  for it, e in zip(items, robust_ext, strict=True)})
        records = [{"id": it.id, "response": r, "answer": it.answer, "extraction_strict": es,
                    "extraction_robust": er, "strict": strict["per_pid"][it.id]["prediction"],
                    "robust": robust["per_pid"][it.id]["prediction"],
                    "correct_strict": strict["per_pid"][it.id]["true_false"],
                    "correct_robust": robust["per_pid"][it.id]["true_false"]}
                   for it, r, es, er in zip(items, responses, strict_ext, robust_ext, strict=True)]
        for agg in (strict, robust):
            agg.pop("per_pid")
            agg.pop("scores")
        return {"strict": strict, "robust": robust,
                "unparseable": {"strict": sum(e is None for e in strict_ext),
                                "robust": sum(e is None for e in robust_ext)},
                "llm_extractions": len(need_llm) if judge is not None else 0,
                "items": records}

    @staticmethod
    def write_results(items: Sequence[Item], responses: Sequence[str | None], out: Path,
                      scored: dict | None = None) -> list[Path]:
        """output.json keyed by pid: each problem with its `response` and the strict `extraction` (rules,
        then the LLM extractor when a judge ran), as the official extract_answer.py writes it for
        calculate_score.py. A reply nobody could read gets an empty extraction, which the official
        normalisation maps to the shortest choice (multiple choice) or to no answer."""
        extractions = {r["id"]: r["extraction_strict"] for r in (scored or {}).get("items", [])}
        problems = {}
        for it, r in zip(items, responses, strict=True):
            text = r or ""
            ext = extractions.get(it.id) if it.id in extractions else quick_extract(text, it.meta["problem"])
            problems[it.id] = {**it.meta["problem"], "response": text, "extraction": ext or ""}
        return [atomic_write(out / "output.json", json.dumps(problems, indent=2, ensure_ascii=False))]
