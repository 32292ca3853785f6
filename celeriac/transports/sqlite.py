"""``sqlite:///path``: the embedded broker, one SQLite file shared by the processes of a host.

A message is a row. Fetching leases rows to a consumer in one ``BEGIN IMMEDIATE``
transaction (owner + expiry); acking deletes them; an expired lease makes the row fetchable
again. Broadcasts are rows every subscription reads past its own cursor, replies are rows
taken by their reader; both are pruned as they age, so nothing grows without bound.

How rows are found quickly: a row nobody holds has ``lease_owner IS NULL`` and sits in a
partial index ordered the way ``fetch`` hands messages out. Leased rows, and delayed rows
(held by the empty owner ``''`` until ``visible_at``), sit in a second partial index by
expiry instead, and a fetch first releases the ones whose time has come. So a fetch costs
the same whether the queue holds ten messages or a million, leased, delayed or not.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..exceptions import TransportError
from ..protocol import Message, dumps, loads
from ..sqlite_util import (
    ChangeWaiter,
    ThreadConnections,
    check_location,
    path_from_url,
    translate_errors,
    write_transaction,
)
from .base import Capabilities, Clock, DeadLetter, Delivery, Subscription, Transport

__all__ = ["SQLiteTransport"]

_SCHEDULED = ""
"""The lease owner of a delayed message: nobody, until its ``visible_at``."""

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        visible_at REAL NOT NULL,
        lease_owner TEXT,
        lease_expires REAL,
        deliveries INTEGER NOT NULL DEFAULT 0,
        headers TEXT NOT NULL,
        properties TEXT NOT NULL,
        content_type TEXT NOT NULL,
        content_encoding TEXT NOT NULL,
        body BLOB NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, priority DESC, id)
        WHERE lease_owner IS NULL""",
    """CREATE INDEX IF NOT EXISTS messages_held ON messages (queue, lease_expires)
        WHERE lease_owner IS NOT NULL""",
    """CREATE INDEX IF NOT EXISTS messages_owner ON messages (lease_owner)
        WHERE lease_owner IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        headers TEXT NOT NULL,
        properties TEXT NOT NULL,
        content_type TEXT NOT NULL,
        content_encoding TEXT NOT NULL,
        body BLOB NOT NULL,
        reason TEXT NOT NULL,
        deliveries INTEGER NOT NULL,
        at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS dead_letters_queue ON dead_letters (queue, id)",
    """CREATE TABLE IF NOT EXISTS broadcasts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        channel TEXT NOT NULL,
        payload BLOB NOT NULL,
        at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS broadcasts_channel ON broadcasts (channel, id)",
    """CREATE TABLE IF NOT EXISTS replies (
        id INTEGER PRIMARY KEY,
        reply_to TEXT NOT NULL,
        payload BLOB NOT NULL,
        expires REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS replies_to ON replies (reply_to, id)",
    "CREATE INDEX IF NOT EXISTS replies_expires ON replies (expires)",
)

_INSERT = """INSERT INTO messages (queue, priority, visible_at, lease_owner, lease_expires,
    headers, properties, content_type, content_encoding, body)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""

_RELEASE_DUE = """UPDATE messages SET lease_owner = NULL, lease_expires = NULL
    WHERE queue = ? AND lease_owner IS NOT NULL AND lease_expires <= ?"""

_READY_ARM = """SELECT * FROM (SELECT id, priority FROM messages
    WHERE queue = ? AND lease_owner IS NULL ORDER BY priority DESC, id LIMIT ?)"""

_LEASE = """UPDATE messages SET lease_owner = ?, lease_expires = ?, deliveries = deliveries + 1
    WHERE id IN (SELECT id FROM ({arms}) ORDER BY priority DESC, id LIMIT ?)
    RETURNING id, queue, priority, deliveries, headers, properties, content_type,
              content_encoding, body"""

_HAS_READY = "SELECT EXISTS (SELECT 1 FROM messages WHERE queue = ? AND lease_owner IS NULL)"

_NEXT_DUE = "SELECT min(lease_expires) FROM messages WHERE queue = ? AND lease_owner IS NOT NULL"

