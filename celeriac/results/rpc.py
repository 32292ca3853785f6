"""``rpc://`` results: messages sent back to the caller's own reply queue over AMQP.

Each process that sends tasks has a reply queue of its own (a uuid name): exclusive to its
broker connection and deleted with it, declared when ``reply_to`` is first read (the app
puts it in every task message it builds) and consumed from then on, over the app's own
broker connection. Workers publish each result to the queue a task message names:
non-persistent, ``correlation_id`` = the task id, expiring unread after ``result_expires``
(Celery's RPC backend does the same). The caller keeps the latest meta per task id in
memory, so ``get`` and ``wait`` never poll the broker: ``wait`` sleeps until a ready state
arrives.

What follows from results being messages: a result reaches only the process that sent the
task; one sent while that process is disconnected from the broker is lost; results no one
asks for are kept (at most :attr:`RPCBackend.max_kept`, the oldest dropped first) until
they expire or are forgotten.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from .. import states
from ..exceptions import ConfigurationError
from ..protocol import Message, dumps, loads
from .base import ResultBackend

if TYPE_CHECKING:
    from ..transports.amqp import AMQPTransport

__all__ = ["RPCBackend"]

log = logging.getLogger("celeriac.results.rpc")


class RPCBackend(ResultBackend):
    """Results as reply messages on the caller's queue; waiters are woken as they arrive."""

    max_kept = 100_000
    """Unclaimed metas kept in memory at most."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._setup = threading.Lock()
        self._metas: OrderedDict[str, tuple[float | None, dict[str, Any]]] = OrderedDict()
        self._name: str | None = None
        self._listening: tuple[AMQPTransport, object] | None = None

    # -- the connection -----------------------------------------------------------------------
    def _transport(self) -> AMQPTransport:
        transport = self.broker() if self.broker is not None else None
        if not hasattr(transport, "listen") or not hasattr(transport, "send"):
            kind = type(transport).__name__ if transport is not None else "no broker"
            raise ConfigurationError(
                "rpc:// results travel over the broker connection, so they need an amqp:// "
                f"(or amqps://) broker, not {kind}. Use a result store such as sqlite:// or "
                "redis:// with this broker.")
        return cast("AMQPTransport", transport)

    @property
    def reply_to(self) -> str:
        """This process's reply queue, declared and consumed from the first time it is read."""
        if self._pid != os.getpid():
            self._reset()
        if self._listening is None:
            with self._setup:
                if self._listening is None:
                    transport = self._transport()
                    name = self._name or str(uuid.uuid4())
                    handle = transport.listen(name, self._arrived, expires=self.expires)
                    self._name, self._listening = name, (transport, handle)
        assert self._name is not None
        return self._name

    @reply_to.setter
    def reply_to(self, name: str | None) -> None:
        """Use another queue name (declared when next read)."""
        self._stop_listening()
        self._name = name

    def _stop_listening(self) -> None:
        listening, self._listening = self._listening, None
        if listening is not None and self._pid == os.getpid():
            transport, handle = listening
            transport.unlisten(handle)

    def _arrived(self, message: Message, expires_at: float | None) -> None:
        """A result message (on the transport's I/O thread)."""
        try:
            meta = loads(message.body, message.content_type, self.accept)
        except Exception as exc:
            log.warning("Dropped a result message that does not decode: %s", exc)
            return
        task_id = message.properties.get("correlation_id") or (
            meta.get("task_id") if isinstance(meta, dict) else None)
        if not isinstance(meta, dict) or not task_id:
            log.warning("Dropped a result message without a task id")
            return
        with self._cond:
            current = self._live(task_id)
            if current is not None and current["status"] == states.SUCCESS:
                return
            self._metas[task_id] = (expires_at, meta)
            self._metas.move_to_end(task_id)
            while len(self._metas) > self.max_kept:
                self._metas.popitem(last=False)
            self._cond.notify_all()

    def _live(self, task_id: str) -> dict[str, Any] | None:
        """The kept meta, unless it expired (caller holds ``_cond``)."""
        entry = self._metas.get(task_id)
        if entry is None:
            return None
        expires_at, meta = entry
        if expires_at is not None and expires_at <= self.clock():
            del self._metas[task_id]
            return None
        return meta

    def _drain(self) -> None:
        """Return once the results the broker had sent to this process have arrived."""
        if self._listening is not None and self._pid == os.getpid():
            self._listening[0].sync()

    # -- the contract -------------------------------------------------------------------------
    def _message(self, meta: dict[str, Any]) -> Message:
        body, content_type, encoding = dumps(meta, self.serializer)
        return Message(body=body, content_type=content_type, content_encoding=encoding,
                       properties={"correlation_id": str(meta["task_id"]),
                                   "delivery_mode": 1, "priority": 0})

    def store(self, meta: dict[str, Any], reply_to: str | None = None) -> None:
        """Send ``meta`` to ``reply_to`` (this process's own queue when there is none)."""
        target = reply_to or self.reply_to
        self._transport().send(target, self._message(meta), ttl=self.expires)

    def store_many(self, metas: Sequence[dict[str, Any]], reply_to: str | None = None) -> None:
        if metas:
            target = reply_to or self.reply_to
            self._transport().send_many([(target, self._message(m)) for m in metas],
                                        ttl=self.expires)

    def get(self, task_id: str) -> dict[str, Any] | None:
        with self._cond:
            meta = self._live(task_id)
        if meta is None or meta["status"] != states.SUCCESS:  # a later state may be arriving
            self._drain()
            with self._cond:
                meta = self._live(task_id)
        return meta

    def _ready(self, task_id: str) -> dict[str, Any] | None:
        meta = self._live(task_id)
        return meta if meta is not None and meta["status"] in states.READY_STATES else None

    def wait(self, task_id: str, timeout: float | None) -> dict[str, Any] | None:
        with self._cond:
            meta = self._ready(task_id)
        if meta is not None:
            return meta
        if timeout is not None and timeout <= 0:
            self._drain()
            with self._cond:
                return self._ready(task_id)
        with self._cond:
            self._cond.wait_for(lambda: self._ready(task_id) is not None, timeout)
            return self._ready(task_id)

    def forget(self, task_id: str) -> None:
        self._drain()
        with self._cond:
            self._metas.pop(task_id, None)

    def cleanup(self) -> int:
        self._drain()
        with self._cond:
            now = self.clock()
            gone = [k for k, (exp, _) in self._metas.items() if exp is not None and exp <= now]
            for key in gone:
                del self._metas[key]
            return len(gone)

    # -- lifecycle ----------------------------------------------------------------------------
    def after_fork(self) -> None:
        """A forked child has its own reply queue (on its own connection), made when needed."""
        self._reset()

    def close(self) -> None:
        self._stop_listening()
        with self._cond:
            self._metas.clear()
