"""Small English helpers shared by the data generators and the benchmark builders."""

from __future__ import annotations

# Words that start with a vowel letter but a consonant sound ("a unicorn", "a one-way sign"),
# and words that start with a silent h ("an hour").
_CONSONANT_SOUND_PREFIXES = (
    "uni",
    "use",
    "usu",
    "uten",
    "uku",
    "ura",
    "ure",
    "uro",
    "eu",
    "ewe",
    "one",
    "once",
)
_SILENT_H_PREFIXES = ("hour", "honest", "honor", "honour", "heir")


def article(noun: str) -> str:
    """Return "an" if `noun` starts with a vowel sound, else "a" (a small English heuristic)."""
    word = noun.strip().lower()
    if word.startswith(_SILENT_H_PREFIXES):
        return "an"
    if word.startswith(_CONSONANT_SOUND_PREFIXES):
        return "a"
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")