_IDS = "SELECT value FROM json_each(?)"
# A tag is "<row id>.<delivery count>": settling matches both, so a delivery whose lease ran
# out (and that another consumer has fetched since) can never be acked or requeued by us.
_MINE = f"id IN ({_IDS}) AND (id || '.' || deliveries) IN ({_IDS})"

_UNHELD = "lease_owner IS NULL"
_HELD_BUT_FREE = "lease_owner IS NOT NULL AND (lease_owner = '' OR lease_expires <= ?)"


def _to_json(value: Any) -> str:
    return dumps(dict(value))[0].decode("utf-8")


def _from_json(text: str) -> dict[str, Any]:
    if "__type__" in text:  # a wrapped datetime, bytes ...: let the protocol revive it
        revived: dict[str, Any] = loads(text, "application/json", ("json",))
        return revived
    plain: dict[str, Any] = json.loads(text)
    return plain


def _message(headers: str, properties: str, content_type: str, content_encoding: str,
             body: bytes) -> Message:
    return Message(body=bytes(body), headers=_from_json(headers), content_type=content_type,
                   content_encoding=content_encoding, properties=_from_json(properties))


def _tag_params(tags: Sequence[str]) -> tuple[str, str]:
    try:
        ids = [int(tag.partition(".")[0]) for tag in tags]
        exact = [f"{id_}.{int(tag.partition('.')[2])}" for id_, tag in zip(ids, tags, strict=True)]
    except ValueError as exc:
        raise TransportError(f"Not an SQLite delivery tag in {list(tags)!r}: {exc}") from exc
    return json.dumps(ids), json.dumps(exact)


class _SQLiteSubscription(Subscription):
    """Reads the broadcasts of one channel with ids above its cursor."""

    def __init__(self, channel: str, transport: SQLiteTransport, cursor: int) -> None:
        super().__init__(channel)
        self._transport = transport
        self._cursor = cursor

    def get(self, timeout: float) -> list[bytes]:
        if self.closed:
            return []
        transport = self._transport
        with transport._errors():
            conn = transport._conn()
            waiter = None
            while True:
                if waiter is None and timeout > 0:
                    waiter = ChangeWaiter(conn, timeout, clock=transport.clock)
                rows = conn.execute(
                    "SELECT id, payload FROM broadcasts WHERE channel = ? AND id > ? "
                    "ORDER BY id", (self.channel, self._cursor)).fetchall()
                if rows:
                    self._cursor = rows[-1][0]
                    return [bytes(payload) for _, payload in rows]
                if waiter is None or not waiter.wait():
                    return []


