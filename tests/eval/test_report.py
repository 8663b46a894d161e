"""Report: results.json round-trips; report.html is well-formed, self-contained and escaped."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from lmmkit.eval.report import format_table, render_html, write_report

VOID = {"meta", "img", "br", "hr", "input", "link", "col", "source", "wbr"}
PIXEL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/PchI7wAAAABJRU5ErkJggg=="


def _metrics(acc: float, f1: float, yes: float, n: int = 3000, **extra: int) -> dict:
    return {"accuracy": acc, "precision": 0.9, "recall": 0.8, "f1": f1, "yes_ratio": yes, "n": n, **extra}


RESULTS = {
    "pope": {
        "model": {
            "random": {
                "strict": _metrics(0.87, 0.8612, 0.41),
                "robust": _metrics(0.88, 0.8701, 0.42, unparseable=3),
            },
            "popular": {
                "strict": _metrics(0.85, 0.8433, 0.43),
                "robust": _metrics(0.86, 0.85, 0.44, unparseable=0),
            },
            "adversarial": {"strict": _metrics(0.83, 0.8255, 0.45)},
        },
        "blind control (blank image)": {
            "random": _metrics(0.5, 0.0, 0.0),
            "popular": _metrics(0.5, 0.0, 0.0),
            "adversarial": _metrics(0.5, 0.0, 0.0),
        },
    },
    "targets": {"pope_f1": 85.9},
    "timings": {"pretrain": 12.5, "finetune": 3725.0},
    "stages": [
        {"name": "pretrain", "steps": 100, "final_loss": 2.345678},
        {"name": "finetune", "steps": 50, "final_loss": 1.5, "lr": 2e-5},
    ],
    "loss_curves": {"pretrain": [[0, 5.0], [50, 3.0], [100, 2.3]], "finetune": [[0, 2.0], [50, 1.5]]},
    "sample": {
        "image": PIXEL,
        "conversation": [
            {"role": "user", "content": "<image>\nWhat is in the image?"},
            {"role": "assistant", "content": "A cat & a <dog>."},
        ],
    },
    "notes": {"comment": "<script>alert(1)</script>"},
}


class _Checker(HTMLParser):
    """Records tags and fails on mis-nested or unclosed elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.errors: list[str] = []
        self.img_src: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.img_src.append(dict(attrs)["src"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def _check(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors, checker.errors
    assert not checker.stack, checker.stack
    return checker


def test_write_report_files(tmp_path: Path) -> None:
    json_path, html_path = write_report(RESULTS, tmp_path / "out", title="tiny <run>")
    assert json_path == tmp_path / "out" / "results.json"
    assert html_path == tmp_path / "out" / "report.html"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "report.html",
        "results.json",
    ]  # no temp files
    assert json.loads(json_path.read_text()) == RESULTS

    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    checker = _check(page)
    assert checker.tags.count("svg") == 2  # F1 bars + loss curves
    assert "rect" in checker.tags and "polyline" in checker.tags
    assert checker.img_src == [PIXEL]
    # numbers, as percentages
    for number in ("86.12", "84.33", "82.55", "87.01", "41.00", "3000"):
        assert number in page
    assert "stroke-dasharray" in page and "target F1 85.9" in page
    assert "blind control (blank image)" in page and "robust" in page and "unparseable" in page
    assert "mean" in page
    # timings, stages, conversation
    assert "1 h 2 min" in page and "12.5 s" in page
    assert "final_loss" in page and "2.34568" in page
    # everything escaped; no scripts, no external assets
    assert "tiny &lt;run&gt;" in page
    assert "&lt;image&gt;" in page and "A cat &amp; a &lt;dog&gt;." in page
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page


def test_report_flat_shape_and_odd_inputs(tmp_path: Path) -> None:
    results = {
        "pope": {"model": {"random": _metrics(0.75, 0.7, 0.5, n=8)}},
        "loss_curves": {"s": [[0, float("nan")], [1, 2.0]]},
        "timings": "not a mapping",  # unexpected shape: shown as JSON instead of failing
        "sample": {"image": "https://example.com/x.png", "conversation": []},
    }
    page = render_html(results)
    _check(page)
    assert "70.00" in page and "<svg" in page
    assert "&quot;not a mapping&quot;" in page
    assert "<img" not in page  # remote images are not embedded
    json_path, _ = write_report({"x": 1}, tmp_path)
    assert json.loads(json_path.read_text()) == {"x": 1}
    _check(render_html({}))


def test_format_table() -> None:
    text = format_table(RESULTS)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["condition", "split", "parser"]
    assert any(
        "model" in line and "random" in line and "strict" in line and "86.12" in line for line in lines
    )
    assert any("robust" in line and "87.01" in line for line in lines)
    assert any(line.startswith("blind control (blank image)") and "0.00" in line for line in lines)
    mean_f1 = 100 * (0.8612 + 0.8433 + 0.8255) / 3
    assert f"{mean_f1:.2f}" in text
    assert "target POPE F1: 85.90" in text
    assert format_table({}) == "(no POPE results)"
    flat = format_table({"pope": {"m": {"random": _metrics(0.5, 0.25, 0.1, n=6)}}})
    assert "parser" not in flat and "25.00" in flat
