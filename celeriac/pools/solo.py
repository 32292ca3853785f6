"""``-P solo``: one task at a time, in one executor thread beside the consumer.

The task runs off the consumer's event loop so the worker keeps fetching, acking and
answering control commands while it executes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .threads import ThreadPool

if TYPE_CHECKING:
    from ..app import Celeriac

__all__ = ["SoloPool"]


class SoloPool(ThreadPool):
    """A thread pool of exactly one thread, whatever ``-c`` says."""

    name = "solo"

    def __init__(self, app: Celeriac, *, concurrency: int, hostname: str, **kw: Any) -> None:
        super().__init__(app, concurrency=1, hostname=hostname, **kw)
