"""``-P prefork`` (the default): child processes, one task at a time each.

The parent talks to each child over its own socket pair (length-prefixed pickles of
:class:`Job` and :class:`Outcome`; both ends are our own processes) and always knows which
child runs which job, so it can signal one child, notice its death, and start a fresh one in
the same slot. Children receive raw message bodies and decode them themselves; where the
result store allows it (:func:`~celeriac.results.open_child_store`), they store the results
too, in batches.

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
from ..results import ChildStore
from ..worker.execute import LOST, HandOver, Job, Outcome, execute, revoked_outcome
from .base import Pool, PoolLimits

if TYPE_CHECKING:
    from ..app import Celeriac

__all__ = ["PreforkPool"]

log = logging.getLogger("celeriac.pool")

_HEADER = struct.Struct("!I")
_MAX_PROCESSES = 4096
_PR_SET_PDEATHSIG = 1

#: A task type whose recent runs took less than this (seconds) counts as short: the adaptive
#: default queues several jobs in one child only when all of them are short, and a child
#: holds back an outcome only while the job it starts next is short.
SHORT_RUNTIME = 0.001
#: How many outcomes a child may hold back, and for how long (seconds) at most.
_HOLD_COUNT = 16
_HOLD_FOR = 0.002
#: A child the parent filled up to its depth sends what it holds once fewer jobs than this
#: wait in its queue, so the parent sends it more while it runs the last one instead of after
#: it runs dry. A child that was never full gets more without that (the parent is not
#: waiting for its outcomes to make room), so it holds on until its queue is empty.
_LOW_WATER = 2
#: Weight of the newest run in the per-task-name runtime average (a slower run counts fully).
_RUNTIME_WEIGHT = 0.25


def _frame(items: Any) -> bytes:
    data = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _frames(data: bytes) -> tuple[list[Any], bytes]:
    """The complete frames at the start of ``data``, unpickled, and what is left over."""
    items, pos, end = [], 0, len(data)
    view = memoryview(data)
    while end - pos >= _HEADER.size:
        size = _HEADER.unpack_from(data, pos)[0]
        stop = pos + _HEADER.size + size
        if stop > end:
            break
        items.append(pickle.loads(view[pos + _HEADER.size:stop]))
        pos = stop
    return items, data[pos:]


class _Reader:
    """Frames out of a byte stream read in arbitrary pieces (linear in a long frame too)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = 0  # bytes _buf must hold before a frame is complete

    def feed(self, data: bytes) -> list[Any]:
        if not self._buf:  # the usual case: whole frames, parsed without copying
            items, rest = _frames(data)
        else:
            self._buf += data
            if len(self._buf) < self._need:
                return []
            items, rest = _frames(bytes(self._buf))
        self._buf = bytearray(rest)
        self._need = (_HEADER.size + _HEADER.unpack_from(rest)[0]
                      if len(rest) >= _HEADER.size else 0)
        return items


def _runtime_average(averages: dict[str, float], name: str, runtime: float) -> None:
    """Fold ``runtime`` into ``name``'s recent average: a slow run counts at once, fast runs
    bring the average down gradually."""
    old = averages.get(name)
    if old is None or runtime >= old:
        averages[name] = runtime
    else:
        averages[name] = old + (runtime - old) * _RUNTIME_WEIGHT


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


def _term_handler(flags: mmap.mmap, index: int,
                  before_exit: Callable[[], None]) -> Callable[[int, Any], None]:
    """SIGTERM in a child: die if the parent asked for it, else ignore it.

    A TERM sent to the whole process group (systemd, ``kill -- -PGID``) must not kill
    children in the middle of a warm shutdown; the parent stops them when their tasks end.
    ``before_exit`` sends the outcomes the child still holds back.
    """
    def on_term(signum: int, frame: Any) -> None:
        if flags[index]:
            with contextlib.suppress(Exception):
                before_exit()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return on_term


