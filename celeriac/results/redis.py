"""``redis://`` results: a key per task, ``celery-task-meta-<id>``, with native expiry.

Storing is one script (``SET ... PX`` + ``PUBLISH`` on a channel named like the key) that
refuses to replace a live SUCCESS; ``store_many`` pipelines the scripts. A waiter subscribes to
the task's channel, then reads the key (a result stored before the subscription is there), then
blocks on the subscription: no polling. Over RESP3 the subscription and the read go in one
round trip (:mod:`.redis_wait`); otherwise through redis-py's pub/sub, the read after the
subscription is confirmed. Waiting connections are pooled per backend.

The stored document is the meta itself plus one field, ``celeriac_expires_at``: the expiry on
the backend's clock, which the store script and :meth:`get` honour (a backend on an injected
clock sees the same expiry as Redis' own ``PX`` does on the wall clock).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from .. import states
from ..exceptions import ResultBackendError
from ..transports import redis_keys as K
from ..transports.redis import close_quietly
from ..transports.redis_conn import (
    RawCalls,
    connect_with_retry,
    redis_params,
    require_redis,
)
from .base import ResultBackend
from .redis_wait import NoPushWaits, PushWaiter
from .redis_writer import result_document

try:
    import redis
    from redis.exceptions import NoScriptError, RedisError, WatchError
except ImportError:  # pragma: no cover - exercised only without the extra installed
    redis = None  # type: ignore[assignment]

__all__ = ["RedisBackend"]

_FIELD = K.RESULT_DEADLINE_FIELD
_NO_PUSH = object()  # (a RESP3 wait could not be made)


def _final(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    return meta if meta is not None and meta.get("status") in states.READY_STATES else None


class _Reconnected:
    """Set when a pub/sub connection reconnects (messages may have been missed meanwhile)."""

    def __init__(self) -> None:
        self.flag = False

    def mark(self, connection: Any) -> None:
        self.flag = True


class RedisBackend(ResultBackend):
    """Results as expiring keys; waiters are told by pub/sub."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        require_redis("result backend")
        self.params = redis_params(url, self.options)
        self.keys = K.KeySpace(self.params.key_prefix)
        self._fresh_state()
        connect_with_retry(self.params, "result backend", ResultBackendError)

    def _fresh_state(self) -> None:
        self._client = self.params.client()
        self._raw = RawCalls(self._client)  # connections of our own for storing results
        self._idle: list[Any] = []
        self._waiters: list[PushWaiter] = []  # idle RESP3 waiters (see redis_wait)
        self._push_waits = True  # until the server or the URL says otherwise
        self._lock = threading.Lock()
        # Closes our sockets if we are dropped unclosed (see RedisTransport._fresh_state).
        self._closer = weakref.finalize(self, close_quietly, self._idle, self._waiters,
                                        self._raw, self._client)

    def _failure(self, exc: Exception, doing: str) -> ResultBackendError:
        return ResultBackendError(f"Redis result backend {self.params.masked}: could not "
                                  f"{doing}: {type(exc).__name__}: {self.params.scrub(exc)}")

    # -- documents ----------------------------------------------------------------------------
    def _document(self, meta: dict[str, Any]) -> tuple[bytes, int]:
        """The bytes to store and their time to live in ms (0: forever)."""
        return result_document(meta, self.serializer, self.clock, self.expires)

    def _live(self, raw: Any) -> dict[str, Any] | None:
        if raw is None:
            return None
        meta = self.decode(bytes(raw))
        deadline = meta.pop(_FIELD, None)
        if deadline is not None and float(deadline) <= self.clock():
            return None
        return meta

    # -- the contract -------------------------------------------------------------------------
    def store(self, meta: dict[str, Any], reply_to: str | None = None) -> None:
        self.store_many([meta], reply_to)

    def store_many(self, metas: Sequence[dict[str, Any]], reply_to: str | None = None) -> None:
        docs = [(self.keys.result(meta["task_id"]), *self._document(meta)) for meta in metas]
        if not docs:
            return
        try:
            if self.serializer != "json":  # the store script reads the old status as JSON
                for key, doc, px in docs:
                    self._store_watched(key, doc, px)
                return
            self._store_scripted(docs)
        except RedisError as exc:
            raise self._failure(exc, "store a result") from exc

    def _store_scripted(self, docs: list[tuple[str, bytes, int]]) -> None:
        now = repr(self.clock())
        sha = K.STORE_RESULT.sha
        replies = self._raw.run([("EVALSHA", sha, 1, key, doc, px, now, _FIELD)
                                 for key, doc, px in docs])
        for (key, doc, px), reply in zip(docs, replies, strict=True):
            if isinstance(reply, NoScriptError):  # a restarted server forgot it
                self._raw.one("SCRIPT", "LOAD", K.STORE_RESULT.source)
                self._raw.one("EVALSHA", sha, 1, key, doc, px, now, _FIELD)
            elif isinstance(reply, Exception):
                raise reply

    def _store_watched(self, key: str, doc: bytes, px: int) -> None:
        """Store with an optimistic transaction, for documents Lua cannot read (pickle)."""
        while True:
            with self._client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key)
                    current = self._live(pipe.get(key))
                    if current is not None and current.get("status") == states.SUCCESS:
                        return
                    pipe.multi()
                    if px:
                        pipe.set(key, doc, px=px)
                    else:
                        pipe.set(key, doc)
                    pipe.publish(key, doc)
                    pipe.execute()
                    return
                except WatchError:
                    continue

    def get(self, task_id: str) -> dict[str, Any] | None:
        try:
            raw = self._client.get(self.keys.result(task_id))
        except RedisError as exc:
            raise self._failure(exc, f"read the result of {task_id}") from exc
        return self._live(raw)

    def _ready(self, task_id: str) -> dict[str, Any] | None:
        return _final(self.get(task_id))

    def _ready_document(self, raw: bytes) -> dict[str, Any] | None:
        """The meta in ``raw`` if it is live and final, else None."""
        return _final(self._live(raw))

    def wait(self, task_id: str, timeout: float | None) -> dict[str, Any] | None:
        if timeout is not None and timeout <= 0:
            return self._ready(task_id)
        key = self.keys.result(task_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._push_waits:
            meta = self._wait_pushed(key, deadline)
            if meta is not _NO_PUSH:
                return meta
        # Subscribed first, read second (in _wait_on): a task that was just sent, the usual
        # case, is waited for in two round trips, and one that is done in the same two.
        pubsub = self._checkout()
        reconnected = _Reconnected()
        healthy = False
        try:
            pubsub.subscribe(key)
            pubsub.connection.register_connect_callback(reconnected.mark)
            meta = self._wait_on(pubsub, key, task_id, deadline, reconnected)
            pubsub.unsubscribe(key)
            healthy = True
            return meta
        except RedisError as exc:
            raise self._failure(exc, f"wait for the result of {task_id}") from exc
        finally:
            self._checkin(pubsub, reconnected, healthy)

    def _wait_pushed(self, key: str, deadline: float | None) -> Any:
        """:meth:`wait` on a RESP3 connection (see :mod:`.redis_wait`): one round trip to
        subscribe and read the key. ``_NO_PUSH`` if that cannot be done: the caller waits
        through redis-py (with its retries) instead, for this wait or, if the server or URL
        does not allow it, for good."""
        with self._lock:
            waiter = self._waiters.pop() if self._waiters else None
        try:
            waiter = waiter or PushWaiter(self.params)
        except NoPushWaits:
            self._push_waits = False
            return _NO_PUSH
        except OSError:  # (redis-py says what is wrong, or reconnects)
            return _NO_PUSH
        try:
            meta = waiter.wait(key, deadline, self._ready_document)
        except TimeoutError:  # before the key was read: its reply is still to come
            waiter.close()
            return None
        except OSError:  # the connection failed (ConnectionError is one)
            waiter.close()
            return _NO_PUSH
        except BaseException:
            waiter.close()
            raise
        with self._lock:
            if len(self._waiters) < 8:
                self._waiters.append(waiter)
                return meta
        waiter.close()
        return meta

    def _wait_on(self, pubsub: Any, key: str, task_id: str, deadline: float | None,
                 reconnected: _Reconnected) -> dict[str, Any] | None:
        subscribed = False
        while True:
            if subscribed and reconnected.flag:  # a gap: what was published then is lost
                reconnected.flag = False
                subscribed = False
            if deadline is not None and time.monotonic() >= deadline:
                return None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            msg = pubsub.get_message(timeout=left if left is not None else 30.0)
            if msg is None:
                continue
            kind, channel = msg.get("type"), msg.get("channel")
            if channel is not None and channel.decode("utf-8", "replace") != key:
                continue  # left over from an earlier wait on this connection
            if kind == "subscribe":
                subscribed = True
                # Subscribed first, read second: a result stored before now is in the key.
                found = self._ready(task_id)
                if found is not None:
                    return found
            elif kind == "message":
                meta = self._ready_document(msg["data"])
                if meta is not None:
                    return meta

    def _checkout(self) -> Any:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._client.pubsub()

    def _checkin(self, pubsub: Any, reconnected: _Reconnected, healthy: bool) -> None:
        connection = pubsub.connection
        if connection is not None:
            connection.deregister_connect_callback(reconnected.mark)
        if healthy:
            with self._lock:
                if len(self._idle) < 8:
                    self._idle.append(pubsub)
                    return
        try:
            pubsub.close()
        except RedisError:
            pass

    def forget(self, task_id: str) -> None:
        try:
            self._client.delete(self.keys.result(task_id))
        except RedisError as exc:
            raise self._failure(exc, f"forget the result of {task_id}") from exc

    # -- lifecycle ----------------------------------------------------------------------------
    def after_fork(self) -> None:
        # Inherited sockets belong to the parent: start over without closing them.
        self._closer.detach()
        self._fresh_state()

    def close(self) -> None:
        self._closer()

    def describe(self) -> dict[str, Any]:
        return dict(self.params.facts)
