"""Execution pools, looked up by their ``-P`` name."""

from __future__ import annotations

import importlib

from ..exceptions import ConfigurationError
from .base import Pool

__all__ = ["POOLS", "Pool", "pool_class"]

POOLS = {
    "prefork": "celeriac.pools.prefork:PreforkPool",
    "threads": "celeriac.pools.threads:ThreadPool",
    "solo": "celeriac.pools.solo:SoloPool",
    "asyncio": "celeriac.pools.asyncio:AsyncioPool",
    "gevent": "celeriac.pools.gevent:GeventPool",
}
#: Names users know from Celery that celeriac does not offer, and what to use instead.
_UNAVAILABLE = {
    "eventlet": "eventlet is not supported; use -P gevent for greenlets (pip install "
                "'celeriac[gevent]'), -P asyncio for async def tasks or -P threads for "
                "blocking I/O",
}


def pool_class(name: str) -> type[Pool]:
    """The pool class for ``-P name``; an unknown or unavailable name says what exists."""
    target = POOLS.get(name)
    if target is None:
        if name in _UNAVAILABLE:
            raise ConfigurationError(f"The {name!r} pool is not available: "
                                     f"{_UNAVAILABLE[name]}.")
        raise ConfigurationError(f"Unknown pool {name!r}: choose one of {sorted(POOLS)}.")
    module, _, attr = target.partition(":")
    cls: type[Pool] = getattr(importlib.import_module(module), attr)
    return cls
