"""Run benchmark tasks against a backend: cached, batched, resumable, failures counted by item.

Every model answer is written to the response cache the moment it arrives, so a killed run
resumes where it stopped and a re-run of the same eval makes no model calls at all. An item that
cannot be loaded or answered is named in the results and scored wrong; `strict_errors` stops the
run at the first one instead (after what was already answered is safely cached).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lmmkit.eval.backends.base import Backend, BackendError, Request
from lmmkit.eval.cache import ResponseCache, cache_key
from lmmkit.eval.tasks.base import Item, Judge, Task


class EvalError(RuntimeError):
    """Raised under strict_errors: names the task and the item."""


@dataclass
class EvalOptions:
    limit: int | None = None  # at most this many items per task (after loading, in file order)
    judge_runs: int = 1
    strict_errors: bool = False
    chunk: int = 32  # requests handed to the backend at once: answers are committed after each chunk
    progress: bool = True
    out_dir: Path | None = None  # where tasks write files in their official result format (MME)


class _ImageDigests:
    """sha256 of image files, so a replaced image never reuses a cached answer."""

    def __init__(self) -> None:
        self.memo: dict[Path, str] = {}

    def __call__(self, path: Path) -> str:
        if path not in self.memo:
            self.memo[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        return self.memo[path]


def item_key(backend_fingerprint: str, task: Task, item: Item, digests: _ImageDigests) -> str:
    return cache_key("model", backend_fingerprint, task.name, item.id, item.prompt,
                     [digests(p) for p in item.images], task.settings.key())


def answer_items(task: Task, items: Sequence[Item], backend: Backend, cache: ResponseCache,
                 opts: EvalOptions) -> tuple[list[str | None], list[str], int]:
    """(responses in item order, failure messages, number of model calls made)."""
    digests = _ImageDigests()
    fingerprint = backend.fingerprint()
    keys = [item_key(fingerprint, task, it, digests) for it in items]
    found = cache.get_many(keys)
    responses: list[str | None] = [found.get(k) for k in keys]
    todo = [i for i, k in enumerate(keys) if k not in found]
    failures: list[str] = []
    bar = tqdm(total=len(todo), desc=f"{task.name}: {len(items) - len(todo)} cached, asking", unit="q",
               disable=not opts.progress or not todo)
    for start in range(0, len(todo), opts.chunk):
        chunk = todo[start:start + opts.chunk]
        outs = backend.generate([Request(items[i].prompt, list(items[i].images)) for i in chunk], task.settings)
        for i, out in zip(chunk, outs, strict=True):
            if isinstance(out, BackendError):
                msg = f"{task.name}: item {items[i].id}: {out}"
                if opts.strict_errors:
                    raise EvalError(msg)
                failures.append(msg)
            else:
                cache.put(keys[i], out, meta={"task": task.name, "item": items[i].id})
                responses[i] = out
        bar.update(len(chunk))
    bar.close()
    return responses, failures, len(todo)


def run_task(task: Task, backend: Backend, root: Path, cache: ResponseCache, judge: Judge | None,
             opts: EvalOptions) -> dict:
    if getattr(task, "direct", False):  # e.g. the LM loss: reads logits, asks no questions
        return task.evaluate(backend, Path(root), opts.limit)
    start = time.time()
    loaded = task.load(Path(root))
    if loaded.errors and opts.strict_errors:
        raise EvalError(f"{task.name}: {loaded.errors[0]}" + (f" (and {len(loaded.errors) - 1} more)"
                                                              if len(loaded.errors) > 1 else ""))
    items = loaded.items
    if opts.limit:
        select = getattr(task, "select", None)  # tasks whose items come in groups keep whole groups
        items = select(items, opts.limit) if select else items[: opts.limit]
    if task.needs_judge and judge is None:
        raise EvalError(f"{task.name} is graded by an LLM judge: pass --judge (an openai:URL#model endpoint, "
                        "an lmmkit checkpoint or an HF model folder)")
    responses, failures, calls = answer_items(task, items, backend, cache, opts)
    scored = task.score(items, responses, judge, opts.judge_runs)
    from lmmkit.eval.task_stats import task_intervals  # numpy-heavy: imported when scoring

    scored["intervals"] = scored.get("intervals") or task_intervals(task.name, scored)  # a task's own, else bootstrap
    write_results = getattr(task, "write_results", None)
    if write_results is not None and opts.out_dir is not None:
        folder = Path(opts.out_dir) / f"{task.name}_results"
        scored["official_result_files"] = [str(p) for p in write_results(items, responses, folder, scored)]
    scored.update({
        "task": task.name, "source": loaded.source, "n_items": len(items), "model_calls": calls,
        "from_cache": len(items) - calls, "load_errors": [str(e) for e in loaded.errors],
        "failures": failures, "seconds": round(time.time() - start, 2),
    })
    if judge is not None and task.needs_judge:
        scored["judge"] = judge.name
    return scored


def run_eval(tasks: Sequence[Task], backend: Backend, root: Path, cache: ResponseCache, judge: Judge | None = None,
             opts: EvalOptions | None = None) -> dict:
    opts = opts or EvalOptions()
    results = {"model": backend.name, "fingerprint": backend.fingerprint(), "data_root": str(root),
               "judge": judge.name if judge else None, "judge_runs": opts.judge_runs, "tasks": {}}
    for task in tasks:
        results["tasks"][task.name] = run_task(task, backend, root, cache, judge, opts)
    return results