class _SoftLimit:
    """Arms ``SIGALRM`` for a job's soft time limit; the handler raises inside the task.

    Between soft limits the same timer serves ``otherwise`` (a child's deadline for the
    outcomes it holds back: jobs with a soft limit never start while it holds any).
    """

    def __init__(self, otherwise: Callable[[], None]) -> None:
        self.armed = False
        self.otherwise = otherwise
        signal.signal(signal.SIGALRM, self._fire)

    def _fire(self, signum: int, frame: Any) -> None:
        if self.armed:
            self.armed = False
            raise SoftTimeLimitExceeded("soft time limit exceeded")
        self.otherwise()

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


class _Progress:
    """Shared memory where each child counts the jobs it has started and finished.

    A child may hold back outcomes while it goes on with queued jobs, so the parent reads
    these counters whenever it must know which job a child is running right now (terminate,
    hard time limits, a child's death).
    """

    _ROW = struct.Struct("2Q")

    def __init__(self) -> None:
        self._mem = mmap.mmap(-1, (_MAX_PROCESSES + 1) * self._ROW.size)

    def reset(self, index: int) -> None:
        self._ROW.pack_into(self._mem, index * self._ROW.size, 0, 0)

    def set(self, index: int, started: int, finished: int) -> None:
        self._ROW.pack_into(self._mem, index * self._ROW.size, started, finished)

    def read(self, index: int) -> tuple[int, int]:
        """``(started, finished)`` of the child in slot ``index``."""
        started, finished = self._ROW.unpack_from(self._mem, index * self._ROW.size)
        return started, finished


def _over_limits(limits: PoolLimits, done: int) -> bool:
    if limits.max_tasks_per_child and done >= limits.max_tasks_per_child:
        return True
    if limits.max_memory_per_child:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > limits.max_memory_per_child
    return False


