"""Result backends, chosen by URL scheme."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..exceptions import ConfigurationError
from ..transports import Transport
from ..urls import mask_url, scheme_of
from .base import Clock, ResultBackend, make_meta

__all__ = ["ChildStore", "ResultBackend", "make_meta", "open_backend", "open_child_store"]


class ChildStore(Protocol):
    """What prefork children store results with (:func:`open_child_store`)."""

    def store_many(self, metas: Sequence[dict[str, Any]], reply_to: str | None = None) -> None:
        ...


_BY_SCHEME = {
    "memory": "celeriac.results.memory:MemoryBackend",
    "sqlite": "celeriac.results.sqlite:SQLiteBackend",
    "redis": "celeriac.results.redis:RedisBackend",
    "rediss": "celeriac.results.redis:RedisBackend",
    "redis+socket": "celeriac.results.redis:RedisBackend",
    "rpc": "celeriac.results.rpc:RPCBackend",
}
#: Stores prefork children write their own results to (see :func:`open_child_store`).
_STORED_IN_CHILDREN = {"redis", "redis+socket"}


def open_child_store(url: str, *, clock: Clock, expires: float | None, serializer: str,
                     options: dict[str, Any] | None = None) -> ChildStore | None:
    """What a prefork child stores its results with, or None: it hands them to the worker.

    Children store their own results where any process can write cheaply and at once
    (Redis, JSON documents: a batch before they report the outcomes); the writer does not
    load the store's client library, whose memory every child would pay for.
    """
    if serializer != "json" or scheme_of(url) not in _STORED_IN_CHILDREN:
        return None
    from .redis_writer import ResultWriter
    return ResultWriter(url, clock=clock, expires=expires, options=options)


def open_backend(url: str, *, clock: Clock, expires: float | None = 86400.0,
                 serializer: str = "json", accept: Sequence[str] = ("json",),
                 options: dict[str, Any] | None = None,
                 broker: Callable[[], Transport] | None = None) -> ResultBackend:
    """The result backend for ``url``; an unknown scheme is a :class:`ConfigurationError`.

    ``broker`` gives the app's broker connection, for backends that send results over it
    (``rpc://``).
    """
    scheme = scheme_of(url)
    target = _BY_SCHEME.get(scheme)
    if target is None:
        raise ConfigurationError(
            f"Unsupported result backend URL {mask_url(url)!r}: the scheme must be one of "
            f"{sorted(_BY_SCHEME)} (for example 'sqlite:///celeriac-results.db')."
        )
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    backend: ResultBackend = cls(url, clock=clock, expires=expires, serializer=serializer,
                                 accept=accept, options=options, broker=broker)
    return backend
