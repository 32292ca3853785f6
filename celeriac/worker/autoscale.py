"""``--autoscale=MAX,MIN``: grow the pool while tasks wait, shrink it when idle.

A custom autoscaler (setting ``worker_autoscaler``, ``'module:Class'``) implements the same
small interface::

    class MyAutoscaler:
        def __init__(self, worker, max_concurrency, min_concurrency): ...
        async def tick(self) -> None: ...           # called every second on the worker loop
        def update(self, max_concurrency, min_concurrency) -> None: ...
        def info(self) -> dict: ...                 # shown in stats()['autoscaler']

``worker`` gives ``worker.pool`` (``size``, ``free``, ``await resize(n)``) and
``worker.backlog()`` (tasks received and waiting for a slot).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["Autoscaler"]

log = logging.getLogger("celeriac.worker.autoscale")


class Autoscaler:
    """Grows straight to what the backlog needs (up to max); shrinks one process at a time
    after ``keepalive`` seconds without a backlog and with idle processes."""

    def __init__(self, worker: Worker, max_concurrency: int, min_concurrency: int,
                 keepalive: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.worker = worker
        self.keepalive = keepalive
        self.clock = clock
        self.max_concurrency = max_concurrency
        self.min_concurrency = min_concurrency
        self._idle_since: float | None = None
        self.update(max_concurrency, min_concurrency)

    def update(self, max_concurrency: int, min_concurrency: int) -> None:
        if not 1 <= min_concurrency <= max_concurrency:
            raise ValueError(f"autoscale needs 1 <= min <= max, not max={max_concurrency} "
                             f"min={min_concurrency}")
        self.max_concurrency, self.min_concurrency = max_concurrency, min_concurrency

    async def tick(self) -> None:
        pool = self.worker.pool
        if pool is None:
            return
        size, backlog = pool.size, self.worker.backlog()
        if size < self.min_concurrency or size > self.max_concurrency:
            target = min(max(size, self.min_concurrency), self.max_concurrency)
        elif backlog > 0:
            self._idle_since = None
            target = min(self.max_concurrency, size + backlog)
        elif pool.free > 0 and size > self.min_concurrency:
            now = self.clock()
            self._idle_since = self._idle_since or now
            if now - self._idle_since < self.keepalive:
                return
            self._idle_since = now
            target = size - 1
        else:
            self._idle_since = None
            return
        if target != size:
            log.info("Autoscaler: %s pool from %d to %d", "growing" if target > size
                     else "shrinking", size, target)
            await self.worker.set_pool_size(target)

    def info(self) -> dict[str, Any]:
        pool = self.worker.pool
        return {"max": self.max_concurrency, "min": self.min_concurrency,
                "current": pool.size if pool is not None else 0}
