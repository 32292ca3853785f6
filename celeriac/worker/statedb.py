"""``--statedb``: revoked task ids and the logical clock, kept across restarts in SQLite."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable

from ..exceptions import WorkerError

__all__ = ["StateDB"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS revoked (task_id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class StateDB:
    """A small SQLite file; used only from the worker's I/O thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self._conn = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                                             check_same_thread=False)
                self._conn.executescript(_SCHEMA)
            except sqlite3.Error as exc:
                raise WorkerError(f"Cannot open the state database {self.path!r}: {exc}. "
                                  "Check that its directory exists and is writable.") from exc
        return self._conn

    def load(self, not_before: float) -> tuple[list[tuple[str, float]], int]:
        """Revoked ids (with the time they were revoked) newer than ``not_before``, and
        the saved clock."""
        db = self._db()
        db.execute("DELETE FROM revoked WHERE at < ?", (not_before,))
        rows = db.execute("SELECT task_id, at FROM revoked ORDER BY at").fetchall()
        clock = db.execute("SELECT value FROM meta WHERE key = 'clock'").fetchone()
        return [(str(r[0]), float(r[1])) for r in rows], int(clock[0]) if clock else 0

    def add_revoked(self, ids: Iterable[str], at: float) -> None:
        self._db().executemany("INSERT OR REPLACE INTO revoked VALUES (?, ?)",
                               [(task_id, at) for task_id in ids])

    def save_clock(self, value: int) -> None:
        self._db().execute("INSERT OR REPLACE INTO meta VALUES ('clock', ?)", (value,))

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
