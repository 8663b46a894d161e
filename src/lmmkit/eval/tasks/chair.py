"""CHAIR: caption hallucination against the objects each image truly holds (eval/chair.py).

Files: `chair/captions.jsonl` (one line per image: {"image_id", "image", "objects": [truth names]}),
`chair/vocabulary.json` ({"objects": {name: [synonyms]}}) and images in `chair/images/`. The
prompt is the detailed-description request CHAIR evaluations use with LLaVA-style models.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lmmkit.atomic import atomic_write
from lmmkit.eval.backends.base import GenerationSettings
from lmmkit.eval.chair import ObjectVocabulary, chair_scores
from lmmkit.eval.tasks.base import Item, Judge, Loaded, LoadError, TaskDataError, require_image, task_folder

CHAIR_PROMPT = "Describe the image in detail."


def read_vocabulary(path: Path) -> ObjectVocabulary:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        objects = raw["objects"]
    except FileNotFoundError as err:
        raise TaskDataError(f"{path}: not found (CHAIR needs the object vocabulary)") from err
    except (ValueError, KeyError, TypeError) as err:
        raise TaskDataError(f"{path}: expected {{\"objects\": {{name: [synonyms]}}}} ({err!r})") from err
    if not isinstance(objects, dict) or not all(isinstance(v, list) for v in objects.values()):
        raise TaskDataError(f"{path}: 'objects' must map each name to a list of synonyms")
    return ObjectVocabulary(objects)


class ChairTask:
    name = "chair"
    settings = GenerationSettings(max_new_tokens=96)
    needs_judge = False

    def load(self, root: Path) -> Loaded:
        folder = task_folder(root, "chair")
        path = folder / "captions.jsonl"
        if not path.is_file():
            raise TaskDataError(f"{folder}: no captions.jsonl")
        self.vocab = read_vocabulary(folder / "vocabulary.json")
        items, errors = [], []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image_id, image, objects = str(row["image_id"]), row["image"], row["objects"]
                if not isinstance(objects, list):
                    raise TypeError("'objects' is not a list")
            except (ValueError, KeyError, TypeError) as err:
                errors.append(LoadError(str(path), f"line {lineno}", f"needs image_id, image, objects ({err!r})"))
                continue
            unknown = [o for o in objects if o not in self.vocab.synonyms]
            if unknown:
                errors.append(LoadError(str(path), f"line {lineno}", f"objects not in the vocabulary: {unknown}"))
                continue
            image_path = folder / "images" / image
            if require_image(image_path, str(path), f"line {lineno} (image_id {image_id})", errors):
                items.append(Item(image_id, CHAIR_PROMPT, [image_path], list(objects)))
        return Loaded(items, errors, str(folder))

    def score(self, items: Sequence[Item], responses: Sequence[str | None], judge: Judge | None = None,
              judge_runs: int = 1) -> dict:
        scores, per_caption = chair_scores(responses, [it.answer for it in items], self.vocab)
        records = [{"id": it.id, "cluster": it.images[0].name, "response": r, "answer": it.answer, **rec,
                    "correct_strict": not rec["hallucinated"], "correct_robust": not rec["hallucinated"]}
                   for it, r, rec in zip(items, responses, per_caption, strict=True)]
        failed = sum(r is None for r in responses)
        return {"strict": scores, "robust": None, "unparseable": {"strict": failed, "robust": None},
                "items": records}

    @staticmethod
    def write_results(items: Sequence[Item], responses: Sequence[str | None], out: Path,
                      scored: dict | None = None) -> list[Path]:
        """The captions as CHAIR's scripts read them: [{"image_id", "caption"}]."""
        rows = [{"image_id": it.id, "caption": r or ""} for it, r in zip(items, responses, strict=True)]
        return [atomic_write(out / "chair_captions.json", json.dumps(rows, indent=1, ensure_ascii=False))]