class _Channel:
    """A child's end of its socket: job tuples in, outcome tuples out.

    Jobs arrive as frames holding lists of job tuples; outcomes leave as frames holding
    ``(retiring, [outcome tuples])``. An outcome is held back only while the child goes on
    at once with another queued job of a task type that has been short in this process (no
    time limits, at most ``_HOLD_COUNT`` outcomes): a child sends what it holds when its
    queue is empty, or, if the parent had given it as many jobs as it takes (``depth``),
    when the queue is down to fewer than ``_LOW_WATER`` jobs (so the parent sends more
    while it runs those); a job that runs long (``_HOLD_FOR`` seconds after the first held
    outcome) is interrupted by ``SIGALRM`` to send them.

    With a ``store`` (:func:`~celeriac.results.open_child_store`), the
    results of the held outcomes are stored in one batch just before they are sent, so the
    worker acks ``acks_late`` messages only after their results are in; if that fails, or
    the outcomes go out from a signal handler, the results travel with the outcomes and the
    worker stores them.
    """

    def __init__(self, sock: socket.socket, store: ChildStore | None = None,
                 depth: int = 1) -> None:
        self.sock = sock
        self.store = store
        self.depth = depth  # jobs the parent gives it at most (finished, unreported included)
        self.full = False  # it had that many since it last sent outcomes
        self.queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self.held: list[tuple[Any, ...]] = []
        self.replies: list[str | None] = []  # reply_to of each held outcome's job
        self.held_since = 0.0
        self.sending = False
        self.alarm = False  # the timer for the held outcomes is set
        self.overdue = False  # it went off between jobs
        self.in_job = False
        self.runtimes: dict[str, float] = {}
        self._reader = _Reader()

    def take(self, block: bool) -> bool:
        """Read what the parent has sent into ``queue`` (waiting for a whole frame if
        ``block``); False at EOF."""
        while True:
            try:
                data = self.sock.recv(1 << 18, 0 if block else socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            if not data:
                return False
            batches = self._reader.feed(data)
            for batch in batches:
                self.queue.extend(batch)
            if len(self.queue) + len(self.held) + self.in_job >= self.depth:
                self.full = True
            if batches or not block:
                return True

    def next_job(self) -> Job | None:
        """The next job, waiting for one if none is queued; None when the parent is done."""
        if not self.queue and not self.take(block=True):
            return None
        return Job(*self.queue.popleft())

    def starting(self) -> None:
        """A job starts; outcomes held back past their time (the timer went off between
        jobs) go out first."""
        if self.overdue and self.held:
            self.send_held(False)
        self.in_job = True

    def finished(self, job: Job, outcome: Outcome, retiring: bool) -> None:
        """Send ``outcome`` now, or hold it back while the next job is a short one."""
        self.in_job = False
        _runtime_average(self.runtimes, job.name, outcome.runtime)
        if not self.held:
            self.held_since = time.monotonic()
        self.held.append(outcome.to_tuple())
        self.replies.append(job.reply_to)
        if not self.queue:
            self.take(block=False)
        if (retiring or not self.queue or (self.full and len(self.queue) < _LOW_WATER)
                or not self._may_hold(self.queue[0])):
            self.send_held(retiring)
        elif not self.alarm:  # one timer for the whole batch, not one per job
            left = _HOLD_FOR - (time.monotonic() - self.held_since)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.0001))
            self.alarm = True

    def hold_expired(self) -> None:
        """``SIGALRM`` for the held outcomes: send them from within a job that runs long
        (without storing: the job may be using the result store's connection); between
        jobs, :meth:`starting` sends them."""
        self.alarm = False
        if self.in_job:
            self.before_exit()
        else:
            self.overdue = True

    def _may_hold(self, upcoming: tuple[Any, ...]) -> bool:
        # a job tuple (Job.to_tuple): the task name at 2, the hard time limit at 9
        return (len(self.held) < _HOLD_COUNT and not upcoming[9] and not upcoming[10]
                and self.runtimes.get(upcoming[2], 1.0) < SHORT_RUNTIME
                and time.monotonic() - self.held_since < _HOLD_FOR)

    def send_held(self, retiring: bool, store: bool = True) -> None:
        if self.alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.alarm = False
        self.overdue = False
        self.full = False
        if self.held:
            if store and self.store is not None:
                self._store_results()
            self.sending = True  # (a signal handler sending in between would garble frames)
            try:
                frame, self.held, self.replies = _frame((retiring, self.held)), [], []
                self.sock.sendall(frame)
            finally:
                self.sending = False

    def _store_results(self) -> None:
        """Store the held outcomes' results (an outcome tuple has them at 8) in one batch
        per ``reply_to``; once stored, the outcomes go without them."""
        assert self.store is not None
        by_reply: dict[str | None, list[dict[str, Any]]] = {}
        for fields, reply_to in zip(self.held, self.replies, strict=True):
            if fields[8]:
                by_reply.setdefault(reply_to, []).extend(fields[8])
        if not by_reply:
            return
        try:
            for reply_to, metas in by_reply.items():
                self.store.store_many(metas, reply_to)
        except Exception as exc:
            log.warning("Pool child %d could not store %d result(s), the worker will: %s",
                        os.getpid(), sum(map(len, by_reply.values())), exc)
            return
        self.held = [(*fields[:8], ()) for fields in self.held]

    def before_exit(self) -> None:
        """Send what is held back (from a signal handler too: never in the middle of
        sending another frame, and without storing: the interrupted code may be using the
        result store's connection)."""
        if not self.sending:
            with contextlib.suppress(OSError):
                self.send_held(False, store=False)


