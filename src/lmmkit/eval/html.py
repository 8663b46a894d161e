"""Shared pieces of lmmkit's self-contained HTML pages: the stylesheet, the page shell, JSON encoding."""

from __future__ import annotations

import os
from typing import Any

from lmmkit.eval.charts import esc

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1000px;
color:#222;padding:0 1rem}
h1{border-bottom:2px solid #4e79a7;padding-bottom:.3rem}
h2{margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0 1rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#f3f5f8} td:first-child,th:first-child{text-align:left}
tr.mean td{font-weight:600;background:#fafafa}
pre{background:#f6f8fa;padding:.75rem;overflow:auto;border-radius:4px}
.turn{margin:.4rem 0;padding:.5rem .75rem;border-radius:6px;white-space:pre-wrap}
.role{font-weight:600;display:block;margin-bottom:.2rem;text-transform:capitalize}
.user,.human{background:#eef3fb} .assistant,.gpt{background:#f1f8ee} .system{background:#f5f5f5}
img.sample{max-width:384px;max-height:384px;border:1px solid #ccc}
.note{color:#666;font-size:.9em}
"""


def page(title: str, body: str) -> str:
    """A complete HTML page: no scripts, no external assets."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n"
            f"{body}\n</body>\n</html>\n")


def json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=str)
    return str(obj)
