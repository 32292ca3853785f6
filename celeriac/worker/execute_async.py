"""Running one task on an event loop: the asyncio pool's counterpart of
:func:`~celeriac.worker.execute.execute`, with the same outcomes and the same stored results.

An ``async def`` task is awaited in an asyncio task of its own, with its request context set
inside that task. Any other task runs in a thread of the ``tasks`` executor. The final result
travels with the outcome (the worker stores results in batches); a STARTED state is blocking
I/O, so it is stored in the ``stores`` executor and the loop keeps serving the other tasks.

Limits and terminate act on the asyncio task running the body (see :class:`AsyncRun`):

- soft limit: :class:`SoftTimeLimitExceeded` is raised at the ``await`` the task is
  suspended on (in a sync task's thread, as an asynchronous exception);
- hard limit: the run stops being waited for and ends FAILURE with
  :class:`TimeLimitExceeded`; the body is cancelled (a sync task's thread runs on, and a
  fresh thread takes its place);
- terminate: the same, ending REVOKED.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from .. import states
from ..exceptions import (
    MessageError,
    SoftTimeLimitExceeded,
    TaskError,
    TaskRevokedError,
    TimeLimitExceeded,
)
from ..pools.base import raise_in_thread
from ..protocol import Message, decode_body, saferepr
from ..results import make_meta
from .execute import (
    LOST,
    REJECTED,
    HandOver,
    Job,
    Outcome,
    ending,
    store_result,
    task_context,
)

if TYPE_CHECKING:
    from ..app import Celeriac
    from ..task import Context, Task

__all__ = ["AsyncRun", "TaskThreads", "quiet_late_results"]

log = logging.getLogger("celeriac.worker")
P = ParamSpec("P")
T = TypeVar("T")

# Why a run stopped being waited for; the first one wins.
_DONE, _HARD, _TERMINATED, _SHUTDOWN = "done", "hard limit", "terminated", "shutdown"
# Loop iterations a soft limit waits for a task that is between two awaits.
_SOFT_RETRIES = 3

_Ending = tuple[Any, BaseException | None, str | None]  # value, error, traceback text


class TaskThreads(Executor):
    """Daemon threads for sync task bodies: at most ``size`` at work, started as work arrives.

    A thread whose task nobody waits for any more (hard limit, terminate) is let go with
    :meth:`detach`: it stops counting, a fresh thread may take its place, and it exits when
    its call returns. Being daemons, unlike ``ThreadPoolExecutor``'s threads, threads stuck
    in a task do not hold the worker process at exit.
    """

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue())
        self._counted = 0  # threads that count toward ``size``
        self._started = 0
        self._idle = threading.Semaphore(0)  # one per thread waiting for work
        self._detached: set[int] = set()
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: cannot run new work after shutdown")
            self._work.put((future, functools.partial(fn, *args, **kwargs)))
            if not self._idle.acquire(blocking=False):
                self._grow()
        return future

    def _grow(self) -> None:
        if self._counted < self._size:
            self._counted += 1
            self._started += 1
            threading.Thread(target=self._serve, name=f"{self._name}-{self._started}",
                             daemon=True).start()

    def resize(self, size: int) -> None:
        """Allow ``size`` threads at work; surplus threads stay, idle, until shutdown."""
        with self._lock:
            self._size = size

    def detach(self, ident: int) -> None:
        """Let go of thread ``ident``, which is inside a call nobody waits for."""
        with self._lock:
            if ident in self._detached:
                return
            self._detached.add(ident)
            self._counted -= 1
            if not self._work.empty():
                self._grow()

    def _serve(self) -> None:
        ident = threading.get_ident()
        while (item := self._work.get()) is not None:
            future, call = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = call()
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, call
            with self._lock:
                if ident in self._detached:
                    self._detached.discard(ident)
                    return
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
        if cancel_futures:
            with contextlib.suppress(queue.Empty):
                while True:
                    item = self._work.get_nowait()
                    if item is not None:
                        item[0].cancel()
        for _ in range(self._started):
            self._work.put(None)


class _Thread:
    """The executor thread running a sync task, and the one exception it may be sent.

    Sending only while the task is inside its thread (under the lock), and dropping an
    exception still pending when it leaves, keeps the exception from hitting whatever the
    thread runs next. At most one is ever sent, so leaving twice is always enough.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ident: int | None = None
        self._sent = False

    def enter(self) -> None:
        with self._lock:
            self._ident = threading.get_ident()

    def _leave(self) -> None:
        with self._lock:
            self._ident = None
            if self._sent:
                raise_in_thread(threading.get_ident(), None)

    def leave(self) -> None:
        try:
            self._leave()
        except BaseException:  # the exception that was sent, arriving just as the task ended
            self._leave()

    def send(self, exc: type[BaseException]) -> bool:
        with self._lock:
            if self._ident is None or self._sent:
                return False
            self._sent = True
            return raise_in_thread(self._ident, exc)

    def detach(self, threads: TaskThreads) -> None:
        """Let ``threads`` replace this thread if it is still inside the task."""
        with self._lock:  # held, the task cannot leave the thread meanwhile
            if self._ident is not None:
                threads.detach(self._ident)