def _child_main(app: Celeriac, sock: socket.socket, hostname: str, parent_pid: int,
                index: int, close_fds: list[int], flags: mmap.mmap, cancels: _CancelBoard,
                progress: _Progress, limits: PoolLimits, depth: int) -> None:
    """The body of a pool child: run jobs until the parent closes the socket or a limit
    (tasks or memory per child) says it is time to make way for a fresh process."""
    code = 0
    channel = _Channel(sock, depth=depth)
    try:
        channel.store = app.child_result_store()
        multiprocessing.current_process().name = f"PoolWorker-{index}"
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        for signum in (signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _term_handler(flags, index, channel.before_exit))
        for fd in close_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        _die_with_parent(parent_pid)
        if limits.child_setup is not None:
            limits.child_setup(index)
        soft, started, done = _SoftLimit(channel.hold_expired), 0, 0
        # Results are kept with the outcomes: the channel stores them in a batch before it
        # sends the outcomes (if it has a store), else the parent stores them in batches.
        hand_over = HandOver(app.conf.result_serializer)

        # Runs until the parent closes the socket: after reporting "retiring" (a limit was
        # reached) it still finishes the jobs already sent to it.
        while (job := channel.next_job()) is not None:
            started += 1
            progress.set(index, started, done)
            channel.starting()
            if cancels.holds(index, job.job_id):
                outcome = hand_over.attach(revoked_outcome(app, job, "revoked before it started",
                                                           store=hand_over))
            else:
                outcome = hand_over.attach(execute(app, job, hostname, soft.around, hand_over))
            done += 1
            progress.set(index, started, done)
            channel.finished(job, outcome, _over_limits(limits, done))
    except BaseException:
        log.exception("Pool child %d crashed", os.getpid())
        code = 1
        with contextlib.suppress(Exception):
            channel.before_exit()
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
        os._exit(code)


@dataclass
class _Child:
    index: int
    pid: int
    sock: socket.socket
    reader: _Reader = field(default_factory=_Reader)
    #: jobs sent and not known to be finished, in order: the first is running (or about to
    #: start), the rest wait in the child
    jobs: collections.deque[tuple[Job, asyncio.Future[Outcome]]] = field(
        default_factory=collections.deque)
    #: jobs the child has finished (its progress counters say so) whose outcomes it still
    #: holds back, in order
    finished: collections.deque[tuple[Job, asyncio.Future[Outcome]]] = field(
        default_factory=collections.deque)
    #: how many of ``jobs`` there are of each task name (adaptive mode asks if all are short)
    kinds: dict[str, int] = field(default_factory=dict)
    outbox: list[tuple[Any, ...]] = field(default_factory=list)  # job tuples not yet written
    sent: int = 0
    reported: int = 0  # outcomes received
    leaving: bool = False  # takes no more jobs; exits when the ones it has are done
    exit_reason: str | None = None
    timed_out: bool = False
    head: int = 0  # job_id of jobs[0] when its hard timer was set up
    head_since: float = 0.0  # when jobs[0] became the running job, as far as we know
    hard_timer: asyncio.TimerHandle | None = None

    @property
    def job(self) -> Job | None:
        """The running job."""
        return self.jobs[0][0] if self.jobs else None

    def add(self, job: Job, future: asyncio.Future[Outcome]) -> None:
        self.jobs.append((job, future))
        self.kinds[job.name] = self.kinds.get(job.name, 0) + 1

    def pop_first(self) -> tuple[Job, asyncio.Future[Outcome]]:
        item = self.jobs.popleft()
        name = item[0].name
        left = self.kinds[name] - 1
        if left:
            self.kinds[name] = left
        else:
            del self.kinds[name]
        return item


