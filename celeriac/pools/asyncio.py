"""``-P asyncio``: ``-c N`` tasks at once on an event loop of the pool's own.

The loop runs in one thread of the worker process, apart from the worker's loop, so a task
that misbehaves (blocks its loop) cannot keep the worker from fetching, acking or answering
control commands. ``async def`` tasks run on it as coroutines, without a thread each; other
tasks run in a bounded set of threads (at most ``min(32, N)`` at once). Results go to the
worker with the outcomes, to be stored in batches (a ``track_started`` STARTED state is stored
at once, in a few threads of the pool's own, so it never holds up the loop). See
:mod:`celeriac.worker.execute_async` for how a job runs and how limits and terminate stop it.

What users should know:

- An ``async def`` task must not block (``time.sleep``, a blocking client): that stalls every
  task on the loop, and their time limits with them. Use ``await asyncio.sleep``,
  ``asyncio.to_thread`` or an async client. Sending tasks from a task (``delay``) is a short
  blocking publish.
- Soft limit: :class:`~celeriac.exceptions.SoftTimeLimitExceeded` is raised at the ``await``
  the task is suspended on (a sync task gets it as an asynchronous exception, once it runs
  Python code again). A coroutine waiting on work in another thread (``asyncio.to_thread``)
  gets it at once; that thread's work runs on and its result is dropped. If the task is
  not suspended on a plain future within a few loop iterations, it is cancelled instead,
  and an uncaught cancellation ends it FAILURE with ``SoftTimeLimitExceeded``.
- Hard limit and terminate stop waiting for the task at once: the slot is free again and the
  result is stored (FAILURE with ``TimeLimitExceeded``, or REVOKED). The coroutine is
  cancelled; a sync task's thread cannot be stopped: it runs on until its call returns, its
  result dropped, while a fresh thread takes its place. Such a thread is a daemon, so it
  does not hold up the worker's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..worker.execute import LOST, Job, Outcome
from ..worker.execute_async import AsyncRun, TaskThreads, quiet_late_results
from .base import LoopInbox, Pool

if TYPE_CHECKING:
    from ..app import Celeriac

__all__ = ["AsyncioPool"]

log = logging.getLogger("celeriac.pool")

_MAX_SYNC_THREADS = 32
_STORE_THREADS = 4
_COLD_STOP_GRACE = 5.0
_LEFTOVER_GRACE = 1.0


class AsyncioPool(Pool):
    """``concurrency`` jobs at a time on one event loop in a thread of its own."""

    name = "asyncio"

    def __init__(self, app: Celeriac, *, concurrency: int, hostname: str, **kw: Any) -> None:
        super().__init__(app, concurrency=concurrency, hostname=hostname, **kw)
        self._loop: asyncio.AbstractEventLoop | None = None  # the worker's
        self._task_loop: asyncio.AbstractEventLoop | None = None  # the pool's own
        self._to_worker: LoopInbox | None = None  # outcomes, to the worker's loop
        self._to_pool: LoopInbox | None = None  # jobs, to the pool's loop
        self._thread: threading.Thread | None = None
        self._tasks = TaskThreads(min(_MAX_SYNC_THREADS, concurrency), "celeriac-asyncio-sync")
        self._stores = ThreadPoolExecutor(min(_STORE_THREADS, concurrency),
                                          "celeriac-asyncio-store")
        # On the worker's loop: job id -> (run, the future ``apply`` returned).
        self._runs: dict[int, tuple[AsyncRun, asyncio.Future[Outcome]]] = {}
        # On the pool's loop: runs in progress, and bodies still going after being given up.
        self._executing: set[asyncio.Task[Outcome]] = set()
        self._leftovers: set[asyncio.Task[Any]] = set()

    # -- the pool's loop (its own thread) ----------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[asyncio.AbstractEventLoop] = self._loop.create_future()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True,
                                        name="celeriac-asyncio-loop")
        self._thread.start()
        self._task_loop = await ready
        self._to_worker = LoopInbox(self._loop)
        self._to_pool = LoopInbox(self._task_loop)

    def _serve(self, ready: asyncio.Future[asyncio.AbstractEventLoop]) -> None:
        assert self._loop is not None
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(quiet_late_results)
        asyncio.set_event_loop(loop)
        self._loop.call_soon_threadsafe(ready.set_result, loop)
        try:
            loop.run_forever()
            self._cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    def _cancel_leftovers(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel what still runs on the loop: bodies given up on, and tasks they started."""
        pending = asyncio.all_tasks(loop)
        if not pending:
            return
        for task in pending:
            task.cancel()
        done, stuck = loop.run_until_complete(asyncio.wait(pending, timeout=_LEFTOVER_GRACE))
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.warning("A task left on the asyncio pool's loop failed at shutdown: %r",
                            task.exception())
        if stuck:
            log.warning("%d coroutine(s) ignored cancellation at shutdown; abandoning them",
                        len(stuck))
            for task in stuck:  # said once here, not again as each is garbage collected
                task._log_destroy_pending = False  # type: ignore[attr-defined]

    def _begin(self, run: AsyncRun, future: asyncio.Future[Outcome]) -> None:
        assert self._task_loop is not None
        task = self._task_loop.create_task(run.execute(), name=f"celeriac-job-{run.job.job_id}")
        self._executing.add(task)
        task.add_done_callback(lambda t: self._ended(run, future, t))

    def _ended(self, run: AsyncRun, future: asyncio.Future[Outcome],
               task: asyncio.Task[Outcome]) -> None:
        self._executing.discard(task)
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:  # a loop torn down, or a bug of ours
            if error is not None:
                log.error("Running %s[%s] failed in the asyncio pool", run.job.name,
                          run.job.task_id, exc_info=error)
            outcome = Outcome(run.job.job_id, run.job.task_id, LOST, 0.0,
                              f"the asyncio pool could not run the task: {error!r}",
                              os.getpid())
        else:
            outcome = task.result()
        runner = run.runner
        if runner is not None and not runner.done():  # given up on (hard limit, terminate)
            self._leftovers.add(runner)
            runner.add_done_callback(self._leftovers.discard)
        assert self._to_worker is not None
        with contextlib.suppress(RuntimeError):  # the worker's loop is gone: nobody waits
            self._to_worker.put(self._finish, run.job.job_id, future, outcome)

    # -- the worker's loop --------------------------------------------------------------------
    def _finish(self, job_id: int, future: asyncio.Future[Outcome], outcome: Outcome) -> None:
        self._runs.pop(job_id, None)
        if not future.done():
            future.set_result(outcome)

    @property
    def free(self) -> int:
        return self.concurrency - len(self._runs)

    def apply(self, job: Job) -> asyncio.Future[Outcome]:
        assert self._loop is not None and self._task_loop is not None, "pool not started"
        future: asyncio.Future[Outcome] = self._loop.create_future()
        run = AsyncRun(self.app, job, self.hostname, tasks=self._tasks, stores=self._stores)
        self._runs[job.job_id] = (run, future)
        assert self._to_pool is not None
        self._to_pool.put(self._begin, run, future)
        return future

    def terminate_job(self, job_id: int, signum: int) -> bool:
        """Cancel the running ``job_id``; it ends REVOKED at once (``signum`` is not used)."""
        entry = self._runs.get(job_id)
        if entry is None or self._task_loop is None:
            return False
        self._task_loop.call_soon_threadsafe(entry[0].terminate)
        return True

    async def stop(self, *, cold: bool) -> None:
        if self._task_loop is None or self._thread is None:
            return
        runs = list(self._runs.values())
        if cold:
            for run, _future in runs:
                self._task_loop.call_soon_threadsafe(run.shutdown)
        if runs:
            # Warm: every run ends by itself. Cold: they end at once, unless a task is
            # blocking the pool's loop; then they are given up as lost.
            await asyncio.wait([future for _run, future in runs],
                               timeout=_COLD_STOP_GRACE if cold else None)
            for run, future in runs:
                self._finish(run.job.job_id, future, Outcome(
                    run.job.job_id, run.job.task_id, LOST, 0.0,
                    "abandoned by a cold shutdown: the asyncio pool's loop is blocked",
                    os.getpid()))
        self._task_loop.call_soon_threadsafe(self._task_loop.stop)
        await asyncio.to_thread(self._thread.join, _COLD_STOP_GRACE)
        self._tasks.shutdown(wait=False, cancel_futures=True)
        self._stores.shutdown(wait=False, cancel_futures=True)

    async def resize(self, size: int) -> None:
        """Change how many jobs run at once; running ones finish either way."""
        if size < 1:
            raise ValueError(f"pool size must be at least 1, not {size}")
        self.concurrency = size
        self._tasks.resize(min(_MAX_SYNC_THREADS, size))

    async def restart(self) -> None:
        """Nothing to replace: jobs use the worker's modules, so reloaded code runs next."""

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["running"] = len(self._runs)
        return info
