"""Broker transports, chosen by URL scheme."""

from __future__ import annotations

import importlib
from typing import Any

from ..exceptions import ConfigurationError
from ..urls import mask_url, scheme_of
from .base import Capabilities, Clock, DeadLetter, Delivery, Subscription, Transport

__all__ = [
    "Capabilities", "DeadLetter", "Delivery", "Subscription", "Transport", "open_transport",
]

_BY_SCHEME = {
    "memory": "celeriac.transports.memory:MemoryTransport",
    "sqlite": "celeriac.transports.sqlite:SQLiteTransport",
    "redis": "celeriac.transports.redis:RedisTransport",
    "rediss": "celeriac.transports.redis:RedisTransport",
    "redis+socket": "celeriac.transports.redis:RedisTransport",
    "amqp": "celeriac.transports.amqp:AMQPTransport",
    "amqps": "celeriac.transports.amqp:AMQPTransport",
}


def open_transport(url: str, *, clock: Clock, lease_seconds: float = 60.0,
                   options: dict[str, Any] | None = None) -> Transport:
    """The transport for ``url``; an unknown scheme is a :class:`ConfigurationError`."""
    scheme = scheme_of(url)
    target = _BY_SCHEME.get(scheme)
    if target is None:
        raise ConfigurationError(
            f"Unsupported broker URL {mask_url(url)!r}: the scheme must be one of "
            f"{sorted(_BY_SCHEME)} (for example 'sqlite:///celeriac-broker.db')."
        )
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    transport: Transport = cls(url, clock=clock, lease_seconds=lease_seconds, options=options)
    return transport
