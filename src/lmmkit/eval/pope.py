"""POPE: build the question sets from object annotations, parse answers, score them.

Two answer parsers live here side by side:

* ``parse_official`` is the POPE authors' evaluate.py rule, bug for bug ("NO" counts as yes).
* ``parse_robust`` is lmmkit's own, case- and punctuation-insensitive, and says ``None`` when it
  cannot tell; unparseable answers are scored as wrong and counted.

Metrics take yes as the positive class. ``yes_ratio`` is the share of *predicted* yes answers
(a known harness bug reports the ground-truth share instead, which is always 0.5 on POPE).
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from lmmkit.atomic import atomic_write
from lmmkit.data.english import article

SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
N_POSITIVES = 3
OFFICIAL_KEYS: tuple[str, ...] = ("question_id", "image", "text", "label")

# --------------------------------------------------------------------------------------------
# Building the question sets
# --------------------------------------------------------------------------------------------

def question_text(obj: str) -> str:
    """The POPE question for one object: "Is there a/an {obj} in the image?"."""
    return f"Is there {article(obj)} {obj} in the image?"


def _distinct(objects: Iterable[str]) -> list[str]:
    """Object names stripped, empties dropped, duplicates dropped, first-occurrence order kept."""
    seen: dict[str, None] = {}
    for obj in objects:
        name = str(obj).strip()
        if name:
            seen.setdefault(name, None)
    return list(seen)


def _draw_random(
    rng: random.Random, pool: Sequence[str], present: set[str], used: set[str], image: str
) -> str:
    """Uniform draw from `pool`, rejecting and redrawing objects in the image or already used."""
    if not any(obj not in present and obj not in used for obj in pool):
        raise ValueError(
            f"no random negative left for image {image!r}: the sampled images hold only {len(pool)} "
            "distinct objects"
        )
    while True:
        obj = rng.choice(pool)
        if obj not in present and obj not in used:
            return obj


def build_pope(
    annotations: Sequence[tuple[str, Sequence[str]]],
    n_images: int,
    seed: int,
    splits: Sequence[str] = SPLITS,
) -> dict[str, list[dict]]:
    """Build POPE question sets with the official negative-sampling rule.

    `annotations` holds (image name, its object names in annotation order). Images with at least
    3 distinct objects are eligible; `n_images` of them are sampled with ``random.Random(seed)``
    (in the order given; fewer available -> all of them, with a warning). The same images serve
    every split. Per image, its first 3 distinct objects are the positives; after each positive
    comes one negative that is neither in the image nor already used for that image:

    * random: uniform over the distinct objects of the sampled images (reject and redraw);
    * popular: the object found in most images (counted over *all* annotations given);
    * adversarial: the object that co-occurs (shares an image, over all annotations) most often
      with that positive; if none passes, a random one as above.

    Determinism and ties: the random pool is sorted by name; each split draws from its own
    ``random.Random(f"{seed}/{split}")`` so a split does not depend on which others are built;
    popular ties go to the alphabetically first name, adversarial ties likewise.

    Returns {split: rows}, rows {"question_id" (1-based per split), "image", "text", "label",
    "object"}, labels alternating yes, no. Raises ValueError when a negative cannot be found.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown POPE split(s) {unknown}; choose from {list(SPLITS)}")
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")

    images: list[tuple[str, list[str]]] = []
    names: set[str] = set()
    for name, objects in annotations:
        if name in names:
            raise ValueError(f"image {name!r} appears twice in the annotations")
        names.add(name)
        images.append((name, _distinct(objects)))

    frequency: Counter[str] = Counter()
    cooccur: dict[str, Counter[str]] = {}
    for _, objs in images:
        frequency.update(objs)
        for a in objs:
            row = cooccur.setdefault(a, Counter())
            row.update(b for b in objs if b != a)

    eligible = [(name, objs) for name, objs in images if len(objs) >= N_POSITIVES]
    if len(eligible) < n_images:
        warnings.warn(
            f"POPE: only {len(eligible)} images have >= {N_POSITIVES} objects; using all of them "
            f"(asked for {n_images})",
            UserWarning,
            stacklevel=2,
        )
        chosen = list(eligible)
    else:
        chosen = random.Random(seed).sample(eligible, n_images)

    pool = sorted({obj for _, objs in chosen for obj in objs})
    by_popularity = sorted(frequency, key=lambda o: (-frequency[o], o))

    out: dict[str, list[dict]] = {}
    for split in splits:
        rng = random.Random(f"{seed}/{split}")
        rows: list[dict] = []
        for name, objs in chosen:
            present = set(objs)
            used: set[str] = set()
            for positive in objs[:N_POSITIVES]:
                if split == "random":
                    negative = _draw_random(rng, pool, present, used, name)
                elif split == "popular":
                    negative = next((o for o in by_popularity if o not in present and o not in used), None)
                    if negative is None:
                        raise ValueError(f"no popular negative left for image {name!r}")
                else:
                    partners = sorted(
                        cooccur.get(positive, Counter()).items(), key=lambda kv: (-kv[1], kv[0])
                    )
                    negative = next(
                        (o for o, count in partners if count > 0 and o not in present and o not in used), None
                    )
                    if negative is None:
                        negative = _draw_random(rng, pool, present, used, name)
                used.add(negative)
                for obj, label in ((positive, "yes"), (negative, "no")):
                    rows.append(
                        {
                            "question_id": len(rows) + 1,
                            "image": name,
                            "text": question_text(obj),
                            "label": label,
                            "object": obj,
                        }
                    )
        out[split] = rows
    return out