def _awaited_future(task: asyncio.Task[Any]) -> asyncio.Future[Any] | None:
    """The plain future ``task`` is suspended on, following awaited tasks inward.

    Reads ``Task._fut_waiter``, which CPython's asyncio has (in both its C and its Python
    implementation) but does not document; without it this returns None and the caller
    falls back to cancelling. Futures with a life of their own (tasks, ``gather``) are
    never returned: an exception set on them would orphan their children.
    """
    waiter = getattr(task, "_fut_waiter", None)
    while isinstance(waiter, asyncio.Task):
        waiter = getattr(waiter, "_fut_waiter", None)
    return waiter if type(waiter) is asyncio.Future else None


def quiet_late_results(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A loop exception handler that drops the late results a soft limit leaves behind.

    A coroutine awaiting work in another thread (``asyncio.to_thread``) gets the soft limit
    at once; when the thread's call returns, asyncio tries to complete the future that the
    limit already completed and reports that as an error in a callback. Everything else
    goes to the loop's default handler.
    """
    exc = context.get("exception")
    if (isinstance(exc, AssertionError | asyncio.InvalidStateError)
            and "_chain_future" in str(context.get("message", ""))):
        log.debug("Dropped a thread's result that arrived after a soft time limit")
        return
    loop.default_exception_handler(context)


class AsyncRun:
    """One job on the pool's event loop: :meth:`execute` runs it to an :class:`Outcome`.

    Built on any thread; every method runs on the loop's thread. ``terminate`` and
    ``shutdown`` stop waiting at once and cancel the body, so a body that ignores
    cancellation still frees its slot.
    """

    def __init__(self, app: Celeriac, job: Job, hostname: str, *, tasks: TaskThreads,
                 stores: Executor) -> None:
        self.app = app
        self.job = job
        self.hostname = hostname
        self.tasks = tasks
        self.stores = stores
        self.pid = os.getpid()
        #: The asyncio task running the body, once started.
        self.runner: asyncio.Task[_Ending] | None = None
        self._thread: _Thread | None = None  # set for sync tasks
        self._reason: str | None = None
        self._wake: asyncio.Future[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._soft_cancelled = False

    # -- stopping (on the loop's thread) -----------------------------------------------------
    def terminate(self) -> None:
        """End the run REVOKED (``revoke(terminate=True)``)."""
        self._stop(_TERMINATED)

    def shutdown(self) -> None:
        """End the run LOST (a cold shutdown); nothing is stored."""
        self._stop(_SHUTDOWN)

    def _stop(self, reason: str) -> None:
        if self._reason is not None:
            return
        self._reason = reason
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        runner = self.runner
        if runner is not None and not runner.done():
            if self._thread is not None:
                if reason == _TERMINATED:
                    self._thread.send(TaskRevokedError)
                self._thread.detach(self.tasks)
            runner.cancel()

    def _hard_limit(self) -> None:
        log.error("Hard time limit (%ss) exceeded for %s[%s]", self.job.time_limit,
                  self.job.name, self.job.task_id)
        self._stop(_HARD)

    def _soft_limit(self, retries: int = _SOFT_RETRIES) -> None:
        runner = self.runner
        if runner is None or runner.done() or self._reason is not None:
            return
        if retries == _SOFT_RETRIES:
            log.warning("Soft time limit (%ss) exceeded for %s[%s]",
                        self.job.soft_time_limit, self.job.name, self.job.task_id)
        if self._thread is not None:
            self._thread.send(SoftTimeLimitExceeded)
            return
        waiter = _awaited_future(runner)
        if waiter is not None and not waiter.done():
            waiter.set_exception(SoftTimeLimitExceeded(self._soft_message()))
        elif retries > 0:  # between two awaits: it suspends again within an iteration or two
            asyncio.get_running_loop().call_soon(self._soft_limit, retries - 1)
        else:
            self._soft_cancelled = True
            runner.cancel()

    def _soft_message(self) -> str:
        return (f"Task {self.job.name}[{self.job.task_id}] exceeded its soft time limit of "
                f"{self.job.soft_time_limit}s")

    def _arm(self) -> None:
        """Start the time limits: when the body starts running, not while it queues."""
        if self._reason is not None:
            return
        loop = asyncio.get_running_loop()
        if self.job.soft_time_limit:
            self._timers.append(loop.call_later(self.job.soft_time_limit, self._soft_limit))
        if self.job.time_limit:
            self._timers.append(loop.call_later(self.job.time_limit, self._hard_limit))

    def _on_runner_done(self, runner: asyncio.Task[_Ending]) -> None:
        if self._reason is None:
            self._reason = _DONE
            if self._wake is not None and not self._wake.done():
                self._wake.set_result(None)

    # -- running ------------------------------------------------------------------------------
    async def execute(self) -> Outcome:
        """Run the job to its end and return how it ended; never raises."""
        start = time.monotonic()
        job = self.job
        self._wake = asyncio.get_running_loop().create_future()
        if self._reason is not None:
            self._wake.set_result(None)
        message = Message(job.body, job.headers, job.content_type, job.content_encoding)
        try:
            args, kwargs, _embed = decode_body(message, self.app.conf.accept_content)
        except MessageError as exc:
            return Outcome(job.job_id, job.task_id, REJECTED, 0.0, pid=self.pid,
                           reject_reason=str(exc))
        task = self.app.tasks[job.name]
        ignore = task.ignore_result or bool(job.headers.get("ignore_result"))
        try:
            if task.track_started and not ignore:
                await self._store(make_meta(job.task_id, states.STARTED,
                                            {"pid": self.pid, "hostname": self.hostname}))
            if self._reason is None:
                self._start(task, task_context(job, args, kwargs, self.hostname), args, kwargs)
            await self._wake
        except Exception as exc:  # the STARTED store failed: the run fails with that error
            return await self._settle(start, ignore, (None, exc, traceback.format_exc()))
        finally:
            for timer in self._timers:
                timer.cancel()
        return await self._settle(start, ignore)

    def _start(self, task: Task, context: Context, args: Sequence[Any],
               kwargs: dict[str, Any]) -> None:
        if task.is_async:
            body = self._run_async(task, context, args, kwargs)
        else:
            self._thread = _Thread()
            body = self._run_sync(task, context, args, kwargs)
        self.runner = asyncio.ensure_future(body)
        self.runner.add_done_callback(self._on_runner_done)
        if task.is_async:
            self._arm()

    async def _run_async(self, task: Task, context: Context, args: Sequence[Any],
                         kwargs: dict[str, Any]) -> _Ending:
        # Errors come back as values: asyncio would re-raise SystemExit and KeyboardInterrupt
        # out of the loop, taking every other task on it down too.
        try:
            value = await task.run_with_async(context, args, kwargs)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException as exc:
            return None, exc, "".join(traceback.format_exception(exc))
        return value, None, None

    async def _run_sync(self, task: Task, context: Context, args: Sequence[Any],
                        kwargs: dict[str, Any]) -> _Ending:
        loop = asyncio.get_running_loop()
        call = contextvars.copy_context().run  # no context leaks between jobs of a thread
        try:
            value = await loop.run_in_executor(self.tasks, call, self._call_sync, loop, task,
                                               context, args, kwargs)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException as exc:
            return None, exc, "".join(traceback.format_exception(exc))
        return value, None, None

    def _call_sync(self, loop: asyncio.AbstractEventLoop, task: Task, context: Context,
                   args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """The executor thread's part of a sync task."""
        assert self._thread is not None
        self._thread.enter()
        try:
            loop.call_soon_threadsafe(self._arm)
            return task.run_with(context, args, kwargs)
        finally:
            self._thread.leave()

    def _ending(self) -> _Ending:
        """The body's value or error, once it ended or was given up on."""
        job = self.job
        if self._reason == _HARD:
            return None, TimeLimitExceeded(
                f"Task {job.name}[{job.task_id}] exceeded its hard time limit of "
                f"{job.time_limit}s"), None
        if self._reason == _TERMINATED:
            return None, TaskRevokedError("terminated"), None
        runner = self.runner
        assert runner is not None and runner.done()
        if runner.cancelled():
            if self._soft_cancelled:
                return None, SoftTimeLimitExceeded(self._soft_message()), None
            return None, TaskError("The task was cancelled"), None
        value, exc, trace = runner.result()
        if isinstance(exc, SoftTimeLimitExceeded) and not exc.args:  # sent to a thread
            exc = SoftTimeLimitExceeded(self._soft_message()).with_traceback(exc.__traceback__)
        return value, exc, trace

    async def _settle(self, start: float, ignore: bool, result: _Ending | None = None) -> Outcome:
        """How the run ended: the outcome, carrying the result for the worker to store in a
        batch with others (:class:`HandOver`)."""
        job = self.job
        if self._reason == _SHUTDOWN:
            return Outcome(job.job_id, job.task_id, LOST, time.monotonic() - start,
                           "cancelled by a cold shutdown", self.pid)
        value, exc, trace = result if result is not None else self._ending()
        hand_over = HandOver(self.app.conf.result_serializer)
        if exc is None:
            try:
                if not ignore:
                    store_result(self.app, make_meta(job.task_id, states.SUCCESS, value),
                                 job.reply_to, hand_over)
                return hand_over.attach(Outcome(
                    job.job_id, job.task_id, states.SUCCESS, time.monotonic() - start,
                    saferepr(value, 200), self.pid))
            except Exception as error:  # unserializable value
                exc, trace = error, "".join(traceback.format_exception(error))
                hand_over.metas.clear()  # (store_result kept a FAILURE saying so: made again)
        meta, outcome = ending(job, exc, trace, time.monotonic() - start, self.pid)
        if self._reason == _HARD:
            outcome = dataclasses.replace(outcome, timed_out=True)
        try:
            hand_over(meta, job.reply_to)
        except Exception:
            log.exception("Could not store the %s of task %s[%s]", meta["status"], job.name,
                          job.task_id)
        return hand_over.attach(outcome)

    async def _store(self, meta: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.stores, store_result, self.app, meta, self.job.reply_to)
