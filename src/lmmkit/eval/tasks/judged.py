"""Shared plumbing for judge-graded tasks: run grading calls concurrently, repeat for N runs."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from tqdm import tqdm

from lmmkit.eval.tasks.base import Judge

T = TypeVar("T")


def judge_map(judge: Judge, fn: Callable[[int], T], n: int, desc: str) -> list[T]:
    """[fn(0), ..., fn(n-1)] with the judge's concurrency (endpoints in parallel, local models in turn)."""
    workers = max(1, getattr(judge, "concurrency", 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, range(n)), total=n, desc=desc, unit="grade", disable=n < 50))


def mean_std(values: Sequence[float]) -> dict:
    """Mean and population standard deviation (ddof 0, as MM-Vet reports) over judge runs."""
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "runs": list(values)}
