"""Confidence intervals and paired tests for eval results: a percentile bootstrap over items.

Questions that share an image (POPE, MME) are resampled as whole clusters: answers about one image
are correlated, and resampling them one by one would make the intervals too narrow. MME clusters are
also drawn within their subtask (stratified), so every resample keeps every subtask's size. The task
statistics come with a vectorised form that works on how often each cluster was drawn, so 2000
resamples of a few thousand items take milliseconds; any other callable works too, just slower.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Record = Mapping[str, Any]
RIGHT_WRONG = ("pope", "mme", "mmmu", "mathvista", "chair")  # tasks whose items are right or wrong: McNemar
ALPHA = 0.05
_CELLS = 1 << 18  # counts per block (replicates x units): 2 MB stays in cache, ~4x faster to count


class Resample:
    """A block of bootstrap replicates: how often each unit (a cluster, or an item) was drawn."""

    def __init__(self, counts: np.ndarray, inverse: np.ndarray) -> None:
        self.counts = counts  # (replicates, units), float
        self.inverse = inverse  # the unit of each item

    def total(self, x: np.ndarray) -> np.ndarray:
        """Per replicate, the sum of the per-item values `x` over the drawn items."""
        return self.counts @ np.bincount(self.inverse, weights=x, minlength=self.counts.shape[1])


@dataclass(frozen=True)
class Statistic:
    """A number computed from records; `vectorised(records)(block)` gives it for each replicate."""

    fn: Callable[[Sequence[Record]], float]
    vectorised: Callable[[Sequence[Record]], Callable[[Resample], np.ndarray]] | None = None

    def __call__(self, records: Sequence[Record]) -> float:
        return float(self.fn(records))


def _replicates(n: int, clusters: Sequence[str] | None, strata: Sequence[str] | None, n_boot: int,
                seed: int) -> Iterator[Resample]:
    """Resample counts in blocks; clusters move whole and are drawn within their stratum."""
    if not n:
        raise ValueError("no records to resample")
    if any(x is not None and len(x) != n for x in (clusters, strata)):
        raise ValueError(f"{n} records but another number of clusters or strata")
    index: dict[Any, int] = {}
    keys = range(n) if clusters is None else clusters
    inverse = np.array([index.setdefault(c, len(index)) for c in keys], dtype=np.intp)
    m = len(index)
    unit_strata = dict.fromkeys(zip(inverse.tolist(), [None] * n if strata is None else strata, strict=True))
    if len(unit_strata) != m:
        raise ValueError("a cluster spans two strata: clusters must nest in strata")
    groups: dict[Any, list[int]] = {}
    for unit, stratum in unit_strata:
        groups.setdefault(stratum, []).append(unit)
    units = [np.array(g, dtype=np.intp) for g in groups.values()]
    rng = np.random.default_rng(seed)
    step = max(1, _CELLS // max(m, 1))
    for start in range(0, n_boot, step):
        rows = min(step, n_boot - start)
        base = (np.arange(rows) * m)[:, None]
        flat = np.zeros(rows * m, dtype=np.int64)
        for u in units:
            flat += np.bincount((base + u[rng.integers(0, len(u), size=(rows, len(u)))]).ravel(),
                                minlength=rows * m)
        yield Resample(flat.reshape(rows, m).astype(np.float64), inverse)


def _per_replicate(statistic: Callable, records: Sequence[Record]) -> Callable[[Resample], np.ndarray]:
    vectorised = getattr(statistic, "vectorised", None)
    if vectorised is not None:
        return vectorised(records)
    idx = np.arange(len(records))

    def slow(block: Resample) -> np.ndarray:  # any callable: rebuild each resampled list
        counts = block.counts[:, block.inverse].astype(np.int64)
        return np.array([float(statistic([records[i] for i in np.repeat(idx, row)])) for row in counts])
    return slow


def _evaluate(jobs: Sequence[tuple[Callable, Sequence[Record]]], n: int, clusters: Sequence[str] | None,
              strata: Sequence[str] | None, n_boot: int, seed: int) -> list[np.ndarray]:
    """Every (statistic, records) job on the same replicates (records aligned, n each)."""
    fns = [_per_replicate(stat, recs) for stat, recs in jobs]
    parts: list[list[np.ndarray]] = [[] for _ in jobs]
    for block in _replicates(n, clusters, strata, n_boot, seed):
        for acc, fn in zip(parts, fns, strict=True):
            acc.append(np.asarray(fn(block), dtype=np.float64))
    return [np.concatenate(p) if p else np.zeros(0) for p in parts]


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_ci(records: Sequence[Record], statistic: Callable[[list[Record]], float],
                 clusters: Sequence[str] | None = None, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95, strata: Sequence[str] | None = None) -> dict:
    """Percentile bootstrap interval of `statistic(records)`, resampling whole clusters when given
    (`strata`: draw each cluster within its stratum). {estimate, low, high, n_boot, clustered, level}."""
    records = list(records)
    (values,) = _evaluate([(statistic, records)], len(records), clusters, strata, n_boot, seed)
    low, high = _interval(values, level)
    return {"estimate": float(statistic(records)), "low": low, "high": high, "n_boot": n_boot,
            "clustered": clusters is not None, "level": level}


def binomial_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2): exact integers up to n = 1000, log-space beyond (no overflow)."""
    if n <= 1000:
        return sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    head = math.lgamma(n + 1) - n * math.log(2)
    logs = [head - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(k + 1)]
    top = max(logs)
    return math.exp(top) * sum(math.exp(x - top) for x in logs)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test of paired right/wrong flags: a two-sided binomial test on the discordant pairs."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} flags in A but {len(b)} in B")
    a_only = sum(bool(x) and not bool(y) for x, y in zip(a, b, strict=True))
    b_only = sum(bool(y) and not bool(x) for x, y in zip(a, b, strict=True))
    n = a_only + b_only
    p = min(1.0, 2 * binomial_tail(min(a_only, b_only), n)) if n else 1.0
    return {"b_only": b_only, "a_only": a_only, "p_value": p}


def _paired_summary(a: float, b: float, va: np.ndarray, vb: np.ndarray, level: float, n_boot: int) -> dict:
    diffs = (vb - va)[~np.isnan(vb - va)]
    low, high = _interval(diffs, level)
    difference = b - a
    if difference == 0 or not len(diffs):
        p = 1.0
    else:  # ties at 0 count against the difference: conservative for coarse statistics
        other_side = diffs <= 0 if difference > 0 else diffs >= 0
        p = min(1.0, 2 * float(other_side.mean()))
    return {"a": a, "b": b, "difference": difference, "low": low, "high": high, "p_value": p,
            "n_boot": n_boot}


def paired_bootstrap(records_a: Sequence[Record], records_b: Sequence[Record], statistic: Callable,
                     clusters: Sequence[str] | None = None, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95, strata: Sequence[str] | None = None) -> dict:
    """Interval and two-sided p of statistic(B) - statistic(A), both runs resampled with the SAME draws
    (records paired by position). {a, b, difference, low, high, p_value, n_boot}."""
    a, b = list(records_a), list(records_b)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} records in A but {len(b)} in B: pair them first")
    va, vb = _evaluate([(statistic, a), (statistic, b)], len(a), clusters, strata, n_boot, seed)
    return _paired_summary(float(statistic(a)), float(statistic(b)), va, vb, level, n_boot)
