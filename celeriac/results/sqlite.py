"""``sqlite:///path`` results: one row per task in an SQLite file shared by a host's processes.

Waiting for a result polls ``PRAGMA data_version`` (see :mod:`celeriac.sqlite_util`), so a
waiter reads the row again only after some process committed something.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .. import states
from ..exceptions import ResultBackendError
from ..sqlite_util import (
    ChangeWaiter,
    ThreadConnections,
    check_location,
    path_from_url,
    translate_errors,
    write_transaction,
)
from .base import ResultBackend

__all__ = ["SQLiteBackend"]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS results (
        task_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        doc BLOB NOT NULL,
        expires REAL,
        updated REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS results_expires ON results (expires) WHERE expires IS NOT NULL",
)

# A stored SUCCESS is final, unless it has expired (then it is as good as gone).
_UPSERT = """INSERT INTO results (task_id, status, doc, expires, updated)
    VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (task_id) DO UPDATE SET status = excluded.status, doc = excluded.doc,
        expires = excluded.expires, updated = excluded.updated
    WHERE results.status != 'SUCCESS' OR results.expires <= excluded.updated"""

_LIVE = "task_id = ? AND (expires IS NULL OR expires > ?)"


class SQLiteBackend(ResultBackend):
    """Results as rows keyed by task id, with expiry; waiters poll the file's change counter."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.path = path_from_url(url, "result backend")
        check_location(self.path, "result backend database", ResultBackendError)
        self._connections = ThreadConnections(self.path, _SCHEMA)
        with self._errors():
            self._connections.get()

    def _conn(self) -> sqlite3.Connection:
        return self._connections.get()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        with translate_errors(self.path, "result backend", ResultBackendError):
            yield

    def _row(self, meta: dict[str, Any], now: float) -> tuple[Any, ...]:
        expires = now + self.expires if self.expires else None
        return (meta["task_id"], meta["status"], self.encode(meta), expires, now)

    def store(self, meta: dict[str, Any], reply_to: str | None = None) -> None:
        row = self._row(meta, self.clock())
        with self._errors():
            self._conn().execute(_UPSERT, row)

    def store_many(self, metas: Sequence[dict[str, Any]], reply_to: str | None = None) -> None:
        now = self.clock()
        rows = [self._row(meta, now) for meta in metas]
        if not rows:
            return
        with self._errors():
            conn = self._conn()
            with write_transaction(conn):
                conn.executemany(_UPSERT, rows)

    def _read(self, conn: sqlite3.Connection, task_id: str) -> tuple[str, bytes] | None:
        rows = conn.execute(f"SELECT status, doc FROM results WHERE {_LIVE}",
                            (task_id, self.clock())).fetchall()
        return (rows[0][0], bytes(rows[0][1])) if rows else None

    def get(self, task_id: str) -> dict[str, Any] | None:
        with self._errors():
            found = self._read(self._conn(), task_id)
        return None if found is None else self.decode(found[1])

    def wait(self, task_id: str, timeout: float | None) -> dict[str, Any] | None:
        with self._errors():
            conn = self._conn()
            waiter = (ChangeWaiter(conn, timeout, clock=self.clock)
                      if timeout is None or timeout > 0 else None)
            while True:
                found = self._read(conn, task_id)
                if found is not None and found[0] in states.READY_STATES:
                    return self.decode(found[1])
                if waiter is None or not waiter.wait():
                    return None

    def forget(self, task_id: str) -> None:
        with self._errors():
            self._conn().execute("DELETE FROM results WHERE task_id = ?", (task_id,))

    def cleanup(self) -> int:
        with self._errors():
            cur = self._conn().execute(
                "DELETE FROM results WHERE expires IS NOT NULL AND expires <= ?", (self.clock(),))
            return cur.rowcount

    def after_fork(self) -> None:
        self._connections.after_fork()

    def close(self) -> None:
        self._connections.close()
