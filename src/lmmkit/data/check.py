"""Bad-record policy and bookkeeping, and a dry run of the loader's checks over a data file.

Real datasets always contain a few broken records. Under "skip" each one is logged and counted by
reason, so a run finishes with a summary instead of dying on record 412,337; under "stop" the first
one raises, which is what you want while preparing a dataset.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmmkit.data.schema import DataError

logger = logging.getLogger("lmmkit.data")

BadRecordPolicy = Literal["skip", "stop"]
POLICIES: tuple[str, ...] = ("skip", "stop")

# Reason categories. Errors raised by lmmkit's data code carry one (see data_error); errors from
# elsewhere (ConversationRecord.validate) are classified from their message.
REASON_MISSING_IMAGE = "missing image"
REASON_CORRUPT_IMAGE = "corrupt image"
REASON_TRUNCATED_IMAGE = "truncated image"
REASON_BOMB = "decompression bomb"
REASON_PATH_ESCAPE = "image path escapes folder"
REASON_BAD_JSON = "unreadable JSON"
REASON_MALFORMED = "malformed record"
REASON_NO_ASSISTANT = "no assistant turn"
REASON_TAG_MISMATCH = "image tag mismatch"
REASON_EMPTY = "empty conversation"
REASON_BAD_ROLE = "unknown role"
REASON_TOO_LONG = "too long"
REASON_OTHER = "other"

# Message fragments of ConversationRecord.validate(), which raises plain DataErrors.
_MESSAGE_REASONS: tuple[tuple[str, str], ...] = (
    ("no assistant turn", REASON_NO_ASSISTANT),
    ("tag(s) in the text but", REASON_TAG_MISMATCH),
    ("conversation is empty", REASON_EMPTY),
    ("has role", REASON_BAD_ROLE),
)

# Past this many warnings for one reason, further ones are only counted: a dataset with 100k
# missing images should not bury the log.
MAX_WARNINGS_PER_REASON = 20
MAX_EXAMPLES_PER_REASON = 3


def data_error(message: str, reason: str) -> DataError:
    """A DataError tagged with a reason category, for BadRecordCounter."""
    err = DataError(message)
    err.reason = reason  # type: ignore[attr-defined]
    return err


def reason_of(err: DataError) -> str:
    """The reason category of a DataError: its tag, else guessed from the message, else "other"."""
    reason = getattr(err, "reason", None)
    if isinstance(reason, str) and reason:
        return reason
    text = str(err)
    for fragment, category in _MESSAGE_REASONS:
        if fragment in text:
            return category
    return REASON_OTHER


class BadRecordCounter:
    """Applies a BadRecordPolicy to DataErrors and counts the skipped ones by reason."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._examples: dict[str, list[str]] = {}

    def handle(self, err: DataError, policy: BadRecordPolicy) -> None:
        """Under "stop" re-raise `err`; under "skip" count it and log a warning naming the record."""
        if policy not in POLICIES:
            raise ValueError(f"bad-record policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if policy == "stop":
            raise err
        reason = reason_of(err)
        self._counts[reason] += 1
        n = self._counts[reason]
        examples = self._examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES_PER_REASON:
            examples.append(str(err))
        if n <= MAX_WARNINGS_PER_REASON:
            logger.warning("skipping bad record (%s): %s", reason, err)
        if n == MAX_WARNINGS_PER_REASON:
            logger.warning("further %r records will be skipped without a warning each", reason)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """Counts by reason, most frequent first."""
        return dict(self._counts.most_common())

    def examples(self, reason: str) -> list[str]:
        """The first few error messages seen for `reason`."""
        return list(self._examples.get(reason, []))

    def summary(self) -> str:
        """One line for the end of a run, e.g. "skipped 3 bad records: 2 missing image, 1 corrupt image"."""
        if not self.total:
            return "no bad records"
        parts = ", ".join(f"{n} {reason}" for reason, n in self._counts.most_common())
        return f"skipped {self.total} bad record{'s' if self.total != 1 else ''}: {parts}"

    def __repr__(self) -> str:
        return f"BadRecordCounter({self.as_dict()})"


@dataclass
class CheckReport:
    n_ok: int
    n_bad: int
    counter: BadRecordCounter = field(default_factory=BadRecordCounter)
    path: Path | None = None


def check_file(path: Path, image_folder: Path | None, open_images: bool = True) -> CheckReport:
    """Run the loader's record checks over a data file without training; backs `lmmkit data check`.

    Every record is parsed, validated and its image paths resolved; with `open_images` each image is
    also decoded, which catches corrupt files and bombs but reads every image once. A file that
    cannot be read as a whole (missing, not JSON) raises DataError.
    """
    # Imported here: the format readers import this module for the counter.
    from lmmkit.data.formats.llava import read_llava

    counter = BadRecordCounter()
    n_ok = sum(1 for _ in read_llava(Path(path), image_folder, "skip", counter, open_images=open_images))
    return CheckReport(n_ok=n_ok, n_bad=counter.total, counter=counter, path=Path(path))


def format_report(report: CheckReport) -> str:
    """A human-readable report: totals, then each reason with its count and a few examples."""
    name = str(report.path) if report.path is not None else "data"
    total = report.n_ok + report.n_bad
    lines = [f"{name}: {total} record{'s' if total != 1 else ''}, {report.n_ok} ok, {report.n_bad} bad"]
    for reason, n in report.counter.as_dict().items():
        lines.append(f"  {n} x {reason}")
        for example in report.counter.examples(reason):
            lines.append(f"      e.g. {example}")
    return "\n".join(lines)
