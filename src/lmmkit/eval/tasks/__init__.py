"""The benchmark tasks by name (`lmmkit eval --tasks ...`)."""

from __future__ import annotations

from lmmkit.eval.tasks.attacks import ATTACK_TASKS
from lmmkit.eval.tasks.base import Task
from lmmkit.eval.tasks.chair import ChairTask
from lmmkit.eval.tasks.lmloss import LMLossTask
from lmmkit.eval.tasks.mathvista import MathVistaTask
from lmmkit.eval.tasks.mme import MMETask
from lmmkit.eval.tasks.mmhal import MMHalTask
from lmmkit.eval.tasks.mmmu import MMMUTask
from lmmkit.eval.tasks.mmvet import MMVetTask
from lmmkit.eval.tasks.pope import PopeTask
from lmmkit.eval.tasks.rtvlm import RTVLM_TASKS

TASKS: dict[str, type] = {t.name: t for t in (PopeTask, MMETask, MMMUTask, MathVistaTask, MMVetTask, MMHalTask,
                                               ChairTask, LMLossTask)}
# Tasks with no ShapesWorld twin (their released data must be downloaded): run by name only.
DOWNLOAD_TASKS: dict[str, type] = {t.name: t for t in RTVLM_TASKS}
# ShapesWorld attack twins (`lmmkit data attacks`, docs/safety.md): run by name only.
ATTACK_TASK_NAMES: dict[str, type] = {t.name: t for t in ATTACK_TASKS}


def get_tasks(names: str | list[str]) -> list[Task]:
    """Task objects for comma-separated names; an unknown name is an error listing the known ones."""
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    wanted = [n for n in wanted if n]
    known = {**TASKS, **DOWNLOAD_TASKS, **ATTACK_TASK_NAMES}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; available: {', '.join(known)}")
    return [known[n]() for n in wanted]
