"""What a benchmark task is to the harness: items to ask, and a scorer for the answers.

A task reads its benchmark's own released files (official format) from a folder; lmmkit's
ShapesWorld twins are written in the same formats, so one reader serves both. A record that
cannot be used becomes a `LoadError` naming the file and the record; the run goes on without it
(or stops under --strict-errors).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lmmkit.eval.backends.base import GenerationSettings

LLAVA_SHORT = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt


class TaskDataError(ValueError):
    """A benchmark folder or file that cannot be read at all (missing, wrong format)."""


@dataclass
class LoadError:
    file: str
    record: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: record {self.record}: {self.problem}"


@dataclass
class Item:
    """One question: `id` is unique within the task and stable across runs (it keys the cache)."""

    id: str
    prompt: str
    images: list[Path] = field(default_factory=list)
    answer: Any = None
    meta: dict = field(default_factory=dict)


@dataclass
class Loaded:
    items: list[Item]
    errors: list[LoadError]
    source: str  # the folder or file read


class Judge(Protocol):
    name: str

    def ask(self, prompt: str, temperature: float = 0.0, run: int = 0, max_new_tokens: int = 256) -> str: ...


class Task(Protocol):
    name: str
    settings: GenerationSettings
    needs_judge: bool

    def load(self, root: Path) -> Loaded:
        """Read the task's files under `root` (the --data-root folder)."""
        ...

    def score(self, items: Sequence[Item], responses: Sequence[str | None], judge: Judge | None,
              judge_runs: int = 1) -> dict:
        """Scores {"strict": ..., "robust": ..., "unparseable": {...}} plus "items": one record per item
        (prediction, parsed answers, correctness). A None response (the model failed) scores wrong."""
        ...


def task_folder(root: Path, name: str) -> Path:
    """`root/name`, which must exist."""
    folder = Path(root) / name
    if folder.is_dir():
        return folder
    raise TaskDataError(f"{root}: no folder {name!r} (the task's files go in {folder}; "
                        "`lmmkit data bench --data DIR` writes ShapesWorld twins of every task)")


def read_json_file(folder: Path, name: str):
    """(path, parsed JSON) of `folder/name`; a missing or malformed file is a TaskDataError naming it."""
    path = folder / name
    if not path.is_file():
        raise TaskDataError(f"{folder}: no {name}")
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise TaskDataError(f"{path}: not JSON: {err}") from err


def require_image(path: Path, file: str, record: str, errors: list[LoadError]) -> bool:
    """True when the image file exists; else records why not."""
    if path.is_file():
        return True
    errors.append(LoadError(file, record, f"image {path} not found"))
    return False


def accuracy(correct: Sequence[bool]) -> float:
    return sum(correct) / len(correct) if correct else 0.0
