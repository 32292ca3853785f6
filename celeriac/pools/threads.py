"""``-P threads``: jobs run in threads of the worker process.

Time limits and terminate are delivered as asynchronous exceptions
(``PyThreadState_SetAsyncExc``): the exception is raised when the thread next runs Python
code, so a task blocked inside a C call (``time.sleep``, a socket read) notices it only when
that call returns. At the hard time limit the task is recorded as failed and its slot is
given to a fresh thread at once; the stuck thread is abandoned — it keeps running until its
call returns, then its outcome is dropped and it exits.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import TYPE_CHECKING, Any

from ..exceptions import SoftTimeLimitExceeded, TaskRevokedError
from ..worker.execute import LOST, HandOver, Job, Outcome, execute
from .base import LoopInbox, Pool, arm_time_limits, raise_in_thread

if TYPE_CHECKING:
    from ..app import Celeriac

__all__ = ["ThreadPool"]

_STOP = None


class ThreadPool(Pool):
    """``concurrency`` daemon threads taking jobs from one queue."""

    name = "threads"

    def __init__(self, app: Celeriac, *, concurrency: int, hostname: str, **kw: Any) -> None:
        super().__init__(app, concurrency=concurrency, hostname=hostname, **kw)
        self._jobs: queue.SimpleQueue[tuple[Job, asyncio.Future[Outcome]] | None] = (
            queue.SimpleQueue())
        self._threads: set[threading.Thread] = set()
        self._names = itertools.count(1)
        self._busy = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: LoopInbox | None = None  # outcomes to the worker's loop
        self._running: dict[int, int] = {}  # job id -> thread ident
        self._abandoned: set[int] = set()  # job ids whose slot was given away (hard limit)
        self._timers: dict[int, list[asyncio.TimerHandle]] = {}

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._inbox = LoopInbox(self._loop)
        for _ in range(self.concurrency):
            self._add_thread()

    def _add_thread(self) -> None:
        thread = threading.Thread(target=self._run, name=f"celeriac-{self.name}-"
                                  f"{next(self._names)}", daemon=True)
        self._threads.add(thread)
        thread.start()

    def _run(self) -> None:
        assert self._inbox is not None
        ident = threading.get_ident()
        try:
            while (item := self._jobs.get()) is not _STOP:
                job, future = item
                self._running[job.job_id] = ident
                try:
                    hand_over = HandOver(self.app.conf.result_serializer)  # (see Consumer)
                    outcome = hand_over.attach(execute(self.app, job, self.hostname,
                                                       store=hand_over))
                finally:
                    self._running.pop(job.job_id, None)
                if job.job_id in self._abandoned:
                    self._abandoned.discard(job.job_id)
                    return  # our slot went to a fresh thread at the hard time limit
                self._inbox.put(self._finish, future, outcome)
        finally:
            self._threads.discard(threading.current_thread())

    def _finish(self, future: asyncio.Future[Outcome], outcome: Outcome) -> None:
        for handle in self._timers.pop(outcome.job_id, []):
            handle.cancel()
        self._busy -= 1
        if not future.done():
            future.set_result(outcome)

    @property
    def free(self) -> int:
        return self.concurrency - self._busy

    def apply(self, job: Job) -> asyncio.Future[Outcome]:
        assert self._loop is not None, "pool not started"
        future: asyncio.Future[Outcome] = self._loop.create_future()
        self._busy += 1
        timers = arm_time_limits(self._loop, job, lambda: self._soft_limit(job),
                                 lambda: self._hard_limit(job, future))
        if timers:
            self._timers[job.job_id] = timers
        self._jobs.put((job, future))
        return future

    def _soft_limit(self, job: Job) -> None:
        ident = self._running.get(job.job_id)
        if ident is not None:
            raise_in_thread(ident, SoftTimeLimitExceeded)

    def _hard_limit(self, job: Job, future: asyncio.Future[Outcome]) -> None:
        if future.done() or job.job_id not in self._running:
            return
        self._abandoned.add(job.job_id)
        self._timers.pop(job.job_id, None)
        self._busy -= 1
        self._add_thread()
        future.set_result(Outcome(job.job_id, job.task_id, LOST, 0.0,
                                  f"Time limit ({job.time_limit:g}s) exceeded", timed_out=True))

    def terminate_job(self, job_id: int, signum: int) -> bool:
        """Raise :class:`TaskRevokedError` in the thread running ``job_id``."""
        ident = self._running.get(job_id)
        return ident is not None and raise_in_thread(ident, TaskRevokedError)

    async def resize(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"pool size must be at least 1, not {size}")
        for _ in range(size - self.concurrency):
            self._add_thread()
        for _ in range(self.concurrency - size):
            self._jobs.put(_STOP)  # an idle thread (or the next to finish) leaves
        self.concurrency = size

    async def restart(self) -> None:
        """Threads share the worker's modules: reloaded code is used by the next job."""

    @property
    def pids(self) -> list[int]:
        return [t.ident or 0 for t in self._threads]

    async def stop(self, *, cold: bool) -> None:
        threads = list(self._threads)
        for _ in threads:
            self._jobs.put(_STOP)
        if not cold:
            await asyncio.gather(*(asyncio.to_thread(t.join) for t in threads))
