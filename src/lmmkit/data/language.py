"""Which language a caption is in: the language filter of `lmmkit data dedup` (`--lang en,de`).

Detection is langid.py (Lui & Baldwin, 2012: a naive Bayes over byte n-grams, 97 languages, its model
inside the package, nothing downloaded), with probabilities normalised over the languages. A text whose
best language is below `min_prob` is "undetermined": too short or too mixed to tell ("IMG_2034.jpg",
"ok" and the empty string all get about 0.17). The filter drops those too, and counts them apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any

UNDETERMINED = "undetermined"


@cache
def _identifier() -> Any:
    try:
        from langid import langid
    except ImportError as err:  # an optional dependency: say how to get it
        raise ImportError("the language filter needs langid: pip install langid (or pip install 'lmmkit[data]')") \
            from err
    return langid.LanguageIdentifier.from_modelstring(langid.model, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the most likely language of `text`."""
    lang, prob = _identifier().classify(text)
    return str(lang), float(prob)


def known_languages() -> list[str]:
    return sorted(_identifier().nb_classes)


class LanguageFilter:
    """Keeps texts whose most likely language is one of `keep`, at probability >= `min_prob`."""

    def __init__(self, keep: Iterable[str], min_prob: float = 0.5) -> None:
        self.keep = {code.strip().lower() for code in keep if code.strip()}
        if not self.keep:
            raise ValueError("the language filter needs at least one language code, e.g. --lang en")
        unknown = sorted(self.keep - set(known_languages()))
        if unknown:
            raise ValueError(f"unknown language code(s) {', '.join(unknown)}; langid knows: "
                             + ", ".join(known_languages()))
        if not 0 <= min_prob < 1:
            raise ValueError(f"the language probability threshold must be in [0, 1), got {min_prob}")
        self.min_prob = min_prob

    def verdict(self, text: str) -> str | None:
        """None when `text` is kept; otherwise why it is dropped: its language, or UNDETERMINED."""
        lang, prob = detect_language(text)
        if prob < self.min_prob:
            return UNDETERMINED
        return None if lang in self.keep else lang
