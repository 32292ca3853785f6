"""``redis://`` (also ``rediss://``, ``redis+socket://``): Redis Streams with one consumer group.

A queue is a stream per priority band, read through the consumer group ``celeriac``; key
names, the band mapping and every Lua script are in :mod:`celeriac.transports.redis_keys`.

* ``publish`` is one ``XADD`` (a delayed message is one ``ZADD`` into the queue's
  ``delayed`` set instead); ``publish_many`` pipelines them in one round trip.
* ``fetch`` runs one script that moves due delayed messages into their streams, takes over
  entries whose lease has ended (``XCLAIM``, which counts the delivery) and reads new ones
  (``XREADGROUP``), highest band first, recording each lease's end on the transport's clock.
  With nothing to hand out it waits on a plain ``XREAD BLOCK`` in slices of at most 100 ms,
  which ``wake()`` ends at once with ``CLIENT UNBLOCK`` (or within a slice, where the ACL
  forbids that).
* A tag is ``"<band>:<entry id>:<delivery count>:<queue>"``; settling checks the entry is
  still pending with that count, so a delivery whose lease ran out and went to another
  consumer is never settled by the old tag. ``ack`` is ``XACK`` + ``XDEL``.
* ``renew`` re-dates the leases of the deliveries this process handed to the consumer and
  it has not settled (still pending with the same count), one script per queue, pipelined.

Connection options come from the URL query (``?key_prefix=...&db=...``, TLS ``ssl_*``) and
``broker_transport_options`` (``key_prefix``, ``connection_timeout``, ``connection_retry``,
``connection_max_retries``, ``socket_timeout``, ``retries``, ``dead_letter_limit``).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..exceptions import DecodeError, TransportError
from ..protocol import Message
from . import redis_keys as K
from .base import (
    BulkWriter,
    Capabilities,
    Clock,
    DeadLetter,
    Delivery,
    PendingFetch,
    Subscription,
    Transport,
)
from .redis_conn import (
    RawCalls,
    connect_with_retry,
    packed,
    read_replies,
    redis_params,
    require_redis,
)

try:
    import redis
    from redis.exceptions import NoPermissionError, NoScriptError, RedisError
except ImportError:  # pragma: no cover - exercised only without the extra installed
    redis = None  # type: ignore[assignment]

__all__ = ["RedisTransport", "close_quietly"]

log = logging.getLogger("celeriac.redis")

_SLICE = 0.1
"""Longest single blocking read while a fetch waits (seconds); the fetch script runs after
each, so other producers' delayed messages and ended leases are noticed within one."""
_JANITOR_EVERY = 300.0
_PUBLISH_CHUNK = 1000
"""Messages per script call in ``publish_many`` (the server is busy for a few ms each)."""
_IDLE_CONNECTIONS = 32
"""Connections of our own kept open between hot-path calls (see ``RawCalls``)."""
# -- the pieces of the transport -----------------------------------------------------------------
Call = tuple[K.Script, Sequence[str], Sequence[Any]]


class _Waiter:
    """One thread's own connection for blocking reads, which ``wake()`` may interrupt."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.client_id: int | None = None
        self.interruptible = True
        self._watching = False

    def on_connect(self, connection: Any) -> None:
        self.client_id = None  # a new connection has a new id

    def prepare(self) -> None:
        """Learn this connection's id (again, after a reconnect) so wake() can name it."""
        if not self._watching and self.client.connection is not None:
            self.client.connection.register_connect_callback(self.on_connect)
            self._watching = True
        if self.client_id is None and self.interruptible:
            try:
                self.client_id = int(self.client.client_id())
            except NoPermissionError:  # the ACL says no: waits end within a slice instead
                self.interruptible = False

    def block_then_fetch(self, streams: Mapping[str, str], seconds: float, call: Call) -> Any:
        """``XREAD BLOCK`` for an entry after the given ids, then the fetch script, pipelined:
        the server runs the script the moment the read ends, all in one round trip."""
        script, keys, args = call
        conn = self.client.connection
        if conn is None:
            raise redis.ConnectionError("the waiting connection was closed")
        commands = [("XREAD", "COUNT", 1, "BLOCK", max(1, int(seconds * 1000)), "STREAMS",
                     *streams, *streams.values()),
                    ("EVALSHA", script.sha, len(keys), *keys, *args)]
        try:
            conn.send_packed_command(packed(conn, commands))
            replies = read_replies(conn, len(commands))
        except (redis.ConnectionError, redis.TimeoutError):
            conn.disconnect()
            raise
        if isinstance(replies[1], NoScriptError):  # a restarted server forgot it
            self.client.execute_command("SCRIPT", "LOAD", script.source)
            return self.client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        if isinstance(replies[1], Exception):
            raise replies[1]
        return replies[1]


