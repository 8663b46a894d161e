"""MM-Vet: the LLM grader's prompt, reply parsing, retry policy and aggregation.

Aggregation reproduces the official evaluator: each run's total is the sum of the item scores (in the
given order) / N * 100; the reported total is the mean over runs and ``std`` the population std
(ddof 0) of the run totals, both rounded to 1 decimal the way numpy rounds (``round(0.35, 1)`` is 0.3
in Python and 0.4 in numpy). The grader drifts between judge models: report the judge and the spread.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

_INSTRUCTION = (
    "You grade answers written by an AI model. For each row, compare the model's prediction with the "
    "ground truth and give the prediction a correctness score between 0.0 (completely wrong) and 1.0 "
    "(completely right), in steps of 0.1. When the ground truth joins parts with <AND>, the prediction is "
    "fully right only if it contains every part; when it joins them with <OR>, any one part is enough. "
    "Partial answers get partial credit. Reply with the score for the last row only."
)

_EXAMPLES: tuple[tuple[str, str, str, str], ...] = (
    ("How many apples are on the plate?", "4", "There are four apples.", "1.0"),
    ("How many apples are on the plate?", "4", "There are three apples and a pear.", "0.0"),
    ("Which two cities are marked on the map?", "Lyon <AND> Nice", "The map marks Lyon.", "0.5"),
    ("Which two cities are marked on the map?", "Lyon <AND> Nice", "Nice and Lyon are marked.", "1.0"),
    ("What is the man holding?", "an umbrella <OR> a parasol", "He holds a parasol.", "1.0"),
    (
        "Why is this cartoon funny?",
        "The dog is told to guard the cake, but the last frame shows it with frosting on its nose, so it "
        "clearly ate the cake it was meant to protect.",
        "The joke is that the dog guarding the cake has cake on its face.",
        "0.8",
    ),
    (
        "Why is this cartoon funny?",
        "The dog is told to guard the cake, but the last frame shows it with frosting on its nose, so it "
        "clearly ate the cake it was meant to protect.",
        "It shows a dog at a birthday party.",
        "0.1",
    ),
)

RETRY_HINT = "\nWrite only the correctness score, a number from 0.0 to 1.0: "


def _row(cells: Sequence[str]) -> str:
    return " | ".join(cells)


def build_grader_prompt(question: str, answer: str, prediction: str) -> str:
    """Instruction, a few-shot table (question | ground truth | prediction | score), then the item's row."""
    # the official pads the connectives with spaces so the grader sees them as separate tokens
    gt = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    lines = [_INSTRUCTION, "", _row(["Question", "Ground truth", "Prediction", "Score"]), "--- | --- | --- | ---"]
    lines += [_row(example) for example in _EXAMPLES]
    return "\n".join(lines) + "\n" + _row([question, gt, prediction, ""])


def parse_grader_score(reply: str) -> float | None:
    """The official rule: the reply's first space-separated token, stripped, as a float in [0, 1]; else None."""
    token = reply.split(" ")[0].strip()
    try:
        score = float(token)
    except ValueError:
        return None
    # NaN would pass the official range test and poison the mean; we refuse it
    return score if 0.0 <= score <= 1.0 else None


def grade_with_retries(
    ask: Callable[[str, float], str], prompt: str, max_tries: int = 5
) -> tuple[float, list[str]]:
    """Ask the grader ``ask(prompt, temperature)`` until a score parses; 0.0 after `max_tries` replies.

    As in the official loop, the first retry appends a hint and is still at temperature 0, and each later
    retry raises it by 0.5 (0, 0, 0.5, 1.0, 1.5). The official makes one more call after the fifth failure
    and discards its reply; we skip that call (the score is 0.0 either way). Errors from `ask` propagate.
    """
    replies = [ask(prompt, 0.0)]
    score = parse_grader_score(replies[-1])
    temperature = 0.0
    while score is None:
        if len(replies) >= max_tries:
            return 0.0, replies
        replies.append(ask(prompt + RETRY_HINT, temperature))
        temperature += 0.5
        score = parse_grader_score(replies[-1])
    return score, replies


def np_round(x: float, decimals: int = 1) -> float:
    """numpy's rounding (scale, round half to even, unscale), which the official CSVs use."""
    return float(np.round(np.float64(x), decimals))


def _run_totals(runs: Sequence[Mapping[str, float]], ids: Sequence[str]) -> np.ndarray:
    totals = []
    for run in runs:
        acc = 0.0
        for i in ids:  # summed one by one, in order, like the official (float sums depend on order)
            acc += run[i]
        totals.append(acc / len(ids) * 100)
    return np.array(totals, dtype=np.float64)


def aggregate_mmvet(
    runs: Sequence[Mapping[str, float]], capabilities: Mapping[str, Sequence[str]] | None = None
) -> dict:
    """Total, std and per-run totals (rounded as the official), plus per-capability totals if given.

    Returns ``total``, ``std``, ``runs`` (floats, 1 decimal), ``runs_str`` (the CSV's ``runs`` text),
    ``run_totals`` (unrounded), ``n`` and, with `capabilities` ({id: [capability, ...]}), ``capabilities``
    ({capability: mean total over runs, 1 decimal}) ordered by item count, first seen first on ties.
    """
    if not runs:
        raise ValueError("aggregate_mmvet needs at least one run")
    ids = list(runs[0])
    if not ids:
        raise ValueError("aggregate_mmvet: the runs hold no items")
    for k, run in enumerate(runs[1:], 1):
        if set(run) != set(ids):
            raise ValueError(f"run {k} grades other ids than run 0 ({len(set(run) ^ set(ids))} differ)")
    totals = _run_totals(runs, ids)
    rounded = [np_round(t) for t in totals]
    out: dict = {
        "total": np_round(totals.mean()),
        "std": np_round(totals.std()),
        "runs": rounded,
        # the official writes str(list(np.round(...))), which reads like this under numpy < 2
        "runs_str": "[" + ", ".join(repr(r) for r in rounded) + "]",
        "run_totals": [float(t) for t in totals],
        "n": len(ids),
    }
    if capabilities is not None:
        members: dict[str, list[str]] = {}
        for i in ids:
            if i not in capabilities:
                raise ValueError(f"no capabilities given for id {i!r}")
            for cap in dict.fromkeys(capabilities[i]):
                members.setdefault(cap, []).append(i)
        ordered = sorted(members.items(), key=lambda kv: len(kv[1]), reverse=True)
        out["capabilities"] = {cap: np_round(_run_totals(runs, group).mean()) for cap, group in ordered}
    return out


def read_grade_file(path: str | Path) -> list[dict[str, float]]:
    """The official grade JSON ``{id: {model, content, score: [one per run]}}`` -> one ``{id: score}`` per run."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object of {{id: grade}}")
    n_runs: int | None = None
    runs: list[dict[str, float]] = []
    for item_id, grade in data.items():
        scores = grade.get("score") if isinstance(grade, dict) else None
        if not isinstance(scores, list) or not scores:
            raise ValueError(f"{path}: id {item_id!r} has no 'score' list")
        if n_runs is None:
            n_runs = len(scores)
            runs = [{} for _ in range(n_runs)]
        elif len(scores) != n_runs:
            raise ValueError(f"{path}: id {item_id!r} has {len(scores)} scores, earlier ids have {n_runs}")
        for k, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, int | float):
                raise ValueError(f"{path}: id {item_id!r} run {k}: score {s!r} is not a number")
            runs[k][item_id] = float(s)
    return runs