class PreforkPool(Pool):
    """Forked children in slots numbered 1..size, each running one job at a time.

    ``limits.pipeline`` says how many jobs a child may hold: 1 ("fair", only idle children
    get work), N > 1 (up to N each, "fast"), or 0 (the default, adaptive): up to
    :attr:`depth` each, but a busy child gets more only while every job it would hold is of
    a task type whose recent runs took less than :data:`SHORT_RUNTIME`, so a no-op flood is
    pipelined and a slow task never has others queued behind it.

    A child that dies, hits a hard time limit or retires (max tasks or memory per child) is
    replaced in the same slot, so process indexes stay within the pool size.
    """

    name = "prefork"
    #: jobs per child in adaptive mode
    adaptive_depth = 8
    #: adaptive mode queues nothing more behind a job running (to our knowledge) this long
    head_age = 0.005

    def __init__(self, app: Celeriac, *, concurrency: int, hostname: str, **kw: Any) -> None:
        super().__init__(app, concurrency=concurrency, hostname=hostname, **kw)
        self._children: dict[int, _Child] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._started = False  # from then on the I/O thread may be blocked in a fetch
        self._spawning: set[int] = set()
        # One byte per process index, shared with the children: "the parent asked you to stop".
        self._flags = mmap.mmap(-1, _MAX_PROCESSES + 1)
        self._cancels = _CancelBoard()
        self._progress = _Progress()
        self.adaptive = self.limits.pipeline <= 0
        self.depth = self.adaptive_depth if self.adaptive else self.limits.pipeline
        # What each child will store its results with: made here first (no connection yet),
        # so a result store URL it cannot use fails the start-up with a clear error instead
        # of every child that is forked.
        app.child_result_store()
        #: recent runtime per task name (see _runtime_average)
        self.runtimes: dict[str, float] = {}
        #: jobs no child could take when they came (adaptive mode) or whose child died before
        #: starting them; they go out in order as children make room
        self._backlog: collections.deque[tuple[Job, asyncio.Future[Outcome]]] = (
            collections.deque())
        self._unsent: list[_Child] = []  # children with an outbox to write
        self._where: dict[int, _Child] = {}  # job_id -> the child it was sent to

    # -- children -----------------------------------------------------------------------------
    def _fork(self, index: int) -> _Child:
        """Fork one child (runs on the I/O thread)."""
        self._flags[index] = 0
        self._cancels.reset(index)
        self._progress.reset(index)
        parent_end, child_end = socket.socketpair()
        keep = {child_end.fileno()}
        close_fds = [c.sock.fileno() for c in self._children.values()] + [parent_end.fileno()]
        with self.fork_guard:  # no other thread of ours is inside a connection library now
            pid = os.fork()
        if pid == 0:  # the child
            _child_main(self.app, child_end, self.hostname, os.getppid(), index,
                        [fd for fd in close_fds if fd not in keep], self._flags, self._cancels,
                        self._progress, self.limits, self.depth)
        child_end.close()
        return _Child(index, pid, parent_end)

    async def _spawn(self, index: int) -> None:
        assert self._loop is not None
        if index in self._spawning or index in self._children:
            return
        self._spawning.add(index)
        try:
            forked = self._loop.run_in_executor(self.io, self._fork, index)
            if self._started:  # a fetch waiting for messages would hold the fork back
                self.app.transport.wake()
            child = await forked
        finally:
            self._spawning.discard(index)
        if self._closing or index > self.concurrency:
            child.sock.close()  # EOF: it exits at once
            return
        self._children[index] = child
        self._loop.add_reader(child.sock.fileno(), self._on_readable, child)
        log.debug("Pool child %d started (pid %d)", index, child.pid)
        self._pump()
        if self.on_room is not None:
            self.on_room()

    async def _fill(self) -> None:
        await asyncio.gather(*(self._spawn(i) for i in range(1, self.concurrency + 1)
                               if i not in self._children))

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for index in range(1, self.concurrency + 1):
            await self._spawn(index)
        self._started = True

    def _on_readable(self, child: _Child) -> None:
        try:
            data = child.sock.recv(1 << 18)
        except OSError:
            data = b""
        if not data:
            self._on_exit(child)
            return
        batches = child.reader.feed(data)
        if batches:
            self._on_outcomes(child, batches)

    def _on_outcomes(self, child: _Child,
                     batches: list[tuple[bool, list[tuple[Any, ...]]]]) -> None:
        runtimes = self.runtimes
        for retiring, outcomes in batches:
            if retiring:
                child.leaving = True
            for fields in outcomes:
                _job, future = (child.finished.popleft() if child.finished
                                else child.pop_first())
                child.reported += 1
                self._where.pop(_job.job_id, None)
                outcome = Outcome(*fields)
                # inline _runtime_average (the common case: known name, fast run)
                old = runtimes.get(_job.name)
                if old is None or outcome.runtime >= old:
                    runtimes[_job.name] = outcome.runtime
                else:
                    runtimes[_job.name] = old + (outcome.runtime - old) * _RUNTIME_WEIGHT
                if not future.done():
                    future.set_result(outcome)
        if child.index > self.concurrency:
            child.leaving = True
        self._new_head(child)
        if not child.jobs and child.leaving:
            self._retire(child)
        if self._backlog:
            self._pump()

    def _sync(self, child: _Child) -> None:
        """Move the jobs the child has finished (but not reported) out of ``child.jobs``, so
        that ``child.jobs[0]`` is the job it runs now."""
        _started, done = self._progress.read(child.index)
        unreported = done - child.reported - len(child.finished)
        if unreported > 0 and child.jobs:
            for _ in range(min(unreported, len(child.jobs))):
                child.finished.append(child.pop_first())
            self._new_head(child)

    def _new_head(self, child: _Child) -> None:
        """``child.jobs[0]`` may have changed: it has started (or is about to), so arm its
        hard time limit. The timer of a job that is still the head keeps running."""
        head = child.jobs[0][0] if child.jobs else None
        job_id = head.job_id if head is not None else 0
        if job_id == child.head:
            return
        child.head = job_id
        if child.hard_timer is not None:
            child.hard_timer.cancel()
            child.hard_timer = None
        if head is None:
            return
        child.head_since = time.monotonic()
        if head.time_limit and self._loop is not None:
            child.hard_timer = self._loop.call_later(head.time_limit, self._hard_limit, child,
                                                     job_id, head.time_limit)

    def _retire(self, child: _Child) -> None:
        """Let ``child`` go: now if idle (closing its socket), else after its jobs."""
        child.leaving = True
        if not child.jobs and not child.finished:
            with contextlib.suppress(OSError):
                child.sock.shutdown(socket.SHUT_WR)

    def _on_exit(self, child: _Child) -> None:
        assert self._loop is not None
        self._sync(child)
        self._loop.remove_reader(child.sock.fileno())
        child.sock.close()
        child.outbox.clear()
        if child.hard_timer is not None:
            child.hard_timer.cancel()
        self._children.pop(child.index, None)
        self._loop.run_in_executor(self.io, _reap, child.pid)
        # finished, but the outcome died with the child; then the one it was running
        lost = [(job, future, f"Worker process {child.pid} exited before reporting the "
                              "outcome of the task") for job, future in child.finished]
        if child.jobs:
            job, future = child.jobs.popleft()
            lost.append((job, future, child.exit_reason or (
                f"Worker process {child.pid} exited while running the task")))
            for job, _future in child.jobs:
                self._where.pop(job.job_id, None)
            self._backlog.extendleft(reversed(child.jobs))  # never started: run elsewhere
        child.finished.clear()
        child.jobs.clear()
        child.kinds.clear()
        for job, future, reason in lost:
            self._where.pop(job.job_id, None)
            if not future.done():
                future.set_result(Outcome(job.job_id, job.task_id, LOST, 0.0, reason,
                                          child.pid, timed_out=child.timed_out))
        if self._closing or child.index > self.concurrency:
            self._pump()
            return
        if not child.leaving:
            log.warning("Pool child %d (pid %d) exited; starting a replacement",
                        child.index, child.pid)
        self._loop.create_task(self._spawn(child.index))

    def _hard_limit(self, child: _Child, job_id: int, seconds: float) -> None:
        child.hard_timer = None
        self._sync(child)  # it may have finished the job and held back the outcome
        job = child.job
        if job is None or job.job_id != job_id:
            return
        child.exit_reason = f"Time limit ({seconds:g}s) exceeded"
        child.timed_out = True
        log.error("Hard time limit (%gs) exceeded for %s[%s]: killing pool child %d",
                  seconds, job.name, job.task_id, child.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)

    # -- placing jobs -------------------------------------------------------------------------
    def _short(self, name: str) -> bool:
        return self.runtimes.get(name, 1.0) < SHORT_RUNTIME

    def _queueable(self, child: _Child) -> bool:
        """Adaptive mode: may a busy ``child`` get more (short) jobs behind the ones it has?"""
        return (time.monotonic() - child.head_since < self.head_age
                and all(self._short(name) for name in child.kinds))

    def _accepting(self, child: _Child) -> int:
        """How many more jobs ``child`` takes now (adaptive mode: if they are short)."""
        if child.leaving:
            return 0
        held = len(child.jobs)
        room = self.depth - held
        if self.adaptive and held and not self._queueable(child):
            return 0
        quota = self.limits.max_tasks_per_child
        if quota:
            room = min(room, quota - child.sent)
        return max(0, room)

    def _takes(self, child: _Child, job: Job) -> bool:
        return bool(self._accepting(child)) and (
            not self.adaptive or not child.jobs or self._short(job.name))

    def _pick(self, job: Job) -> _Child | None:
        """The child with the fewest jobs that takes ``job``."""
        best = None
        for child in self._children.values():
            if best is not None and len(child.jobs) >= len(best.jobs):
                continue
            if self._takes(child, job):
                best = child
                if not child.jobs:
                    break
        return best

    def _send_to(self, child: _Child, job: Job, future: asyncio.Future[Outcome]) -> None:
        child.add(job, future)
        self._where[job.job_id] = child
        child.sent += 1
        if len(child.jobs) == 1:
            self._new_head(child)
        if not child.outbox:
            if not self._unsent and self._loop is not None:
                self._loop.call_soon(self._write_all)
            self._unsent.append(child)
        child.outbox.append(job.to_tuple())

    def _write_all(self) -> None:
        """Send each child the jobs given to it since the last call, in one write."""
        unsent, self._unsent = self._unsent, []
        for child in unsent:
            self._write(child)

    def _write(self, child: _Child) -> None:
        if not child.outbox:
            return
        jobs, child.outbox = child.outbox, []
        try:
            child.sock.sendall(_frame(jobs))
        except OSError:
            log.warning("Pool child %d (pid %d) is gone", child.index, child.pid)

    def _pump(self) -> None:
        """Send waiting jobs, in order, to children that take them."""
        backlog = self._backlog
        while backlog:
            job, future = backlog[0]
            if future.done():
                backlog.popleft()
                continue
            child = self._pick(job)
            if child is None:
                return
            backlog.popleft()
            self._send_to(child, job, future)

    # -- the contract -------------------------------------------------------------------------
    @property
    def free(self) -> int:
        capacity = sum(self._accepting(c) for c in self._children.values())
        return max(0, capacity - len(self._backlog))

    def apply(self, job: Job) -> asyncio.Future[Outcome]:
        assert self._loop is not None, "pool not started"
        future: asyncio.Future[Outcome] = self._loop.create_future()
        child = None if self._backlog else self._pick(job)
        if child is None:
            self._backlog.append((job, future))
            self._pump()
        else:
            self._send_to(child, job, future)
        return future

    def _child_of(self, job_id: int) -> _Child | None:
        child = self._where.get(job_id)
        return child if child is not None and self._children.get(child.index) is child else None

    def job_pid(self, job_id: int) -> int:
        child = self._child_of(job_id)
        return child.pid if child is not None else 0

    def terminate_job(self, job_id: int, signum: int) -> bool:
        """Send ``signum`` to the child running ``job_id``; False if none runs it."""
        child = self._child_of(job_id)
        if child is None:
            return False
        self._sync(child)
        if child.job is None or all(job.job_id != job_id for job, _ in child.jobs):
            return False  # finished; its outcome is on the way
        if child.job.job_id != job_id:
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
        for child in self._children.values():
            self._sync(child)
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
                self._write(child)
                with contextlib.suppress(OSError):
                    child.sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + (5.0 if cold else 30.0)
        while (self._children or self._spawning) and time.monotonic() < deadline:
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
        info["pipelining"] = ("adaptive" if self.adaptive
                              else "fair" if self.depth == 1 else "fixed")
        return info


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