class _RedisSubscription(Subscription):
    """A pub/sub connection subscribed to one channel."""

    def __init__(self, channel: str, pubsub: Any,
                 failure: Callable[[Exception, str], TransportError]) -> None:
        super().__init__(channel)
        self._pubsub = pubsub
        self._failure = failure

    def get(self, timeout: float) -> list[bytes]:
        if self.closed:
            return []
        deadline = time.monotonic() + max(timeout, 0.0)
        out: list[bytes] = []
        while True:
            # Once one arrived, a moment's grace for the rest of a burst, then no waiting.
            wait = (0.001 if len(out) == 1 else 0.0) if out else max(
                0.0, deadline - time.monotonic())
            try:
                msg = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            except RedisError as exc:  # the next call reconnects and subscribes again
                raise self._failure(exc, f"receive broadcasts on {self.channel!r}") from exc
            if msg is not None and msg.get("type") == "message":
                out.append(bytes(msg["data"]))
                continue
            if out or time.monotonic() >= deadline:
                return out

    def close(self) -> None:
        if not self.closed:
            super().close()
            try:
                self._pubsub.close()
            except RedisError:
                pass


def close_quietly(*closeables: Any) -> None:
    """Close clients (and lists of waiters or connections); used by finalizers, so it never
    raises."""
    for item in closeables:
        for one in item if isinstance(item, list) else [item]:
            try:
                if isinstance(one, _Waiter):
                    one.client.close()
                elif hasattr(one, "close"):
                    one.close()
                else:  # a bare connection
                    one.disconnect()
            except Exception:  # best effort: the owner is going away
                pass


def _message(raw: bytes) -> Message:
    try:
        return Message.from_envelope(raw)
    except DecodeError:  # not an envelope of ours: the worker dead-letters it
        return Message(body=bytes(raw), headers={}, content_type="application/octet-stream",
                       content_encoding="binary")


def _parse_tag(tag: str) -> tuple[str, str, str, str]:
    parts = K.parse_tag(tag)
    if parts is None:
        raise TransportError(f"Not a Redis delivery tag: {tag!r}")
    return parts


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _commands(calls: Sequence[Call]) -> list[tuple[Any, ...]]:
    return [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args in calls]


class _StreamedBulk(BulkWriter):
    """A bulk send's script calls written as each step comes, replies read at ``finish``:
    Redis adds the first chunks while the sender builds the next."""

    def __init__(self, transport: RedisTransport) -> None:
        super().__init__(transport)
        self.redis = transport
        self.stream = transport._raw.stream()
        self.calls: list[Call] = []
        self.count = 0

    def many(self, items: Sequence[tuple[str, Message, int]]) -> None:
        if items:
            self._write(self.redis._many_calls(items), len(items))

    def copies(self, queue: str, message: Message, priority: int, ids: Sequence[str]) -> None:
        calls = self.redis._copies_calls(queue, message, priority, ids)
        if calls is None:
            self.many([(queue, message.with_id(task_id), priority) for task_id in ids])
        else:
            self._write(calls, len(ids))

    def _write(self, calls: list[Call], count: int) -> None:
        self.calls += calls
        self.count += count
        self.stream.write(_commands(calls))

    def finish(self) -> None:
        try:
            self.redis._checked(self.calls, self.stream.replies())
        except RedisError as exc:
            raise self.redis._failure(exc, f"publish {self.count} messages") from exc


