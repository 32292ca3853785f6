"""``-P prefork`` (the default): child processes, one task at a time each.

The parent talks to each child over its own socket pair (length-prefixed pickles of
:class:`Job` and :class:`Outcome`; both ends are our own processes) and always knows which
child runs which job, so it can signal one child, notice its death, and start a fresh one in
the same slot. Children receive raw message bodies and decode them themselves.

Forking happens on the worker's I/O thread, the only thread of the parent that touches
broker or result-store connections, so no other thread can hold their locks at fork time.
Children die with the parent: ``PR_SET_PDEATHSIG`` on Linux, and a watchdog thread that
notices re-parenting everywhere.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import logging
import mmap
import multiprocessing
import os
import pickle
import resource
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..exceptions import SoftTimeLimitExceeded
from ..protocol import dumps
from ..worker.execute import LOST, Job, Outcome, execute, revoked_outcome
from .base import Pool, PoolLimits

if TYPE_CHECKING:
    from ..app import Celeriac

__all__ = ["PreforkPool"]

log = logging.getLogger("celeriac.pool")

_HEADER = struct.Struct("!I")
_MAX_PROCESSES = 4096
_PR_SET_PDEATHSIG = 1


def _send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> Any:
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    body = _recv_exact(sock, _HEADER.unpack(header)[0])
    return None if body is None else pickle.loads(body)


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="celeriac-parent-watch", daemon=True).start()


def _term_handler(flags: mmap.mmap, index: int) -> Callable[[int, Any], None]:
    """SIGTERM in a child: die if the parent asked for it, else ignore it.

    A TERM sent to the whole process group (systemd, ``kill -- -PGID``) must not kill
    children in the middle of a warm shutdown; the parent stops them when their tasks end.
    """
    def on_term(signum: int, frame: Any) -> None:
        if flags[index]:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return on_term


class _SoftLimit:
    """Arms ``SIGALRM`` for a job's soft time limit; the handler raises inside the task."""

    def __init__(self) -> None:
        self.armed = False
        signal.signal(signal.SIGALRM, self._fire)

    def _fire(self, signum: int, frame: Any) -> None:
        if self.armed:
            self.armed = False
            raise SoftTimeLimitExceeded("soft time limit exceeded")

    @contextlib.contextmanager
    def around(self, job: Job) -> Iterator[None]:
        """Armed while the task body of ``job`` runs."""
        if not job.soft_time_limit:
            yield
            return
        self.armed = True
        signal.setitimer(signal.ITIMER_REAL, job.soft_time_limit)
        try:
            yield
        finally:
            self.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)


class _CancelBoard:
    """Shared memory where the parent posts ids of jobs it sent to a child but cancelled
    before they started (``-O fast`` queues several jobs per child)."""

    SLOTS = 16
    _ROW = struct.Struct(f"{SLOTS}Q")

    def __init__(self) -> None:
        self._mem = mmap.mmap(-1, (_MAX_PROCESSES + 1) * self._ROW.size)
        self._next: dict[int, int] = {}

    def reset(self, index: int) -> None:
        self._ROW.pack_into(self._mem, index * self._ROW.size, *([0] * self.SLOTS))

    def post(self, index: int, job_id: int) -> None:
        slot = self._next.get(index, 0)
        self._next[index] = (slot + 1) % self.SLOTS
        struct.pack_into("Q", self._mem, index * self._ROW.size + slot * 8, job_id)

    def holds(self, index: int, job_id: int) -> bool:
        return job_id in self._ROW.unpack_from(self._mem, index * self._ROW.size)


def _over_limits(limits: PoolLimits, done: int) -> bool:
    if limits.max_tasks_per_child and done >= limits.max_tasks_per_child:
        return True
    if limits.max_memory_per_child:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > limits.max_memory_per_child
    return False


def _child_main(app: Celeriac, sock: socket.socket, hostname: str, parent_pid: int,
                index: int, close_fds: list[int], flags: mmap.mmap, cancels: _CancelBoard,
                limits: PoolLimits) -> None:
    """The body of a pool child: run jobs until the parent closes the socket or a limit
    (tasks or memory per child) says it is time to make way for a fresh process."""
    code = 0
    try:
        multiprocessing.current_process().name = f"PoolWorker-{index}"
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        for signum in (signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _term_handler(flags, index))
        for fd in close_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        _die_with_parent(parent_pid)
        if limits.child_setup is not None:
            limits.child_setup(index)
        soft, done = _SoftLimit(), 0
        results: list[dict[str, Any]] = []

        serializer = app.conf.result_serializer

        def hand_over(meta: dict[str, Any], reply_to: str | None) -> None:
            # Serialized here, so a result that can't be stored fails in the task's process
            # (as the store would encode it; without opening the store and loading its
            # client library in every child); the parent stores a batch in one round trip.
            dumps(meta, serializer)
            results.append(meta)

        # Runs until the parent closes the socket: after reporting "retiring" (a limit was
        # reached) it still finishes the jobs already sent to it.
        while (job := _recv(sock)) is not None:
            if cancels.holds(index, job.job_id):
                outcome = revoked_outcome(app, job, "revoked before it started")
            else:
                outcome = execute(app, job, hostname, soft.around, hand_over)
                if results:
                    outcome = dataclasses.replace(outcome, results=tuple(results))
                    results.clear()
            done += 1
            _send(sock, (outcome, _over_limits(limits, done)))
    except BaseException:
        log.exception("Pool child %d crashed", os.getpid())
        code = 1
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
        os._exit(code)