# --------------------------------------------------------------------------------------------
# Parsing answers
# --------------------------------------------------------------------------------------------


def parse_official(answer: str) -> str:
    """The official POPE evaluate.py rule, reproduced exactly (case-sensitive, splits on ' ')."""
    text = answer
    if "." in text:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


_YES_FIRST = {"yes", "yeah", "yep", "yup", "yea", "correct", "affirmative", "true"}
_NO_FIRST = {"no", "nope", "nah", "incorrect", "false", "negative"}
_NEGATIONS = {
    "no", "not", "none", "nothing", "nobody", "nowhere", "never", "neither", "nor", "without",
    "absent", "cannot", "nope", "dont", "doesnt", "isnt", "arent", "cant", "wasnt", "werent",
}  # fmt: skip
_POSITIVE_WORDS = {
    "yes", "yeah", "yep", "yup", "visible", "present", "indeed", "certainly", "definitely",
    "absolutely", "contains", "contain",
}  # fmt: skip
_POSITIVE_PHRASES = ("there is", "there are", "there's", "i see", "i can see", "can be seen", "of course")
_UNSURE_PHRASES = (
    "not sure", "unsure", "unclear", "uncertain", "hard to tell", "hard to say", "difficult to tell",
    "difficult to say", "cannot tell", "can't tell", "cannot determine", "can't determine",
    "impossible to tell", "not possible to tell", "unable to determine", "unable to tell",
    "i don't know", "i do not know", "not clear",
)  # fmt: skip
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
_SENTENCE_END = re.compile(r"[.!?;\n]+")


def parse_robust(answer: str) -> str | None:
    """lmmkit's robust yes/no parser: case- and punctuation-insensitive; None when undecidable.

    Order: a leading yes/no word decides ("Yes, there is", "No."); otherwise each sentence in
    turn: hedging ("not sure") -> None, any negation ("There is no ...", "I don't see any") ->
    no, an affirmative cue ("there is a", "visible") -> yes; nothing decisive anywhere -> None.
    """
    text = " ".join(str(answer).lower().replace("\u2019", "'").replace("\u2018", "'").split())
    text = text.replace("no doubt", "indeed")
    words = _WORD.findall(text)
    if not words:
        return None
    first = words[0]
    if first in _YES_FIRST:
        return "yes"
    if first in _NO_FIRST:
        return "no"
    for sentence in _SENTENCE_END.split(text):
        tokens = _WORD.findall(sentence)
        if not tokens:
            continue
        padded = " " + " ".join(tokens) + " "
        if any(f" {p} " in padded for p in _UNSURE_PHRASES):
            return None
        if any(t in _NEGATIONS or t.endswith("n't") for t in tokens):
            return "no"
        if any(t in _POSITIVE_WORDS for t in tokens) or any(f" {p} " in padded for p in _POSITIVE_PHRASES):
            return "yes"
    return None


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    return float(num) / den if den else 0.0