class _PendingFetch(PendingFetch):
    """A :meth:`RedisTransport.fetch_soon` whose replies are still on their connection."""

    def __init__(self, transport: RedisTransport, conn: Any, count: int, consumer: str,
                 queues: list[str], limit: int, backlog: list[str], tags: list[str]) -> None:
        self.transport, self.conn, self.count = transport, conn, count
        self.consumer, self.queues, self.limit = consumer, queues, limit
        self.backlog, self.tags = backlog, tags

    def fileno(self) -> int:
        return int(self.conn._sock.fileno())

    def finish(self) -> list[Delivery] | None:
        t = self.transport
        replies = t._raw.read_back(self.conn, self.count)
        if replies is None or isinstance(replies[-1], Exception):  # (nothing fetched)
            t._not_fetched(self.consumer, self.backlog)
            return None
        deliveries = t._deliveries(self.consumer, self.queues, replies[-1][0])
        if any(isinstance(reply, Exception) for reply in replies[:-1]):
            # An ack was refused (a restarted server forgot the script) while the fetch
            # leased its messages: they are handed out all the same (dropped, they would
            # wait out their lease), and every ack waits for the next fetch, which goes
            # to the I/O thread (it loads a forgotten script again).
            t._not_fetched(self.consumer, self.tags)
            return deliveries
        t._settled(self.tags)
        return t._fetched(self.consumer, self.limit, deliveries)

    def abandon(self) -> None:
        self.conn.disconnect()
        self.transport._not_fetched(self.consumer, self.backlog)


