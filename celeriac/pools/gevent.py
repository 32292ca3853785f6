"""``-P gevent``: each job runs in a greenlet; ``-c`` is how many run at once.

Needs ``pip install 'celeriac[gevent]'`` and the standard library monkey-patched before
anything else is imported, which the ``celeriac`` command does when it sees ``-P gevent``
(see :mod:`celeriac.greenlets`). Tasks then wait on sockets, ``time.sleep`` and locks
cooperatively: hundreds of I/O-bound tasks share one process.

Time limits and terminate are exceptions thrown into the task's greenlet at its next
cooperative switch. A task that never switches (pure computation, or a C call that does not
go through gevent) cannot be interrupted: at its hard limit it is recorded as failed and
its slot given to the next job at once, and when it ends its outcome is dropped.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from ..exceptions import (
    ConfigurationError,
    SoftTimeLimitExceeded,
    TaskRevokedError,
)
from ..greenlets import is_patched
from ..worker.execute import LOST, HandOver, Job, Outcome, execute
from .base import Pool, arm_time_limits

if TYPE_CHECKING:
    from ..app import Celeriac

__all__ = ["GeventPool"]


class GeventPool(Pool):
    """Up to ``concurrency`` greenlets, one per job, on the worker's own thread."""

    name = "gevent"

    def __init__(self, app: Celeriac, *, concurrency: int, hostname: str, **kw: Any) -> None:
        if not is_patched():
            raise ConfigurationError(
                "The 'gevent' pool needs the process monkey-patched before the app is "
                "imported: choose it on the command line (celeriac -A proj worker -P gevent), "
                "or call gevent.monkey.patch_all() first thing in your own entry point.")
        super().__init__(app, concurrency=concurrency, hostname=hostname, **kw)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: dict[int, Any] = {}  # job id -> its greenlet
        self._timers: dict[int, list[asyncio.TimerHandle]] = {}
        self._busy = 0
        self._ended: list[tuple[asyncio.Future[Outcome], Outcome]] = []
        self._wake_pending = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    @property
    def free(self) -> int:
        return self.concurrency - self._busy

    def apply(self, job: Job) -> asyncio.Future[Outcome]:
        import gevent

        assert self._loop is not None, "pool not started"
        future: asyncio.Future[Outcome] = self._loop.create_future()
        self._busy += 1
        self._running[job.job_id] = gevent.spawn(self._run, job, future)
        timers = arm_time_limits(self._loop, job,
                                 lambda: self._throw(job.job_id, SoftTimeLimitExceeded),
                                 lambda: self._hard_limit(job, future))
        if timers:
            self._timers[job.job_id] = timers
        return future

    def _run(self, job: Job, future: asyncio.Future[Outcome]) -> None:
        assert self._loop is not None
        try:  # a greenlet killed at the hard limit leaves with GreenletExit, unrecorded
            hand_over = HandOver(self.app.conf.result_serializer)  # (see Consumer)
            outcome = hand_over.attach(execute(self.app, job, self.hostname, store=hand_over))
        finally:
            self._running.pop(job.job_id, None)
        # Greenlets that end together (a wave of timers) wake the loop once: they share the
        # loop's thread, so a list and a flag do, where a wake-up each costs a socket write.
        self._ended.append((future, outcome))
        if not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._finish_ended)

    def _finish_ended(self) -> None:
        self._wake_pending = False
        ended, self._ended = self._ended, []
        for future, outcome in ended:
            self._finish(future, outcome)

    def _finish(self, future: asyncio.Future[Outcome], outcome: Outcome) -> None:
        for handle in self._timers.pop(outcome.job_id, []):
            handle.cancel()
        if future.done():
            return  # given up at the hard limit (it did not switch): slot already freed
        self._busy -= 1
        future.set_result(outcome)

    def _throw(self, job_id: int, exc: type[BaseException]) -> bool:
        greenlet = self._running.get(job_id)
        if greenlet is None:
            return False
        greenlet.kill(exc, block=False)
        return True

    def _hard_limit(self, job: Job, future: asyncio.Future[Outcome]) -> None:
        import gevent

        if future.done() or job.job_id not in self._running:
            return
        self._throw(job.job_id, gevent.GreenletExit)
        self._timers.pop(job.job_id, None)
        self._busy -= 1
        future.set_result(Outcome(job.job_id, job.task_id, LOST, 0.0,
                                  f"Time limit ({job.time_limit:g}s) exceeded", timed_out=True))

    def terminate_job(self, job_id: int, signum: int) -> bool:
        """Throw :class:`TaskRevokedError` into the greenlet running ``job_id``."""
        return self._throw(job_id, TaskRevokedError)

    async def resize(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"pool size must be at least 1, not {size}")
        self.concurrency = size  # running greenlets finish; ``free`` follows the new size

    async def restart(self) -> None:
        """Greenlets share the worker's modules: reloaded code is used by the next job."""

    @property
    def pids(self) -> list[int]:
        return [os.getpid()]

    async def stop(self, *, cold: bool) -> None:
        import gevent

        greenlets = list(self._running.values())
        if cold:
            gevent.killall(greenlets, block=False)
            return
        while any(not g.dead for g in greenlets):
            await asyncio.sleep(0.05)  # the loop's select lets them run meanwhile