class SQLiteTransport(Transport):
    """The SQLite broker: leases, priorities, delays, dead letters, broadcast and replies."""

    capabilities = Capabilities(cross_process=True, persistent=True)
    broadcast_retention = 60.0
    """Seconds a broadcast row is kept: a subscription that reads less often misses some."""

    def __init__(self, url: str, *, clock: Clock, lease_seconds: float = 60.0,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(url, clock=clock, lease_seconds=lease_seconds, options=options)
        self.path = path_from_url(url, "broker")
        check_location(self.path, "broker database", TransportError)
        self._connections = ThreadConnections(self.path, _SCHEMA)
        self._wakeup = threading.Event()
        with self._errors():
            self._connections.get()

    # -- plumbing -----------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        return self._connections.get()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        with translate_errors(self.path, "broker", TransportError):
            yield

    # -- producing ----------------------------------------------------------------------------
    def _row(self, queue: str, message: Message, priority: int, now: float,
             delay: float) -> tuple[Any, ...]:
        visible_at = now + delay if delay > 0 else now
        owner, expires = (_SCHEDULED, visible_at) if delay > 0 else (None, None)
        return (queue, int(priority or 0), visible_at, owner, expires,
                _to_json(message.headers), _to_json(message.properties), message.content_type,
                message.content_encoding, message.body)

    def publish(self, queue: str, message: Message, *, priority: int = 0,
                delay: float = 0.0) -> None:
        row = self._row(queue, message, priority, self.clock(), delay)
        with self._errors():
            self._conn().execute(_INSERT, row)

    def publish_many(self, items: Sequence[tuple[str, Message, int]]) -> None:
        now = self.clock()
        rows = [self._row(queue, message, priority, now, 0.0)
                for queue, message, priority in items]
        if not rows:
            return
        with self._errors():
            conn = self._conn()
            with write_transaction(conn):
                conn.executemany(_INSERT, rows)

    # -- consuming ----------------------------------------------------------------------------
    def fetch(self, consumer: str, queues: Sequence[str], limit: int,
              timeout: float) -> list[Delivery]:
        if not consumer:
            raise ValueError("fetch() needs a non-empty consumer name")
        queues = list(dict.fromkeys(queues))
        if limit <= 0 or not queues:
            return []
        with self._errors():
            conn = self._conn()
            waiter = (ChangeWaiter(conn, timeout, clock=self.clock, wake=self._wakeup)
                      if timeout > 0 else None)
            while True:
                ready, due = self._peek(conn, queues)
                now = self.clock()
                if ready or (due is not None and due <= now):
                    got = self._lease(conn, consumer, queues, limit, now)
                    if got:
                        return got
                    continue  # another consumer was quicker: look again before waiting
                if waiter is None or not waiter.wait(due):
                    return []

    def _peek(self, conn: sqlite3.Connection, queues: Sequence[str]) -> tuple[bool, float | None]:
        """Whether some row is ready now, and the earliest time a held row frees up.

        Read-only, so idle consumers never queue up for the write lock.
        """
        ready = False
        due: float | None = None
        for queue in queues:
            if not ready and conn.execute(_HAS_READY, (queue,)).fetchall()[0][0]:
                ready = True
            expires = conn.execute(_NEXT_DUE, (queue,)).fetchall()[0][0]
            if expires is not None and (due is None or expires < due):
                due = expires
        return ready, due

    def _lease(self, conn: sqlite3.Connection, consumer: str, queues: Sequence[str],
               limit: int, now: float) -> list[Delivery]:
        sql = _LEASE.format(arms=" UNION ALL ".join([_READY_ARM] * len(queues)))
        params: list[Any] = [consumer, now + self.lease_seconds]
        for queue in queues:
            params += [queue, limit]
        params.append(limit)
        with write_transaction(conn):
            for queue in queues:
                conn.execute(_RELEASE_DUE, (queue, now))
            rows = conn.execute(sql, params).fetchall()
        rows.sort(key=lambda r: (-r[2], r[0]))
        return [Delivery(f"{id_}.{deliveries}", queue, _message(*rest), deliveries, priority)
                for id_, queue, priority, deliveries, *rest in rows]

    def ack(self, tags: Sequence[str]) -> None:
        if not tags:
            return
        with self._errors():
            self._conn().execute(f"DELETE FROM messages WHERE {_MINE}", _tag_params(tags))

    def requeue(self, tags: Sequence[str]) -> None:
        if not tags:
            return
        with self._errors():
            self._conn().execute(
                "UPDATE messages SET lease_owner = NULL, lease_expires = NULL "
                f"WHERE {_MINE} AND lease_owner IS NOT NULL", _tag_params(tags))

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        message = delivery.message
        row = (delivery.queue, _to_json(message.headers), _to_json(message.properties),
               message.content_type, message.content_encoding, message.body, reason,
               delivery.deliveries, self.clock())
        with self._errors():
            conn = self._conn()
            with write_transaction(conn):
                params = _tag_params([delivery.tag])
                deleted = conn.execute(f"DELETE FROM messages WHERE {_MINE}", params).rowcount
                if not deleted and conn.execute(
                        f"SELECT 1 FROM messages WHERE id IN ({_IDS})", params[:1]).fetchall():
                    return  # a stale tag: the message is another consumer's delivery now
                conn.execute(
                    "INSERT INTO dead_letters (queue, headers, properties, content_type, "
                    "content_encoding, body, reason, deliveries, at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def renew(self, consumer: str) -> int:
        if not consumer:
            return 0
        with self._errors():
            cur = self._conn().execute(
                "UPDATE messages SET lease_expires = ? WHERE lease_owner = ?",
                (self.clock() + self.lease_seconds, consumer))
            return cur.rowcount

    def wake(self) -> None:
        """End the wait of a ``fetch`` in another thread; if none is waiting, the next one's."""
        self._wakeup.set()

    # -- queues -------------------------------------------------------------------------------
    def queue_size(self, queue: str) -> int:
        with self._errors():
            row = self._conn().execute(
                f"SELECT (SELECT count(*) FROM messages WHERE queue = ? AND {_UNHELD}),"
                f" (SELECT count(*) FROM messages WHERE queue = ? AND {_HELD_BUT_FREE})",
                (queue, queue, self.clock())).fetchall()[0]
            return int(row[0]) + int(row[1])

    def purge(self, queue: str) -> int:
        with self._errors():
            conn = self._conn()
            with write_transaction(conn):
                free = conn.execute(f"DELETE FROM messages WHERE queue = ? AND {_UNHELD}",
                                    (queue,)).rowcount
                free += conn.execute(f"DELETE FROM messages WHERE queue = ? AND {_HELD_BUT_FREE}",
                                     (queue, self.clock())).rowcount
            return free

    def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        sql = ("SELECT queue, headers, properties, content_type, content_encoding, body, "
               "reason, deliveries, at FROM dead_letters")
        with self._errors():
            if queue is None:
                rows = self._conn().execute(sql + " ORDER BY id").fetchall()
            else:
                rows = self._conn().execute(sql + " WHERE queue = ? ORDER BY id",
                                            (queue,)).fetchall()
        return [DeadLetter(q, _message(h, p, ct, ce, body), reason, deliveries, at)
                for q, h, p, ct, ce, body, reason, deliveries, at in rows]

    # -- broadcast and replies ----------------------------------------------------------------
    def broadcast(self, channel: str, payload: bytes) -> None:
        now = self.clock()
        with self._errors():
            conn = self._conn()
            with write_transaction(conn):
                conn.execute("DELETE FROM broadcasts WHERE at < ?",
                             (now - self.broadcast_retention,))
                conn.execute("INSERT INTO broadcasts (channel, payload, at) VALUES (?, ?, ?)",
                             (channel, bytes(payload), now))

    def subscribe(self, channel: str) -> Subscription:
        with self._errors():
            # AUTOINCREMENT never reuses an id, so every later broadcast has a larger one.
            cursor = self._conn().execute(
                "SELECT coalesce(max(id), 0) FROM broadcasts").fetchall()[0][0]
        return _SQLiteSubscription(channel, self, int(cursor))

    def reply(self, reply_to: str, payload: bytes, ttl: float = 300.0) -> None:
        now = self.clock()
        with self._errors():
            conn = self._conn()
            with write_transaction(conn):
                conn.execute("DELETE FROM replies WHERE expires <= ?", (now,))
                conn.execute("INSERT INTO replies (reply_to, payload, expires) VALUES (?, ?, ?)",
                             (reply_to, bytes(payload), now + ttl))

    def get_replies(self, reply_to: str, timeout: float) -> list[bytes]:
        with self._errors():
            conn = self._conn()
            waiter = ChangeWaiter(conn, timeout, clock=self.clock) if timeout > 0 else None
            while True:
                due = self._take_replies(conn, reply_to)
                if due:
                    return due
                if waiter is None or not waiter.wait():
                    return []

    def _take_replies(self, conn: sqlite3.Connection, reply_to: str) -> list[bytes]:
        """Delete and return the live replies for ``reply_to``; drop its expired ones."""
        if not conn.execute("SELECT EXISTS (SELECT 1 FROM replies WHERE reply_to = ?)",
                            (reply_to,)).fetchall()[0][0]:
            return []
        rows = conn.execute("DELETE FROM replies WHERE reply_to = ? RETURNING id, payload, expires",
                            (reply_to,)).fetchall()
        now = self.clock()
        return [bytes(payload) for _, payload, expires in sorted(rows) if expires > now]

    # -- lifecycle ----------------------------------------------------------------------------
    def after_fork(self) -> None:
        self._connections.after_fork()
        self._wakeup = threading.Event()

    def close(self) -> None:
        self._connections.close()

    def describe(self) -> dict[str, Any]:
        return {"transport": "sqlite", "hostname": "localhost", "path": self.path}
