"""SQLite cache of model and judge responses: a killed eval resumes, a re-run makes no calls.

Keys are sha256 digests of everything that decides a response: the backend's fingerprint (its
weights or endpoint + model name), the task, the item id, the exact prompt (and image names),
and the generation settings. Each answer is committed as soon as it arrives, so nothing already
paid for is lost when a run dies.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path


def cache_key(*parts: object) -> str:
    """A stable digest of the parts (JSON-encoded, so 1 and "1" differ)."""
    blob = json.dumps([str(p) if not isinstance(p, (int, float, str, type(None))) else p for p in parts],
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """A key -> text table in one SQLite file (or in memory when `path` is None)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False)
        self._lock = threading.Lock()  # judge calls run in a thread pool
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, kind TEXT, text TEXT,"
                             " meta TEXT, created REAL)")
            self._db.commit()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT text FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return row[0]

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        keys = list(keys)
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                q = f"SELECT key, text FROM responses WHERE key IN ({','.join('?' * len(chunk))})"
                found.update(dict(self._db.execute(q, chunk).fetchall()))
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def put(self, key: str, text: str, kind: str = "model", meta: dict | None = None) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses (key, kind, text, meta, created) VALUES (?, ?, ?, ?, ?)",
                             (key, kind, text, json.dumps(meta or {}), time.time()))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
