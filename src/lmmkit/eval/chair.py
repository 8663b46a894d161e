"""CHAIR-style caption hallucination (Rohrbach et al., 2018): which objects a caption mentions, and
how many of them are not in the image.

* CHAIR_i: hallucinated object mentions / all object mentions (over the whole set of captions);
* CHAIR_s: captions with at least one hallucinated object / all captions;
* recall:  truth objects mentioned / truth objects (a caption that says nothing hallucinates nothing,
           so CHAIR is reported with the coverage it was bought at).

Objects are counted once per caption (a caption naming the same object twice mentions it once).
Mentions are found with word-boundary matching of each vocabulary entry's synonyms, longest first,
with an optional plural "s"/"es", and each span of text counts for one object only. The original
CHAIR uses COCO's 80 categories with a synonym list; here the vocabulary comes with the data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectVocabulary:
    """Object name -> its synonyms (the name itself is always one)."""

    synonyms: Mapping[str, Sequence[str]]

    def __post_init__(self) -> None:
        if not self.synonyms:
            raise ValueError("an object vocabulary needs at least one object")
        pairs = sorted(((s.lower(), name) for name, syns in self.synonyms.items() for s in {name, *syns}),
                       key=lambda p: -len(p[0]))
        alternation = "|".join(re.escape(s) for s, _ in pairs)
        object.__setattr__(self, "_pattern", re.compile(rf"\b({alternation})(?:e?s)?\b", re.IGNORECASE))
        object.__setattr__(self, "_lookup", {s: name for s, name in pairs})

    def mentions(self, text: str) -> list[str]:
        """The vocabulary objects `text` names, each once, in order of first mention."""
        found: dict[str, None] = {}
        for m in self._pattern.finditer(text):  # type: ignore[attr-defined]
            found.setdefault(self._lookup[m.group(1).lower()], None)  # type: ignore[attr-defined]
        return list(found)


def chair_scores(captions: Sequence[str | None], truths: Sequence[Sequence[str]], vocab: ObjectVocabulary
                 ) -> tuple[dict, list[dict]]:
    """(CHAIR_i, CHAIR_s, recall and counts; one record per caption). A None caption (the model
    failed) counts as a caption that mentions nothing."""
    mentioned_total = hallucinated_total = captions_with = truth_total = truth_hit = 0
    records = []
    for caption, truth in zip(captions, truths, strict=True):
        names = vocab.mentions(caption or "")
        truth_set = set(truth)
        fake = [n for n in names if n not in truth_set]
        mentioned_total += len(names)
        hallucinated_total += len(fake)
        captions_with += bool(fake)
        truth_total += len(truth_set)
        truth_hit += len(truth_set & set(names))
        records.append({"mentioned": names, "hallucinated": fake, "missed": sorted(truth_set - set(names))})
    n = len(records)
    scores = {
        "chair_i": hallucinated_total / mentioned_total if mentioned_total else 0.0,
        "chair_s": captions_with / n if n else 0.0,
        "recall": truth_hit / truth_total if truth_total else 0.0,
        "mentions": mentioned_total,
        "hallucinated_mentions": hallucinated_total,
        "captions": n,
    }
    return scores, records
