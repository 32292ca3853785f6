"""What the SQLite broker and the SQLite result store share: opening, threads, forks, waiting.

Both stores keep one connection per thread (an :mod:`sqlite3` connection must not be shared
between threads mid-statement, and never across ``fork()``), open the file in WAL mode so many
processes on one host can read while one writes, and wait for other processes' commits by
polling ``PRAGMA data_version`` -- a counter read from shared memory, so an idle waiter costs
almost nothing and never takes a lock.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from .exceptions import CeleriacError, ConfigurationError
from .urls import sqlite_path

__all__ = ["ChangeWaiter", "ThreadConnections", "check_location", "path_from_url",
           "translate_errors", "write_transaction"]

BUSY_TIMEOUT = 10.0
"""Seconds a writer waits for another process's write transaction before giving up."""

MIN_STEP = 0.001
MAX_STEP = 0.05
BUSY_STEP = 0.005
"""A waiter polls after MIN_STEP, doubling up to MAX_STEP; after a commit that was not what
it waited for it polls again within BUSY_STEP, so a busy file costs idle waiters little."""


def path_from_url(url: str, what: str) -> str:
    """The database file named by ``url``; refuses URLs that do not name a file."""
    path = sqlite_path(url)
    if not path or path == ":memory:" or path.startswith("file::memory:"):
        raise ConfigurationError(
            f"The SQLite {what} URL {url!r} names no file: use 'sqlite:///relative.db' or "
            f"'sqlite:////absolute/path.db' (or 'memory://' for an in-process store).")
    return path


def check_location(path: str, what: str, error: type[CeleriacError]) -> None:
    """Raise ``error`` with the fix when ``path`` cannot be created or written.

    WAL mode writes ``-wal`` and ``-shm`` files next to the database, so the directory
    itself must be writable, not only the file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise error(
            f"Cannot open the SQLite {what} {path!r}: the directory {directory!r} does not "
            f"exist. Create it, or point the URL at a file in an existing directory.")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise error(
            f"Cannot open the SQLite {what} {path!r}: the directory {directory!r} is not "
            f"writable by this user. SQLite needs to create '-wal' and '-shm' files beside "
            f"the database: fix the permissions or choose a writable directory.")
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        raise error(
            f"Cannot open the SQLite {what} {path!r}: the file is not readable and writable "
            f"by this user. Fix its permissions or choose another file.")


@contextmanager
def translate_errors(path: str, what: str, error: type[CeleriacError]) -> Iterator[None]:
    """Turn :class:`sqlite3.Error` into ``error``, naming the file it happened on."""
    try:
        yield
    except sqlite3.Error as exc:
        hint = ""
        if "locked" in str(exc) or "busy" in str(exc):
            hint = (f" Another process held the write lock for more than {BUSY_TIMEOUT:g}s;"
                    f" check for a stuck process using this file.")
        raise error(f"SQLite {what} {path!r}: {type(exc).__name__}: {exc}.{hint}") from exc


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` transaction: the write lock is taken up front, so the
    statements inside never fail half-way on a lock upgrade."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, which is kept in the file once set.

    Changing the journal mode does not wait on the busy handler: when several processes open
    a new file at once, one of them may get "database is locked" at once, so retry briefly.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"could not switch to WAL mode (got {mode!r})")


def _open(path: str) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; every write path says BEGIN itself.
    # check_same_thread=False only so close() may close connections of threads that ended.
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        _use_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


class ThreadConnections:
    """One connection per thread to one database file, created on first use.

    The schema statements run once per process, in one write transaction. After ``fork()``
    (noticed by :meth:`after_fork` or by a changed pid) the parent's connections are kept
    referenced but never touched again: closing them in the child could disturb the parent's
    locks, and using them is what SQLite forbids.
    """

    def __init__(self, path: str, schema: Sequence[str]) -> None:
        self.path = path
        self._schema = tuple(schema)
        self._reset()
        self._inherited: list[sqlite3.Connection] = []

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._schema_ready = False

    def get(self) -> sqlite3.Connection:
        """This thread's connection."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._pid == os.getpid():
            return conn
        if self._pid != os.getpid():
            self.after_fork()
        conn = _open(self.path)
        try:
            self._ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._close_dead_threads()
            self._open.append((threading.current_thread(), conn))
        self._local.conn = conn
        return conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        if self._schema_ready:
            return
        with write_transaction(conn):
            for statement in self._schema:
                conn.execute(statement)
        self._schema_ready = True

    def _close_dead_threads(self) -> None:
        alive = []
        for thread, conn in self._open:
            if thread.is_alive():
                alive.append((thread, conn))
            else:
                conn.close()
        self._open = alive

    def after_fork(self) -> None:
        """Forget the connections inherited from the parent; the next :meth:`get` reconnects."""
        self._inherited.extend(conn for _, conn in self._open)
        self._reset()

    def close(self) -> None:
        """Close this thread's connection, and those of threads that have ended."""
        if self._pid != os.getpid():
            self.after_fork()
            return
        me = threading.current_thread()
        with self._lock:
            keep = []
            for thread, conn in self._open:
                if thread is me or not thread.is_alive():
                    conn.close()
                else:
                    keep.append((thread, conn))
            self._open = keep
        self._local.conn = None


def data_version(conn: sqlite3.Connection) -> int:
    """A number that changes whenever another connection commits to the database."""
    version: int = conn.execute("PRAGMA data_version").fetchall()[0][0]
    return version


class ChangeWaiter:
    """Waits, in real time, until another connection commits, a clock time comes, or time's up.

    Create it *before* the first query whose result it guards, so a commit landing between
    that query and the first wait is still noticed. The deadline is real (monotonic) time;
    ``due`` times are read from the injected ``clock``, so a test clock that is advanced
    from another thread releases the waiter too.
    """

    def __init__(self, conn: sqlite3.Connection, timeout: float | None, *,
                 clock: Callable[[], float], wake: threading.Event | None = None) -> None:
        self._conn = conn
        self._clock = clock
        self._wake = wake
        self._deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        self._version = data_version(conn)
        self._step = MIN_STEP

    def wait(self, due: float | None = None) -> bool:
        """True when it is worth querying again; False on timeout or when woken.

        ``wake`` (if given) is an event another thread sets to end the wait early; it is
        cleared here, so a wake that arrives before the wait starts is not lost.
        """
        while True:
            pause = self._step
            if self._deadline is not None:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    return False
                pause = min(pause, remaining)
            if self._wake is not None:
                if self._wake.wait(pause):
                    self._wake.clear()
                    return False
            else:
                time.sleep(pause)
            self._step = min(self._step * 2, MAX_STEP)
            version = data_version(self._conn)
            if version != self._version:
                self._version = version
                self._step = min(self._step, BUSY_STEP)
                return True
            if due is not None and self._clock() >= due:
                return True