class RedisTransport(Transport):
    """Redis Streams broker: leases, priority bands, delays, dead letters, pub/sub, replies."""

    capabilities = Capabilities(cross_process=True, persistent=True)
    dead_letter_limit = 100_000
    """Dead letters kept per queue (approximately: ``XADD MAXLEN ~``)."""

    def __init__(self, url: str, *, clock: Clock, lease_seconds: float = 60.0,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(url, clock=clock, lease_seconds=lease_seconds, options=options)
        require_redis("broker")
        self.params = redis_params(url, self.options)
        self.keys = K.KeySpace(self.params.key_prefix)
        self.dead_letter_limit = int(self.options.get("dead_letter_limit",
                                                      self.dead_letter_limit))
        self._fresh_state()
        connect_with_retry(self.params, "broker")

    def _fresh_state(self) -> None:
        """Connections and per-process bookkeeping; called again in a forked child."""
        self._client = self.params.client()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._waiters: list[_Waiter] = []
        self._raw = RawCalls(self._client, _IDLE_CONNECTIONS)  # the hot paths' connections
        # Closes our sockets when the transport is dropped unclosed, before a reference
        # cycle (app <-> backend) could finalize the sockets first and warn about them.
        self._closer = weakref.finalize(self, close_quietly, self._client, self._waiters,
                                        self._raw)
        self._blocked: set[_Waiter] = set()
        self._wakeup = threading.Event()
        # The unsettled deliveries this process handed to each consumer: what renew extends.
        # (Not the consumer's whole PEL: an entry whose fetch reply was lost in a dropped
        # connection must run out of lease and go to someone, not be kept alive unseen.)
        self._held: dict[str, dict[str, None]] = {}
        self._holder: dict[str, str] = {}
        self._ack_backlog: list[str] = []
        self._full: dict[str, bool] = {}  # consumer -> its last fetch filled its limit
        self._janitor_due = time.monotonic() + 60.0

    # -- plumbing ---------------------------------------------------------------------------------
    def _failure(self, exc: Exception, doing: str) -> TransportError:
        return TransportError(f"Redis broker {self.params.masked}: could not {doing}: "
                              f"{type(exc).__name__}: {self.params.scrub(exc)}")

    def _eval(self, script: K.Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._eval_many([(script, keys, args)])[0]

    def _eval_many(self, calls: Sequence[Call]) -> list[Any]:
        """Run scripts in one round trip; results in order."""
        return self._checked(calls, self._raw.run(_commands(calls)))

    def _checked(self, calls: Sequence[Call], replies: list[Any]) -> list[Any]:
        """``replies`` to ``calls``, with a script a restarted server forgot run again; an
        error reply raises."""
        for i, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):  # a restarted server forgot it
                script, keys, args = calls[i]
                self._raw.one("SCRIPT", "LOAD", script.source)
                replies[i] = self._raw.one("EVALSHA", script.sha, len(keys), *keys, *args)
            elif isinstance(reply, Exception):
                raise reply
        return replies

    def _settle_calls(self, script: K.Script, tags: Iterable[str],
                      head: Sequence[Any]) -> tuple[list[Call], list[list[str]]]:
        """One script call per queue, and the tags each call covers (in argument order)."""
        by_queue: dict[str, tuple[list[str], list[str]]] = {}
        for tag in tags:
            band, id_, count, queue = _parse_tag(tag)
            args, covered = by_queue.setdefault(queue, ([], []))
            args.extend((band, id_, count))
            covered.append(tag)
        return ([(script, self.keys.queue(queue).all, [*head, *args])
                 for queue, (args, _) in by_queue.items()],
                [covered for _, covered in by_queue.values()])

    # -- producing --------------------------------------------------------------------------------
    def publish(self, queue: str, message: Message, *, priority: int = 0,
                delay: float = 0.0) -> None:
        envelope = message.to_envelope()
        priority = min(max(int(priority or 0), 0), 9)
        keys = self.keys.queue(queue)
        try:
            if delay > 0:
                self._client.execute_command("ZADD", keys.delayed, repr(self.clock() + delay),
                                             K.delayed_member(priority, envelope))
            else:
                self._raw.one("XADD", keys.streams[K.band_of(priority)], "*",
                              "m", envelope, "p", priority, "t", time.time_ns())
        except RedisError as exc:
            raise self._failure(exc, f"publish to queue {queue!r}") from exc

    def publish_many(self, items: Sequence[tuple[str, Message, int]]) -> None:
        """One script call per stream and chunk (``_PUBLISH_CHUNK``), all in one round
        trip: the server adds the entries in a loop instead of answering each XADD."""
        if not items:
            return
        try:
            self._eval_many(self._many_calls(items))
        except RedisError as exc:
            raise self._failure(exc, f"publish {len(items)} messages") from exc

    def publish_copies(self, queue: str, message: Message, priority: int,
                       ids: Sequence[str]) -> None:
        """The server makes the copies: the envelope goes once per chunk of ids, cut where
        the template's id appears (ids of one length only; anything else as publish_many)."""
        calls = self._copies_calls(queue, message, priority, ids)
        if calls is None:
            super().publish_copies(queue, message, priority, ids)
            return
        try:
            self._eval_many(calls)
        except RedisError as exc:
            raise self._failure(exc, f"publish {len(ids)} messages") from exc

    def bulk_writer(self) -> BulkWriter:
        return _StreamedBulk(self)

    def _many_calls(self, items: Sequence[tuple[str, Message, int]]) -> list[Call]:
        ns = time.time_ns()
        streams: dict[tuple[str, int], list[Any]] = {}
        for i, (queue, message, priority) in enumerate(items):
            priority = min(max(int(priority or 0), 0), 9)
            args = streams.get((queue, priority))
            if args is None:
                args = streams[(queue, priority)] = []
            args += (ns + i, message.to_envelope())
        calls: list[Call] = []
        for (queue, priority), args in streams.items():
            stream = self.keys.queue(queue).streams[K.band_of(priority)]
            for start in range(0, len(args), 2 * _PUBLISH_CHUNK):
                calls.append((K.PUBLISH_MANY, [stream],
                              [priority, *args[start:start + 2 * _PUBLISH_CHUNK]]))
        return calls

    def _copies_calls(self, queue: str, message: Message, priority: int,
                      ids: Sequence[str]) -> list[Call] | None:
        """The copy script's calls, or None if these ids cannot be copied on the server."""
        old = str(message.headers.get("id") or "")
        width = len(old)
        if not ids or not width or any(len(task_id) != width for task_id in ids):
            return None
        parts = message.to_envelope().split(old.encode())
        priority = min(max(int(priority or 0), 0), 9)
        stream = self.keys.queue(queue).streams[K.band_of(priority)]
        us = time.time_ns() // 1000
        chunk = min(_PUBLISH_CHUNK, 1000)  # (the script numbers the ids of a call in 3 digits)
        return [(K.PUBLISH_COPIES, [stream],
                 [priority, us + k, width, "".join(ids[start:start + chunk]), *parts])
                for k, start in enumerate(range(0, len(ids), chunk))]

    # -- consuming --------------------------------------------------------------------------------
    def fetch(self, consumer: str, queues: Sequence[str], limit: int,
              timeout: float) -> list[Delivery]:
        if not consumer:
            raise ValueError("fetch() needs a non-empty consumer name")
        queues = list(dict.fromkeys(queues))
        if limit <= 0 or not queues:
            return []
        streams = [key for queue in queues for key in self.keys.queue(queue).streams]
        deadline = time.monotonic() + timeout
        try:
            self._janitor(queues)
            reply = self._fetch_after_backlog(self._fetch_call(consumer, queues, limit, timeout))
            while not reply[0] and timeout > 0:
                seconds = self._pause(deadline, reply[1])
                if seconds is None:
                    return self._fetched(consumer, limit, [])
                reply = self._wait_and_fetch(dict(zip(streams, map(_text, reply[2]), strict=True)),
                                             seconds,
                                             self._fetch_call(consumer, queues, limit, timeout))
                if reply is None:
                    return self._fetched(consumer, limit, [])
            return self._fetched(consumer, limit, self._deliveries(consumer, queues, reply[0]))
        except RedisError as exc:
            raise self._failure(exc, f"fetch from {queues}") from exc

    def _fetch_call(self, consumer: str, queues: Sequence[str], limit: int,
                    timeout: float) -> Call:
        keys = [key for queue in queues for key in self.keys.queue(queue).all]
        now = self.clock()
        return (K.FETCH, keys, [K.GROUP, consumer, limit, repr(now),
                                repr(now + self.lease_seconds), "1" if timeout > 0 else "0"])

    def _fetched(self, consumer: str, limit: int, deliveries: list[Delivery]) -> list[Delivery]:
        """``deliveries``, noting whether they filled the limit (then more probably wait)."""
        self._full[consumer] = len(deliveries) >= limit
        return deliveries

    def fetch_soon(self, acks: Sequence[str], consumer: str, queues: Sequence[str],
                   limit: int) -> _PendingFetch | None:
        """While fetches come back full, the next one (acks first, no waiting for messages)
        is sent at once on a connection that is open already, and the worker's event loop
        reads its reply: a loopback round trip the loop waits for costs less than the hop to
        the I/O thread and back, and the loop goes on with other work meanwhile. None when
        the last fetch was not full (this one might have to wait), when the janitor is due
        (that may take longer) or when the send fails: the I/O thread then acks and fetches,
        with its retries."""
        if (not self._full.get(consumer) or limit <= 0 or not queues
                or time.monotonic() >= self._janitor_due):
            return None
        queues = list(dict.fromkeys(queues))
        with self._lock:
            backlog, self._ack_backlog = self._ack_backlog, []
        tags = [*backlog, *acks]
        calls = [*self._settle_calls(K.ACK, tags, [K.GROUP])[0]] if tags else []
        calls.append(self._fetch_call(consumer, queues, limit, 0.0))
        conn = self._raw.send_only(_commands(calls))
        if conn is None:
            self._not_fetched(consumer, backlog)
            return None
        return _PendingFetch(self, conn, len(calls), consumer, queues, limit, backlog, tags)

    def _not_fetched(self, consumer: str, backlog: list[str]) -> None:
        """A fetch that went wrong: the acks that were waiting wait on (the caller still has
        its own), and the next fetch goes through the I/O thread."""
        self._ack_later(backlog)
        self._full[consumer] = False

    def ack_then_fetch(self, acks: Sequence[str], consumer: str, queues: Sequence[str],
                       limit: int, timeout: float) -> list[Delivery]:
        if not acks or limit <= 0 or not queues:  # (no fetch to ride along with)
            return super().ack_then_fetch(acks, consumer, queues, limit, timeout)
        with self._lock:  # acked in the fetch's own round trip (see _fetch_after_backlog)
            self._ack_backlog.extend(acks)
        return self.fetch(consumer, queues, limit, timeout)

    def _fetch_after_backlog(self, call: Call) -> Any:
        """The fetch script's reply, after the acks waiting in the backlog (one round trip)."""
        with self._lock:
            tags, self._ack_backlog = self._ack_backlog, []
        if not tags:
            return self._eval(*call)
        calls = [*self._settle_calls(K.ACK, tags, [K.GROUP])[0], call]
        try:
            replies = self._raw.run(_commands(calls))
            fetched = self._checked(calls[-1:], replies[-1:])[0]  # (an error: none leased)
        except RedisError:
            self._ack_later(tags)  # for the next call that reaches the server (see ack)
            raise
        try:
            self._checked(calls[:-1], replies[:-1])
        except RedisError as exc:
            # An ack refused while the fetch leased its messages: they are handed out all
            # the same (dropped, they would wait out their lease); the acks wait on.
            self._ack_later(tags)
            log.warning("Redis broker %s refused %d ack(s) (%s); they will be tried again",
                        self.params.masked, len(tags), self.params.scrub(exc))
            return fetched
        self._settled(tags)
        return fetched

    def _ack_later(self, tags: list[str]) -> None:
        """``tags`` go back to the front of the acks that ride with the next call."""
        with self._lock:
            self._ack_backlog[:0] = tags

    def _deliveries(self, consumer: str, queues: Sequence[str],
                    rows: list[Any]) -> list[Delivery]:
        out = []
        for qi, band, id_, count, envelope, priority, ordinal in rows:
            entry_id = _text(id_)
            queue = queues[int(qi) - 1]
            out.append((-int(priority), int(entry_id.partition("-")[0]), int(ordinal), Delivery(
                K.make_tag(band, entry_id, count, queue), queue, _message(envelope), int(count),
                int(priority))))
        out.sort(key=lambda row: row[:3])
        with self._lock:
            held = self._held.setdefault(consumer, {})
            for row in out:
                held[row[3].tag] = None
                self._holder[row[3].tag] = consumer
        return [row[3] for row in out]

    def _settled(self, tags: Iterable[str]) -> None:
        with self._lock:
            for tag in tags:
                consumer = self._holder.pop(tag, None)
                if consumer is not None:
                    self._held[consumer].pop(tag, None)

    def _waiter(self) -> _Waiter:
        waiter: _Waiter | None = getattr(self._local, "waiter", None)
        if waiter is None:
            waiter = self._local.waiter = _Waiter(self.params.client(single=True))
            with self._lock:
                self._waiters.append(waiter)
        return waiter

    def _pause(self, deadline: float, next_due: Any) -> float | None:
        """How long the next blocking read may last; None when the fetch should end now."""
        if self._wakeup.is_set():
            self._wakeup.clear()
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        seconds = min(left, _SLICE)
        if next_due:  # a delayed message or a lease comes due (on our clock) before that
            seconds = min(seconds, float(next_due) - self.clock())
        return max(seconds, 0.001)

    def _wait_and_fetch(self, streams: Mapping[str, str], seconds: float, call: Call) -> Any:
        """Block for news on ``streams``, then fetch; None if wake() came first."""
        waiter = self._waiter()
        waiter.prepare()
        self._blocked.add(waiter)
        try:
            if self._wakeup.is_set():
                self._wakeup.clear()
                return None
            return waiter.block_then_fetch(streams, seconds, call)
        finally:
            self._blocked.discard(waiter)

    def wake(self) -> None:
        """End the wait of a ``fetch`` in another thread; if none is waiting, the next one's.

        A wake that races the very start of a blocking read (the server sees the unblock
        first) ends that read only when its slice does, within 100 ms.
        """
        self._wakeup.set()
        for waiter in list(self._blocked):
            client_id = waiter.client_id
            if client_id is None or not waiter.interruptible:
                continue
            try:
                self._client.client_unblock(client_id)
            except NoPermissionError:
                waiter.interruptible = False  # the ACL says no: waits end within a slice
            except RedisError:
                pass

    def _janitor(self, queues: Sequence[str]) -> None:
        """Now and then, forget consumers (stopped workers) that hold nothing any more."""
        if time.monotonic() < self._janitor_due:
            return
        self._janitor_due = time.monotonic() + _JANITOR_EVERY
        idle_ms = int(max(3600.0, 10 * self.lease_seconds) * 1000)
        try:
            self._eval_many([(K.JANITOR, self.keys.queue(q).all, [K.GROUP, idle_ms])
                             for q in queues])
        except RedisError as exc:
            log.debug("Could not tidy the consumers of %s: %s", queues, exc)

    def ack(self, tags: Sequence[str]) -> None:
        if not tags:
            return
        with self._lock:
            self._ack_backlog.extend(tags)
        try:
            self._flush_ack_backlog()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Kept: the entries stay ours (renew keeps their leases) and the next call that
            # reaches the server acks them, so nothing runs twice because of the outage.
            log.warning("Redis broker %s unreachable (%s); %d ack(s) will be retried",
                        self.params.masked, self.params.scrub(exc), len(self._ack_backlog))
        except RedisError as exc:
            raise self._failure(exc, "ack") from exc

    def _flush_ack_backlog(self) -> None:
        with self._lock:
            tags, self._ack_backlog = self._ack_backlog, []
        if not tags:
            return
        try:
            self._eval_many(self._settle_calls(K.ACK, tags, [K.GROUP])[0])
        except (redis.ConnectionError, redis.TimeoutError):
            self._ack_later(tags)
            raise
        self._settled(tags)

    def requeue(self, tags: Sequence[str]) -> None:
        if not tags:
            return
        try:
            self._eval_many(self._settle_calls(K.REQUEUE, tags, [K.GROUP,
                                                                 K.REQUEUED_CONSUMER])[0])
        except RedisError as exc:
            raise self._failure(exc, "requeue") from exc
        self._settled(tags)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        band, id_, count, queue = _parse_tag(delivery.tag)
        try:
            if self._eval(K.DEAD_LETTER, self.keys.queue(queue).all, [
                    K.GROUP, band, id_, count, delivery.queue, reason, repr(self.clock()),
                    delivery.message.to_envelope(), self.dead_letter_limit]):
                self._client.execute_command("SADD", self.keys.dead_queues, queue)
        except RedisError as exc:
            raise self._failure(exc, "dead-letter a message") from exc
        self._settled([delivery.tag])

    def renew(self, consumer: str) -> int:
        try:
            self._flush_ack_backlog()
            with self._lock:
                tags = list(self._held.get(consumer, ()))
            if not tags:
                return 0
            calls, covered = self._settle_calls(K.RENEW, tags, [K.GROUP, repr(
                self.clock() + self.lease_seconds)])
            results = self._eval_many(calls)
        except RedisError as exc:
            raise self._failure(exc, "renew leases") from exc
        gone = []
        for mine, kept in zip(covered, results, strict=True):
            numbers = set(kept)
            gone += [tag for i, tag in enumerate(mine, 1) if i not in numbers]
        self._settled(gone)  # taken over by another consumer: no longer ours to renew
        return len(tags) - len(gone)

    # -- queues -----------------------------------------------------------------------------------
    def queue_size(self, queue: str) -> int:
        try:
            return int(self._eval(K.QUEUE_SIZE, self.keys.queue(queue).all,
                                  [K.GROUP, repr(self.clock())]))
        except RedisError as exc:
            raise self._failure(exc, f"measure queue {queue!r}") from exc

    def purge(self, queue: str) -> int:
        total = 0
        try:
            for _ in range(100_000):  # chunks, so a huge queue never blocks Redis for long
                deleted, more = self._eval(K.PURGE, self.keys.queue(queue).all,
                                           [K.GROUP, repr(self.clock()), 1000])
                total += int(deleted)
                if not more:
                    break
        except RedisError as exc:
            raise self._failure(exc, f"purge queue {queue!r}") from exc
        return total

    def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        try:
            names = ([queue] if queue is not None else sorted(
                _text(m) for m in self._client.smembers(self.keys.dead_queues)))
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.xrange(self.keys.queue(name).dead)
            streams = pipe.execute()
        except RedisError as exc:
            raise self._failure(exc, "read dead letters") from exc
        found = []
        for entries in streams:
            for entry_id, raw in entries:
                fields = {_text(k): v for k, v in raw.items()}
                dead = DeadLetter(_text(fields.get("queue", b"")), _message(fields.get("m", b"")),
                                  _text(fields.get("reason", b"")),
                                  int(fields.get("deliveries", 0)), float(fields.get("at", 0.0)))
                ms, _, seq = _text(entry_id).partition("-")
                found.append((dead.at, int(ms), int(seq), dead))
        found.sort(key=lambda row: row[:3])
        return [row[3] for row in found]

    # -- broadcast and replies --------------------------------------------------------------------
    def broadcast(self, channel: str, payload: bytes) -> None:
        try:
            self._client.publish(self.keys.broadcast(channel), bytes(payload))
        except RedisError as exc:
            raise self._failure(exc, f"broadcast on {channel!r}") from exc

    def subscribe(self, channel: str) -> Subscription:
        key = self.keys.broadcast(channel)
        pubsub = self._client.pubsub()
        try:
            pubsub.subscribe(key)
            # Wait for the confirmation, so broadcasts sent after we return are received.
            deadline = time.monotonic() + max(self.params.connection_timeout, 5.0)
            while time.monotonic() < deadline:
                msg = pubsub.get_message(timeout=deadline - time.monotonic())
                if msg is not None and msg.get("type") == "subscribe":
                    return _RedisSubscription(channel, pubsub, self._failure)
            raise redis.TimeoutError("no confirmation of SUBSCRIBE")
        except RedisError as exc:
            pubsub.close()
            raise self._failure(exc, f"subscribe to {channel!r}") from exc

    def reply(self, reply_to: str, payload: bytes, ttl: float = 300.0) -> None:
        key = self.keys.reply(reply_to)
        item = K.reply_item(self.clock() + ttl, bytes(payload))
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.rpush(key, item)
            pipe.pexpire(key, max(1, int(ttl * 1000)))
            pipe.execute()
        except RedisError as exc:
            raise self._failure(exc, f"reply to {reply_to!r}") from exc

    def get_replies(self, reply_to: str, timeout: float) -> list[bytes]:
        key = self.keys.reply(reply_to)
        deadline = time.monotonic() + timeout
        try:
            items: list[Any] = self._take(key)
            while not items and (left := deadline - time.monotonic()) > 0:
                # Slices stay well under the socket timeout.
                first = self._client.blpop([key], timeout=min(left, 1.0))
                if first:
                    items = [first[1], *self._take(key)]
        except RedisError as exc:
            raise self._failure(exc, f"read replies for {reply_to!r}") from exc
        now = self.clock()
        return [payload for expires, payload in map(K.parse_reply_item, items) if expires > now]

    def _take(self, key: str) -> list[bytes]:
        pipe = self._client.pipeline(transaction=True)
        pipe.lrange(key, 0, -1)
        pipe.delete(key)
        items: list[bytes] = pipe.execute()[0]
        return items

    # -- lifecycle --------------------------------------------------------------------------------
    def after_fork(self) -> None:
        # The parent's sockets stay open for the parent: we only stop using them.
        self._closer.detach()
        self._fresh_state()

    def close(self) -> None:
        if self._ack_backlog:
            try:
                self._flush_ack_backlog()
            except RedisError as exc:
                log.error("Could not ack %d message(s) before closing (%s); they will be "
                          "redelivered after their lease", len(self._ack_backlog),
                          self.params.scrub(exc))
        self._closer()
        self._local = threading.local()

    def describe(self) -> dict[str, Any]:
        return dict(self.params.facts)