def score_pope(predictions: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 (yes = positive), yes_ratio and counts.

    `predictions` are parsed answers, "yes"/"no" (case and surrounding space ignored); anything
    else (None included) is unparseable, counted in "unparseable" and scored as the opposite of
    its label. yes_ratio = predictions that are literally yes / N (unparseable ones are not yes).
    Returns {"accuracy", "precision", "recall", "f1", "yes_ratio", "n", "unparseable", "tp",
    "fp", "tn", "fn"}; a zero denominator gives 0.0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    tp = fp = tn = fn = unparseable = said_yes = 0
    for pred, label in zip(predictions, labels, strict=True):
        gold = str(label).strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"label must be 'yes' or 'no', got {label!r}")
        guess = pred.strip().lower() if isinstance(pred, str) else None
        if guess not in ("yes", "no"):
            unparseable += 1
            guess = "no" if gold == "yes" else "yes"
        else:
            said_yes += guess == "yes"
        if guess == "yes":
            tp, fp = (tp + 1, fp) if gold == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if gold == "no" else (tn, fn + 1)
    n = len(labels)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(said_yes, n),
        "n": n,
        "unparseable": unparseable,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def score_pope_by_position(predictions: Sequence[str | None], labels: Sequence[str]) -> dict:
    """`score_pope` with evaluate.py's pairing: predictions and labels are zipped by position.

    The longer list is truncated, as ``zip`` does silently in the official; "n_predictions" and
    "n_labels" say how many there were. yes_ratio is over *all* predictions, as the official computes
    it before pairing. "undefined" lists the metrics whose denominator is zero (the official raises
    ZeroDivisionError at the first of them; here they are 0.0).
    """
    n = min(len(predictions), len(labels))
    out = score_pope(predictions[:n], labels[:n])
    # every prediction scored against "yes": TP counts the literal yes answers, normalised as score_pope
    # does (an unparseable one becomes "no" there, so it is not counted)
    said_yes = score_pope(predictions, ["yes"] * len(predictions))["tp"]
    out["yes_ratio"] = _ratio(said_yes, len(predictions))
    precision_recall = out["precision"] + out["recall"]
    checks = (("yes_ratio", len(predictions)), ("precision", out["tp"] + out["fp"]),
              ("recall", out["tp"] + out["fn"]), ("f1", precision_recall), ("accuracy", n))
    out.update(n_predictions=len(predictions), n_labels=len(labels),
               undefined=[name for name, den in checks if not den])
    return out


def score_answers(answers: Sequence[str], labels: Sequence[str]) -> dict:
    """Score raw answers both ways: {"strict": official parser, "robust": lmmkit's parser}."""
    return {
        "strict": score_pope([parse_official(a) for a in answers], labels),
        "robust": score_pope([parse_robust(a) for a in answers], labels),
    }


# --------------------------------------------------------------------------------------------
# Question files (JSON lines, as the official release: one object per line)
# --------------------------------------------------------------------------------------------


def write_pope_jsonl(rows: Iterable[Mapping], path: str | os.PathLike[str], extra_keys: bool = True) -> Path:
    """Write question rows as JSON lines (official keys first); atomic. Returns the path.

    With `extra_keys` False only the official question_id, image, text, label are written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in rows:
        ordered = {k: row[k] for k in OFFICIAL_KEYS if k in row}
        if extra_keys:
            ordered.update((k, v) for k, v in row.items() if k not in ordered)
        lines.append(json.dumps(ordered, ensure_ascii=False))
    atomic_write(path, "".join(line + "\n" for line in lines))
    return path


def read_pope_jsonl(path: str | os.PathLike[str], required: Sequence[str] = ()) -> list[dict]:
    """Read a POPE question (or answer) file: one JSON object per non-blank line.

    With `required`, every line must be a JSON object holding those keys; else ValueError naming
    the file and line.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not a JSON object: {err}") from err
            if required:
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                missing = [k for k in required if k not in row]
                if missing:
                    raise ValueError(f"{path}:{lineno}: no {', '.join(map(repr, missing))} field")
            rows.append(row)
    return rows
