"""MMMU: college-level multiple-choice and open questions over 1-7 images, scored per subject.

Files: the dataset's records as released on the hub (fields id, question, options, answer,
question_type, image_1..image_7), read from `mmmu/*.parquet` (needs pyarrow; images are
extracted once into `mmmu/.images/`) or from `mmmu/*.jsonl` with image_k a path relative to
`mmmu/` (the form lmmkit's ShapesWorld twin uses). Prompts are the MMMU authors' LLaVA prompts.
Strict scoring is the official parse-and-eval (its seed-42 random fallback included); robust
scoring never guesses: an unclear answer is counted as unparseable and wrong.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from pathlib import Path

from lmmkit.atomic import atomic_write
from lmmkit.eval.backends.base import GenerationSettings
from lmmkit.eval.scoring.mmmu import (
    MULTIPLE_CHOICE,
    parse_and_eval,
    parse_multi_choice_robust,
    parse_open_robust,
    score_mmmu,
    subject_of,
)
from lmmkit.eval.tasks.base import Item, Judge, Loaded, LoadError, TaskDataError, task_folder

MC_SUFFIX = "Answer with the option's letter from the given choices directly."
OPEN_SUFFIX = "Answer the question using a single word or phrase."
MAX_IMAGES = 7


def build_prompt(question: str, options: Sequence[str]) -> str:
    if options:
        listed = "\n".join(f"({chr(65 + i)}) {o}" for i, o in enumerate(options))
        return f"{question}\n\n{listed}\n\n{MC_SUFFIX}"
    return f"{question}\n\n{OPEN_SUFFIX}"


def _options(raw) -> list[str]:
    if isinstance(raw, list):
        return [str(o) for o in raw]
    value = ast.literal_eval(raw) if isinstance(raw, str) and raw.strip() else []
    if not isinstance(value, list):
        raise ValueError(f"options must be a list, got {type(value).__name__}")
    return [str(o) for o in value]


def _parquet_rows(path: Path, image_dir: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise TaskDataError(f"{path}: reading MMMU parquet files needs pyarrow (pip install pyarrow), "
                            "or export the records to JSON lines") from err
    rows = pq.read_table(path).to_pylist()
    image_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        for k in range(1, MAX_IMAGES + 1):
            cell = row.get(f"image_{k}")
            if isinstance(cell, dict) and cell.get("bytes"):
                target = image_dir / f"{row['id']}_{k}.png"
                if not target.exists():
                    target.write_bytes(cell["bytes"])
                row[f"image_{k}"] = str(target.relative_to(image_dir.parent))
    return rows


class MMMUTask:
    name = "mmmu"
    settings = GenerationSettings(max_new_tokens=32)
    needs_judge = False

    def load(self, root: Path) -> Loaded:
        folder = task_folder(root, "mmmu")
        files = sorted(folder.glob("*.parquet")) + sorted(folder.glob("*.jsonl"))
        if not files:
            raise TaskDataError(f"{folder}: no MMMU records (*.parquet or *.jsonl)")
        items: list[Item] = []
        errors: list[LoadError] = []
        seen: set[str] = set()
        for path in files:
            if path.suffix == ".parquet":
                rows = [(f"row {i + 1}", r) for i, r in enumerate(_parquet_rows(path, folder / ".images"))]
            else:
                rows = []
                for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                    if line.strip():
                        try:
                            rows.append((f"line {lineno}", json.loads(line)))
                        except ValueError as err:
                            errors.append(LoadError(str(path), f"line {lineno}", f"not JSON: {err}"))
            for where, row in rows:
                try:
                    item = self._item(row, folder)
                except (KeyError, ValueError, SyntaxError) as err:
                    errors.append(LoadError(str(path), f"{where} (id {row.get('id')!r})", str(err)))
                    continue
                if item.id in seen:
                    errors.append(LoadError(str(path), where, f"duplicate id {item.id!r}"))
                    continue
                seen.add(item.id)
                items.append(item)
        return Loaded(items, errors, str(folder))

    @staticmethod
    def _item(row: dict, folder: Path) -> Item:
        for key in ("id", "question", "answer", "question_type"):
            if key not in row or row[key] is None:
                raise KeyError(f"missing field {key!r}")
        options = _options(row.get("options", "[]"))
        multiple = row["question_type"] == MULTIPLE_CHOICE
        if multiple and not options:
            raise ValueError("a multiple-choice question without options")
        images = []
        for k in range(1, MAX_IMAGES + 1):
            ref = row.get(f"image_{k}")
            if ref:
                path = (folder / ref).resolve()
                if folder.resolve() not in path.parents:
                    raise ValueError(f"image_{k} {ref!r} leaves the mmmu folder")
                if not path.is_file():
                    raise ValueError(f"image_{k} {path} not found")
                images.append(path)
        answer = row["answer"]
        if isinstance(answer, str) and answer.startswith("[") and not multiple:
            answer = ast.literal_eval(answer)  # a few open answers are lists of accepted forms
        letters = [chr(65 + i) for i in range(len(options))]
        return Item(str(row["id"]), build_prompt(row["question"], options if multiple else []), images, answer,
                    {"question_type": row["question_type"], "subject": subject_of(str(row["id"])),
                     "all_choices": letters, "index2ans": dict(zip(letters, options, strict=True))})

    def score(self, items: Sequence[Item], responses: Sequence[str | None], judge: Judge | None = None,
              judge_runs: int = 1) -> dict:
        by_subject: dict[str, list[dict]] = {}
        robust_items, records = [], []
        unparseable_robust = 0
        for it, r in zip(items, responses, strict=True):
            text = r or ""  # a failed call: the official parser sees an empty answer (a random letter)
            qtype = it.meta["question_type"]
            by_subject.setdefault(it.meta["subject"], []).append(
                {"id": it.id, "question_type": qtype, "answer": it.answer, "all_choices": it.meta["all_choices"],
                 "index2ans": it.meta["index2ans"], "response": text})
            if qtype == MULTIPLE_CHOICE:
                mine = parse_multi_choice_robust(text, it.meta["all_choices"], it.meta["index2ans"])
            else:
                mine = parse_open_robust(text)
            unparseable_robust += mine is None
            robust_items.append({"id": it.id, "question_type": qtype, "answer": it.answer, "parsed_pred": mine,
                                 "subject": it.meta["subject"]})
        strict = parse_and_eval(by_subject)
        robust = score_mmmu(robust_items)
        for it, r, mine in zip(items, responses, robust_items, strict=True):
            official = strict["items"][it.id]
            records.append({"id": it.id, "response": r, "answer": it.answer, "strict": official["parsed_pred"],
                            "robust": mine["parsed_pred"], "correct_strict": official["correct"],
                            "correct_robust": robust["judges"][it.id]})
        for agg in (strict, robust):
            agg.pop("judges", None)
        strict.pop("items", None)
        return {"strict": strict, "robust": robust,
                "unparseable": {"strict": len(strict["random_fallbacks"]), "robust": unparseable_robust},
                "items": records}

    @staticmethod
    def write_results(items: Sequence[Item], responses: Sequence[str | None], out: Path,
                      scored: dict | None = None) -> list[Path]:
        """<Subject>/output.json with raw responses: the input of the official parse-and-eval."""
        by_subject: dict[str, list[dict]] = {}
        for it, r in zip(items, responses, strict=True):
            by_subject.setdefault(it.meta["subject"], []).append(
                {"id": it.id, "question_type": it.meta["question_type"], "answer": it.answer,
                 "all_choices": it.meta["all_choices"], "index2ans": it.meta["index2ans"], "response": r or ""})
        return [atomic_write(out / subject / "output.json", json.dumps(rows, indent=2, ensure_ascii=False))
                for subject, rows in by_subject.items()]
