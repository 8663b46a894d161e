"""POPE: three splits of yes/no object questions; official parser beside lmmkit's robust one.

Files: `pope/*_pope_{random,popular,adversarial}.json` (the official JSON-lines label files:
question_id, image, text, label) with images in `pope/images/`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lmmkit.atomic import atomic_write
from lmmkit.eval.backends.base import GenerationSettings
from lmmkit.eval.pope import SPLITS, parse_official, parse_robust, score_pope
from lmmkit.eval.tasks.base import (
    LLAVA_SHORT,
    Item,
    Judge,
    Loaded,
    LoadError,
    TaskDataError,
    require_image,
    task_folder,
)


def _split_file(folder: Path, split: str) -> Path:
    found = sorted(folder.glob(f"*pope_{split}.json")) + sorted(folder.glob(f"*pope_{split}.jsonl"))
    if not found:
        raise TaskDataError(f"{folder}: no POPE {split} file (expected e.g. coco_pope_{split}.json)")
    return found[0]


class PopeTask:
    name = "pope"
    settings = GenerationSettings(max_new_tokens=8)
    needs_judge = False

    def load(self, root: Path) -> Loaded:
        folder = task_folder(root, "pope")
        items: list[Item] = []
        errors: list[LoadError] = []
        for split in SPLITS:
            path = _split_file(folder, split)
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                where = f"line {lineno}"
                try:
                    row = json.loads(line)
                    qid, image, text, label = row["question_id"], row["image"], row["text"], row["label"]
                except (ValueError, KeyError, TypeError) as err:
                    errors.append(LoadError(str(path), where, f"needs question_id, image, text, label ({err!r})"))
                    continue
                image_path = folder / "images" / image
                if require_image(image_path, str(path), f"{where} (question_id {qid})", errors):
                    items.append(Item(f"{split}/{qid}", text + LLAVA_SHORT, [image_path], label,
                                      {"split": split, "question": text}))
        return Loaded(items, errors, str(folder))

    def select(self, items: Sequence[Item], limit: int) -> list[Item]:
        """--limit applies per split."""
        per: dict[str, int] = {}
        kept = []
        for it in items:
            per[it.meta["split"]] = per.get(it.meta["split"], 0) + 1
            if per[it.meta["split"]] <= limit:
                kept.append(it)
        return kept

    def score(self, items: Sequence[Item], responses: Sequence[str | None], judge: Judge | None = None,
              judge_runs: int = 1) -> dict:
        strict, robust, records = {}, {}, []
        for split in SPLITS:
            rows = [(it, r) for it, r in zip(items, responses, strict=True) if it.meta["split"] == split]
            if not rows:
                continue
            labels = [it.answer for it, _ in rows]
            # A failed model call (None) has no answer to parse: it is scored wrong and counted as
            # unparseable by both scorers (the official one never sees such a row).
            official = [parse_official(r) if r is not None else None for _, r in rows]
            mine = [parse_robust(r) if r is not None else None for _, r in rows]
            strict[split] = score_pope(official, labels)
            robust[split] = score_pope(mine, labels)
            for (it, r), o, m in zip(rows, official, mine, strict=True):
                records.append({"id": it.id, "cluster": it.images[0].name, "response": r, "answer": it.answer,
                                "strict": o, "robust": m,
                                "correct_strict": o == it.answer.strip().lower(),
                                "correct_robust": m == it.answer.strip().lower()})
        for agg in (strict, robust):
            if agg:
                agg["mean_f1"] = sum(v["f1"] for v in agg.values()) / len(agg)
        return {"strict": strict, "robust": robust,
                "unparseable": {name: sum(v["unparseable"] for k, v in agg.items() if k != "mean_f1")
                                for name, agg in (("strict", strict), ("robust", robust))},
                "items": records}

    @staticmethod
    def write_results(items: Sequence[Item], responses: Sequence[str | None], out: Path,
                      scored: dict | None = None) -> list[Path]:
        """Per split, the answers file the official evaluate.py reads (JSON lines, label-file order)."""
        paths = []
        for split in SPLITS:
            rows = [{"question_id": it.id.split("/", 1)[1], "question": it.meta["question"], "answer": r or ""}
                    for it, r in zip(items, responses, strict=True) if it.meta["split"] == split]
            if rows:
                paths.append(atomic_write(out / f"pope_{split}_answers.json",
                                          "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)))
        return paths
