"""The pool contract: where the worker's tasks execute.

A pool is started inside the worker's event loop. The consumer asks how many slots are
``free``, hands a :class:`~celeriac.worker.execute.Job` to ``apply`` and awaits the returned
future, which always resolves to an :class:`~celeriac.worker.execute.Outcome` (a task that
fails, or an executor that dies, is an outcome, not an exception).
"""

from __future__ import annotations

import abc
import asyncio
import ctypes
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..worker.forkguard import ForkGuard

if TYPE_CHECKING:
    from ..app import Celeriac
    from ..worker.execute import Job, Outcome

__all__ = ["LoopInbox", "Pool", "PoolLimits", "arm_time_limits", "raise_in_thread"]


def raise_in_thread(ident: int, exc: type[BaseException] | None) -> bool:
    """Have thread ``ident`` raise ``exc`` when it next runs Python code (``None`` takes back
    one not yet raised). Python cannot interrupt a blocking C call this way."""
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), None if exc is None else ctypes.py_object(exc))
    return int(done) == 1


class LoopInbox:
    """Calls for an event loop from other threads, run there in the order they came, with one
    wake-up of the loop for all that arrive before it runs them.

    ``call_soon_threadsafe`` wakes the loop (a write to its self-pipe, a GIL hand-over) for
    every call; a pool finishing jobs in many threads at once would pay that for each job.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._lock = threading.Lock()
        self._woken = False

    def put(self, fn: Callable[..., object], *args: Any) -> None:
        """Have the loop call ``fn(*args)`` soon; :class:`RuntimeError` if it is closed."""
        with self._lock:
            self._calls.append((fn, args))
            if self._woken:
                return
            self._woken = True
        try:
            self._loop.call_soon_threadsafe(self._run)
        except RuntimeError:
            with self._lock:
                self._woken = False
            raise

    def _run(self) -> None:
        with self._lock:
            calls = list(self._calls)
            self._calls.clear()
            self._woken = False
        for fn, args in calls:
            try:
                fn(*args)
            except Exception as exc:  # as the loop would for a callback of its own
                self._loop.call_exception_handler({
                    "message": f"Exception in callback {fn!r}", "exception": exc})


def arm_time_limits(loop: asyncio.AbstractEventLoop, job: Job,
                    on_soft: Callable[[], object], on_hard: Callable[[], object],
                    ) -> list[asyncio.TimerHandle]:
    """Timers that call ``on_soft``/``on_hard`` when ``job``'s soft/hard limit is reached
    (none for a limit it does not have); a pool cancels them when the job ends."""
    timers = []
    if job.soft_time_limit:
        timers.append(loop.call_later(job.soft_time_limit, on_soft))
    if job.time_limit:
        timers.append(loop.call_later(job.time_limit, on_hard))
    return timers


@dataclass(frozen=True)
class PoolLimits:
    """Per-executor limits and hooks a pool honours where it can.

    ``max_tasks_per_child``/``max_memory_per_child`` (KiB) recycle prefork children;
    ``child_setup(index)`` runs in each new prefork child (per-child log files).
    """

    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None
    child_setup: Callable[[int], None] | None = None
    #: jobs a prefork process may hold: 1 only idle processes get work ("fair"), N > 1 up to N
    #: each ("fast"), 0 adaptive: several only while they are all of recently short task types
    pipeline: int = 0


class Pool(abc.ABC):
    """A strategy for executing jobs; one module per implementation."""

    name: str = ""

    def __init__(self, app: Celeriac, *, concurrency: int, hostname: str,
                 io: Executor | None = None, fork_guard: ForkGuard | None = None,
                 limits: PoolLimits | None = None) -> None:
        self.app = app
        self.limits = limits or PoolLimits()
        self.io = io
        self.fork_guard = fork_guard or ForkGuard()
        self.concurrency = concurrency
        self.hostname = hostname
        #: Called when the pool has room again other than by a job ending (a process that
        #: replaces a dead one has started), so the consumer hands it what waits.
        self.on_room: Callable[[], None] | None = None

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the executors; called from the worker's running event loop."""

    @property
    @abc.abstractmethod
    def free(self) -> int:
        """How many more jobs ``apply`` accepts right now."""

    @abc.abstractmethod
    def apply(self, job: Job) -> asyncio.Future[Outcome]:
        """Start ``job`` on a free executor; the future resolves when it ends."""

    @abc.abstractmethod
    async def stop(self, *, cold: bool) -> None:
        """Warm: let running jobs finish, then stop. Cold: stop at once, abandoning them."""

    def job_pid(self, job_id: int) -> int:
        """The pid of the process running ``job_id`` (the worker's own for in-process pools)."""
        return os.getpid()

    def terminate_job(self, job_id: int, signum: int) -> bool:
        """Stop the running ``job_id`` (``signum`` for process pools); False if not running."""
        return False

    async def resize(self, size: int) -> None:
        """Change the number of executors; busy ones leave after their current job."""
        raise NotImplementedError(f"the {self.name} pool cannot be resized")

    async def restart(self) -> None:
        """Replace every executor with a fresh one, without interrupting running jobs."""
        raise NotImplementedError(f"the {self.name} pool cannot be restarted")

    @property
    def size(self) -> int:
        """How many executors the pool has (or is heading for)."""
        return self.concurrency

    @property
    def waiting(self) -> int:
        """Jobs handed to the pool that have not started (queued inside its executors)."""
        return 0

    @property
    def pids(self) -> list[int]:
        """Process ids of the executors (the worker's own for in-process pools)."""
        return [os.getpid()]

    def info(self) -> dict[str, Any]:
        """Facts for ``stats()['pool']``."""
        return {"implementation": self.name, "max-concurrency": self.size,
                "processes": self.pids,
                "max-tasks-per-child": self.limits.max_tasks_per_child,
                "max-memory-per-child": self.limits.max_memory_per_child}
