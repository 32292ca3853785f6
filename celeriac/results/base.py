"""The result-store contract: what every result backend provides.

A result is a *meta* dict, the same shape Celery stores::

    {"task_id": ..., "status": "SUCCESS", "result": ..., "traceback": None,
     "date_done": "2026-11-21T12:00:00+00:00", "children": [], ...extras}

For a failure ``result`` is ``{"exc_type", "exc_message", "exc_module"}`` and ``traceback``
the traceback text; the client rebuilds exceptions itself (see :mod:`celeriac.result`).
Backends store metas as serialized documents and never interpret them beyond ``status``.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from .. import states
from ..protocol import dumps, loads
from ..transports import Transport

__all__ = ["ResultBackend", "make_meta"]

Clock = Callable[[], float]


def make_meta(task_id: str, status: str, result: Any = None, traceback: str | None = None,
              **extra: Any) -> dict[str, Any]:
    """A meta dict for ``task_id``; ``date_done`` is set for ready states only."""
    done = (dt.datetime.now(dt.UTC).isoformat() if status in states.READY_STATES else None)
    meta = {"task_id": task_id, "status": status, "result": result, "traceback": traceback,
            "children": [], "date_done": done}
    meta.update(extra)
    return meta


class ResultBackend(abc.ABC):
    """A result store. Construct through :func:`celeriac.results.open_backend`."""

    #: Where workers should send this client's results, for backends that reply to the
    #: caller (``rpc://``); put in each task message's ``reply_to`` property.
    reply_to: str | None = None

    def __init__(self, url: str, *, clock: Clock, expires: float | None = 86400.0,
                 serializer: str = "json", accept: Sequence[str] = ("json",),
                 options: dict[str, Any] | None = None,
                 broker: Callable[[], Transport] | None = None) -> None:
        self.url = url
        self.broker = broker
        self.clock = clock
        self.expires = expires
        self.serializer = serializer
        self.accept = tuple(accept)
        self.options = dict(options or {})

    # -- the documents ------------------------------------------------------------------------
    def encode(self, meta: dict[str, Any]) -> bytes:
        return dumps(meta, self.serializer)[0]

    def decode(self, raw: bytes) -> dict[str, Any]:
        content_type = ("application/x-python-serialize" if self.serializer == "pickle"
                        else "application/json")
        meta: dict[str, Any] = loads(raw, content_type, self.accept)
        return meta

    # -- the contract -------------------------------------------------------------------------
    @abc.abstractmethod
    def store(self, meta: dict[str, Any], reply_to: str | None = None) -> None:
        """Save ``meta`` for ``meta['task_id']``. A stored SUCCESS is never overwritten.

        ``reply_to`` is the task message's ``reply_to`` property: where backends that answer
        the caller directly (``rpc://``) send the result; stores ignore it.
        """

    def store_many(self, metas: Sequence[dict[str, Any]], reply_to: str | None = None) -> None:
        """Save several metas, in one round trip where possible."""
        for meta in metas:
            self.store(meta, reply_to)

    @abc.abstractmethod
    def get(self, task_id: str) -> dict[str, Any] | None:
        """The stored meta, or ``None`` when nothing is stored (PENDING)."""

    @abc.abstractmethod
    def wait(self, task_id: str, timeout: float | None) -> dict[str, Any] | None:
        """Block until the task is in a ready state; its meta, or ``None`` on timeout."""

    @abc.abstractmethod
    def forget(self, task_id: str) -> None:
        """Delete what is stored for ``task_id``."""

    def cleanup(self) -> int:
        """Delete expired results; returns how many. Backends with native expiry return 0."""
        return 0

    def after_fork(self) -> None:  # noqa: B027 - optional hook
        """Drop connections inherited from a parent process; reconnect lazily."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
