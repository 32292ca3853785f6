"""Result backends, chosen by URL scheme."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from ..exceptions import ConfigurationError
from ..transports import Transport
from ..urls import mask_url, scheme_of
from .base import Clock, ResultBackend, make_meta

__all__ = ["ResultBackend", "make_meta", "open_backend"]

_BY_SCHEME = {
    "memory": "celeriac.results.memory:MemoryBackend",
    "sqlite": "celeriac.results.sqlite:SQLiteBackend",
    "redis": "celeriac.results.redis:RedisBackend",
    "rediss": "celeriac.results.redis:RedisBackend",
    "redis+socket": "celeriac.results.redis:RedisBackend",
    "rpc": "celeriac.results.rpc:RPCBackend",
}


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