@dataclass
class _Child:
    index: int
    pid: int
    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)
    #: jobs sent and not finished, in order: the first is running, the rest wait in the child
    jobs: collections.deque[tuple[Job, asyncio.Future[Outcome]]] = field(
        default_factory=collections.deque)
    sent: int = 0
    leaving: bool = False  # takes no more jobs; exits when the ones it has are done
    exit_reason: str | None = None
    timed_out: bool = False
    hard_timer: asyncio.TimerHandle | None = None

    @property
    def job(self) -> Job | None:
        """The running job."""
        return self.jobs[0][0] if self.jobs else None


class PreforkPool(Pool):
    """Forked children, one job at a time each, in slots numbered 1..size.

    A child that dies, hits a hard time limit or retires (max tasks or memory per child) is
    replaced in the same slot, so process indexes stay within the pool size.
    """

    name = "prefork"

    def __init__(self, app: Celeriac, *, concurrency: int, hostname: str, **kw: Any) -> None:
        super().__init__(app, concurrency=concurrency, hostname=hostname, **kw)
        self._children: dict[int, _Child] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._spawning: set[int] = set()
        # One byte per process index, shared with the children: "the parent asked you to stop".
        self._flags = mmap.mmap(-1, _MAX_PROCESSES + 1)
        self._cancels = _CancelBoard()
        self.depth = max(1, self.limits.pipeline)
        self._backlog: collections.deque[tuple[Job, asyncio.Future[Outcome]]] = (
            collections.deque())  # jobs of a child that died before starting them

    # -- children -----------------------------------------------------------------------------
    def _fork(self, index: int) -> _Child:
        """Fork one child (runs on the I/O thread)."""
        self._flags[index] = 0
        self._cancels.reset(index)
        parent_end, child_end = socket.socketpair()
        keep = {child_end.fileno()}
        close_fds = [c.sock.fileno() for c in self._children.values()] + [parent_end.fileno()]
        with self.fork_guard:  # no other thread of ours is inside a connection library now
            pid = os.fork()
        if pid == 0:  # the child
            _child_main(self.app, child_end, self.hostname, os.getppid(), index,
                        [fd for fd in close_fds if fd not in keep], self._flags, self._cancels,
                        self.limits)
        child_end.close()
        return _Child(index, pid, parent_end)

    async def _spawn(self, index: int) -> None:
        assert self._loop is not None
        if index in self._spawning or index in self._children:
            return
        self._spawning.add(index)
        try:
            child = await self._loop.run_in_executor(self.io, self._fork, index)
        finally:
            self._spawning.discard(index)
        if self._closing or index > self.concurrency:
            child.sock.close()  # EOF: it exits at once
            return
        self._children[index] = child
        self._loop.add_reader(child.sock.fileno(), self._on_readable, child)
        log.debug("Pool child %d started (pid %d)", index, child.pid)
        self._pump()

    async def _fill(self) -> None:
        await asyncio.gather(*(self._spawn(i) for i in range(1, self.concurrency + 1)
                               if i not in self._children))

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for index in range(1, self.concurrency + 1):
            await self._spawn(index)

    def _on_readable(self, child: _Child) -> None:
        try:
            data = child.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            self._on_exit(child)
            return
        child.buffer += data
        while len(child.buffer) >= _HEADER.size:
            size = _HEADER.unpack_from(child.buffer)[0]
            if len(child.buffer) < _HEADER.size + size:
                break
            payload = bytes(child.buffer[_HEADER.size:_HEADER.size + size])
            del child.buffer[:_HEADER.size + size]
            outcome, retiring = pickle.loads(payload)
            self._on_outcome(child, outcome, retiring)

    def _on_outcome(self, child: _Child, outcome: Outcome, retiring: bool) -> None:
        if child.hard_timer is not None:
            child.hard_timer.cancel()
            child.hard_timer = None
        _job, future = child.jobs.popleft()
        if retiring or child.index > self.concurrency:
            child.leaving = True
        if child.jobs:
            self._started(child)
        elif child.leaving:
            self._retire(child)
        if not future.done():
            future.set_result(outcome)
        self._pump()

    def _started(self, child: _Child) -> None:
        """The child's first job has just started: arm its hard time limit."""
        job = child.jobs[0][0]
        if job.time_limit and self._loop is not None:
            child.hard_timer = self._loop.call_later(job.time_limit, self._hard_limit, child,
                                                     job.job_id, job.time_limit)

    def _retire(self, child: _Child) -> None:
        """Let ``child`` go: now if idle (closing its socket), else after its jobs."""
        child.leaving = True
        if not child.jobs:
            with contextlib.suppress(OSError):
                child.sock.shutdown(socket.SHUT_WR)

    def _on_exit(self, child: _Child) -> None:
        assert self._loop is not None
        self._loop.remove_reader(child.sock.fileno())
        child.sock.close()
        if child.hard_timer is not None:
            child.hard_timer.cancel()
        self._children.pop(child.index, None)
        self._loop.run_in_executor(self.io, _reap, child.pid)
        if child.jobs:
            job, future = child.jobs.popleft()
            reason = child.exit_reason or (
                f"Worker process {child.pid} exited while running the task")
            if not future.done():
                future.set_result(Outcome(job.job_id, job.task_id, LOST, 0.0, reason,
                                          child.pid, timed_out=child.timed_out))
            self._backlog.extendleft(reversed(child.jobs))  # never started: run elsewhere
            child.jobs.clear()
        if self._closing or child.index > self.concurrency:
            self._pump()
            return
        if not child.leaving:
            log.warning("Pool child %d (pid %d) exited; starting a replacement",
                        child.index, child.pid)
        self._loop.create_task(self._spawn(child.index))

    def _hard_limit(self, child: _Child, job_id: int, seconds: float) -> None:
        child.hard_timer = None
        job = child.job
        if job is None or job.job_id != job_id:
            return
        child.exit_reason = f"Time limit ({seconds:g}s) exceeded"
        child.timed_out = True
        log.error("Hard time limit (%gs) exceeded for %s[%s]: killing pool child %d",
                  seconds, job.name, job.task_id, child.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)

    def _accepting(self, child: _Child) -> int:
        """How many more jobs ``child`` takes now."""
        if child.leaving:
            return 0
        room = self.depth - len(child.jobs)
        quota = self.limits.max_tasks_per_child
        if quota:
            room = min(room, quota - child.sent)
        return max(0, room)

    def _send_to(self, child: _Child, job: Job, future: asyncio.Future[Outcome]) -> None:
        child.jobs.append((job, future))
        child.sent += 1
        if len(child.jobs) == 1:
            self._started(child)
        try:
            _send(child.sock, job)
        except OSError:
            log.warning("Pool child %d (pid %d) is gone", child.index, child.pid)

    def _pick(self) -> _Child | None:
        best = None
        for child in self._children.values():
            if self._accepting(child) and (best is None or len(child.jobs) < len(best.jobs)):
                best = child
        return best

    def _pump(self) -> None:
        """Send jobs left over by a dead child to children that can take them."""
        while self._backlog and (child := self._pick()) is not None:
            job, future = self._backlog.popleft()
            if not future.done():
                self._send_to(child, job, future)

    # -- the contract -------------------------------------------------------------------------
    @property
    def free(self) -> int:
        capacity = sum(self._accepting(c) for c in self._children.values())
        return max(0, capacity - len(self._backlog))

    def apply(self, job: Job) -> asyncio.Future[Outcome]:
        assert self._loop is not None, "pool not started"
        future: asyncio.Future[Outcome] = self._loop.create_future()
        child = self._pick()
        if child is None:
            self._backlog.append((job, future))
        else:
            self._send_to(child, job, future)
        return future

    def _child_of(self, job_id: int) -> _Child | None:
        for child in self._children.values():
            if any(job.job_id == job_id for job, _ in child.jobs):
                return child
        return None

    def job_pid(self, job_id: int) -> int:
        child = self._child_of(job_id)
        return child.pid if child is not None else 0

    def terminate_job(self, job_id: int, signum: int) -> bool:
        """Send ``signum`` to the child running ``job_id``; False if none runs it."""
        child = self._child_of(job_id)
        if child is None:
            return False
        if child.job is not None and child.job.job_id != job_id:
            self._cancels.post(child.index, job_id)  # queued in the child, not started
            return True
        child.exit_reason = f"terminated by {signal.Signals(signum).name}"
        self._flags[child.index] = 1
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signum)
        return True

    @property
    def size(self) -> int:
        return self.concurrency

    @property
    def waiting(self) -> int:
        return len(self._backlog) + sum(max(0, len(c.jobs) - 1)
                                        for c in self._children.values())

    async def resize(self, size: int) -> None:
        if not 1 <= size <= _MAX_PROCESSES:
            raise ValueError(f"pool size must be between 1 and {_MAX_PROCESSES}, not {size}")
        self.concurrency = size
        for child in list(self._children.values()):
            if child.index > size:
                self._retire(child)
        await self._fill()

    async def restart(self) -> None:
        for child in list(self._children.values()):
            self._retire(child)  # each is replaced in its slot when it exits

    async def stop(self, *, cold: bool) -> None:
        assert self._loop is not None
        self._closing = True
        children = list(self._children.values())
        for child in children:
            child.leaving = True
            if cold:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
            else:
                with contextlib.suppress(OSError):
                    child.sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + (5.0 if cold else 30.0)
        while self._children and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for child in list(self._children.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)

    @property
    def pids(self) -> list[int]:
        return sorted(c.pid for c in self._children.values())

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["process-indexes"] = {c.pid: c.index for c in self._children.values()}
        info["jobs-per-process"] = self.depth
        return info


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
