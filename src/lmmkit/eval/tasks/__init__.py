"""The benchmark tasks by name (`lmmkit eval --tasks ...`)."""

from __future__ import annotations

from lmmkit.eval.tasks.base import Task
from lmmkit.eval.tasks.chair import ChairTask
from lmmkit.eval.tasks.lmloss import LMLossTask
from lmmkit.eval.tasks.mathvista import MathVistaTask
from lmmkit.eval.tasks.mme import MMETask
from lmmkit.eval.tasks.mmhal import MMHalTask
from lmmkit.eval.tasks.mmmu import MMMUTask
from lmmkit.eval.tasks.mmvet import MMVetTask
from lmmkit.eval.tasks.pope import PopeTask

TASKS: dict[str, type] = {t.name: t for t in (PopeTask, MMETask, MMMUTask, MathVistaTask, MMVetTask, MMHalTask,
                                               ChairTask, LMLossTask)}


def get_tasks(names: str | list[str]) -> list[Task]:
    """Task objects for comma-separated names; an unknown name is an error listing the known ones."""
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    wanted = [n for n in wanted if n]
    unknown = [n for n in wanted if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; available: {', '.join(TASKS)}")
    return [TASKS[n]() for n in wanted]
