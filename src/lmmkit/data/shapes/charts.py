"""Tiny bar charts in ShapesWorld colours, and MathVista-style numeric questions about them.

A chart is 3-5 bars of distinct `COLOURS`, integer heights 1-9, on a dark background with a grid
line and tick mark at every integer (labels at the even ones). Every answer is computed from the
`BarChart` itself, which is kept in each MathVista record's metadata["chart"].
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from lmmkit.data.shapes.world import COLOURS

CHART_SIZE = 96
MAX_VALUE = 9
_UNIT = 8  # pixels per unit of bar height
_LEFT, _BOTTOM = 14, CHART_SIZE - 8  # the y axis's x, the baseline's y
_BACKGROUND, _GRID, _AXIS = (30, 30, 36), (62, 62, 72), (210, 210, 210)
QUESTION_KINDS: tuple[str, ...] = ("value", "sum", "mean", "extreme", "list", "difference")

_HINTS = {
    "integer": "Hint: Please answer the question requiring an integer answer and provide the final value, "
               "e.g., 1, 2, 3, at the end.",
    "float": "Hint: Please answer the question requiring a floating-point number with one decimal place "
             "and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.",
    "list": "Hint: Please answer the question requiring a Python list as an answer and provide the final "
            "list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.",
    "text": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
            "at the end.",
}


@dataclass(frozen=True)
class BarChart:
    colours: tuple[str, ...]  # left to right
    values: tuple[int, ...]

    def value(self, colour: str) -> int:
        return self.values[self.colours.index(colour)]


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def random_chart(rng: random.Random) -> BarChart:
    """3-5 bars of distinct colours, in random order, with heights 1-9."""
    n = rng.randint(3, 5)
    colours = rng.sample(list(COLOURS), n)
    return BarChart(tuple(colours), tuple(rng.randint(1, MAX_VALUE) for _ in range(n)))


def render_bar_chart(chart: BarChart) -> Image.Image:
    """The chart as a CHART_SIZE x CHART_SIZE RGB image."""
    img = Image.new("RGB", (CHART_SIZE, CHART_SIZE), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    right = CHART_SIZE - 3
    for v in range(MAX_VALUE + 1):
        y = _BOTTOM - v * _UNIT
        if v:
            draw.line([(_LEFT + 1, y), (right, y)], fill=_GRID)
        draw.line([(_LEFT - 3, y), (_LEFT, y)], fill=_AXIS)
        if v % 2 == 0:
            draw.text((2, y - 5), str(v), fill=_AXIS, font=_font())
    slot = (right - _LEFT) / len(chart.values)
    for i, (colour, v) in enumerate(zip(chart.colours, chart.values, strict=True)):
        x0 = round(_LEFT + i * slot + slot * 0.2)
        x1 = round(_LEFT + (i + 1) * slot - slot * 0.2)
        draw.rectangle([x0, _BOTTOM - v * _UNIT, x1, _BOTTOM - 1], fill=COLOURS[colour])
    draw.line([(_LEFT, _BOTTOM - MAX_VALUE * _UNIT - 2), (_LEFT, _BOTTOM)], fill=_AXIS)
    draw.line([(_LEFT, _BOTTOM), (right, _BOTTOM)], fill=_AXIS)
    return img


def _fits(kind: str, chart: BarChart) -> bool:
    if kind == "extreme":  # a single tallest and a single shortest bar
        return all(chart.values.count(f(chart.values)) == 1 for f in (max, min))
    if kind == "mean":  # no mean that lies exactly halfway between two tenths
        return (Fraction(sum(chart.values), len(chart.values)) * 10).denominator != 2
    return True


def chart_question(rng: random.Random, kind: str) -> tuple[BarChart, dict]:
    """A chart that suits `kind` (one of QUESTION_KINDS) and its question fields: question,
    choices, precision, answer, question_type, answer_type, query."""
    chart = random_chart(rng)
    while not _fits(kind, chart):
        chart = random_chart(rng)
    choices: list[str] | None = None
    answer_type, precision = "integer", None
    if kind == "value":
        colour = rng.choice(chart.colours)
        question, answer = f"What is the value of the {colour} bar?", str(chart.value(colour))
    elif kind == "sum":
        question, answer = "What is the sum of all bars?", str(sum(chart.values))
    elif kind == "mean":
        mean = sum(chart.values) / len(chart.values)
        question, answer, answer_type, precision = "What is the mean of the bars?", f"{mean:.1f}", "float", 1.0
    elif kind == "extreme":
        word, pick = rng.choice((("tallest", max), ("shortest", min)))
        question, answer_type = f"Which bar is the {word}?", "text"
        answer = chart.colours[chart.values.index(pick(chart.values))]
        choices = rng.sample(list(chart.colours), len(chart.colours))
    elif kind == "list":
        question, answer, answer_type = "List the bar values from left to right.", str(list(chart.values)), "list"
    elif kind == "difference":
        question = "What is the difference between the tallest and the shortest bar?"
        answer = str(max(chart.values) - min(chart.values))
    else:
        raise ValueError(f"unknown chart question kind {kind!r}; choose from {list(QUESTION_KINDS)}")
    query = f"{_HINTS[answer_type]}\nQuestion: {question}"
    if choices is not None:
        query += "\nChoices:\n" + "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
    return chart, {
        "question": question,
        "choices": choices,
        "precision": precision,
        "answer": answer,
        "question_type": "free_form" if choices is None else "multi_choice",
        "answer_type": answer_type,
        "query": query,
    }


def mathvista_record(rng: random.Random, pid: str, kind: str) -> tuple[dict, Image.Image]:
    """One official-format MathVista testmini record (image "images/<pid>.png") and its chart image."""
    chart, q = chart_question(rng, kind)
    record = {
        "question": q["question"],
        "image": f"images/{pid}.png",
        "choices": q["choices"],
        "unit": None,
        "precision": q["precision"],
        "answer": q["answer"],
        "question_type": q["question_type"],
        "answer_type": q["answer_type"],
        "pid": pid,
        "metadata": {
            "split": "testmini",
            "source": "ShapesWorld-charts",
            "context": "bar chart",
            "question_type": q["question_type"],
            "task": "figure question answering",
            "category": "math-targeted-vqa",
            "grade": "elementary school",
            "skills": ["arithmetic reasoning", "statistical reasoning"],
            "language": "english",
            "img_width": CHART_SIZE,
            "img_height": CHART_SIZE,
            "chart": {"colours": list(chart.colours), "values": list(chart.values)},
        },
        "query": q["query"],
    }
    return record, render_bar_chart(chart)
