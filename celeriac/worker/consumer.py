"""The consumer: the worker's event loop between the broker and the pool.

It fetches messages in batches (up to the prefetch count), checks each one (headers, known
task, accepted content, delivery count, revoked, expired), holds ETA tasks on a timer,
hands due tasks to the pool as slots free up, acks (early by default, after the task with
``acks_late``) in batches, and renews its leases from a heartbeat. Nothing in it blocks:
fetches run on the worker's I/O thread (with the early acks of the tasks the last fetch
started, :meth:`Transport.ack_then_fetch`), everything else that talks to the broker or the
result store (other acks, results, requeues, dead letters, lease renewals) on a settle thread
of its own, so a finished task's result never waits for a fetch that is blocked waiting for
messages to return, nor behind its own ack.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from .. import states
from ..events import EventDispatcher
from ..exceptions import (
    ConfigurationError,
    DecodeError,
    TaskError,
    TaskRevokedError,
    TimeLimitExceeded,
)
from ..protocol import content_type_for, read_task_headers
from ..results import make_meta
from ..transports import Delivery
from .execute import LOST, REJECTED, Job, Outcome, failure_meta
from .forkguard import ForkGuard
from .ratelimit import TokenBucket, parse_rate
from .request import Request
from .state import WorkerState

if TYPE_CHECKING:
    from ..app import Celeriac
    from ..pools.base import Pool
    from ..task import Task

__all__ = ["Consumer"]

log = logging.getLogger("celeriac.worker")
T = TypeVar("T")

#: Rate-limited tasks waiting for a token don't hold back other task types: up to this many
#: times the prefetch count of them may wait without counting against the prefetch.
_RATE_LIMITED_ALLOWANCE = 10
#: How long a busy worker lets acks and results gather before sending them in one batch.
_FLUSH_WAIT = 0.002


class QoS:
    """The prefetch count: how many unstarted messages the consumer may hold."""

    def __init__(self, value: int) -> None:
        self.value = max(1, value)

    def increment_eventually(self, n: int = 1) -> int:
        self.value = max(1, self.value + int(n))
        return self.value

    def decrement_eventually(self, n: int = 1) -> int:
        return self.increment_eventually(-int(n))

    def set(self, value: int) -> int:
        self.value = max(1, int(value))
        return self.value


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Consumer:
    """Moves messages from the broker to the pool and settles them."""

    def __init__(self, app: Celeriac, pool: Pool, *, hostname: str, queues: Sequence[str],
                 prefetch_count: int, io: ThreadPoolExecutor, state: WorkerState,
                 events: EventDispatcher | None = None, poll_timeout: float = 1.0,
                 fork_guard: ForkGuard | None = None) -> None:
        self.app = app
        self.pool = pool
        pool.on_room = self.kick  # a replacement process takes what waits at once
        self.hostname = hostname
        self.queues = list(queues)
        self.declarations: dict[str, dict[str, Any]] = {}
        self.qos = QoS(prefetch_count)
        self.events = events or EventDispatcher(hostname, lambda _: None, lambda: 0)
        self.io_executor = io
        self.fork_guard = fork_guard or ForkGuard()
        self.settle_executor = ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix="celeriac-settle")
        self.state = state
        self.poll_timeout = poll_timeout
        self.transport = app.transport
        self.clock = app.clock
        self.consumer_id = f"{hostname}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.accept = {content_type_for(c) for c in app.conf.accept_content}
        self.max_deliveries = int(app.conf.broker_max_deliveries)
        try:
            self.cleanup_every = float(app.conf.result_cleanup_interval or 0)
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"result_cleanup_interval must be a number of seconds (0 turns the clean-up "
                f"off), not {app.conf.result_cleanup_interval!r}") from None
        self.stopping = False
        self._job_ids = itertools.count(1)
        self._acks: list[str] = []
        self._piggyback: list[str] | None = None
        self._results: list[tuple[dict[str, Any], str | None]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._flush_wait: asyncio.Future[None] | None = None
        self._room = asyncio.Event()
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Future[Any]] = set()
        self._fetch_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._futures: dict[int, asyncio.Future[Outcome]] = {}
        self._abort = asyncio.Event()
        self._buckets: dict[str, TokenBucket] = {}
        self._rate_wakeups: dict[str, asyncio.TimerHandle] = {}
        if not app.conf.worker_disable_rate_limits:
            for task in app.tasks.values():
                if task.rate_limit:
                    self._set_bucket(task.name, task.rate_limit)

    # -- I/O: fetches on the I/O thread, the rest on the settle thread -----------------------
    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        # Holds the fork guard: a prefork child is never forked while this thread is inside
        # a connection library (a task in the child may publish with the same client).
        with self.fork_guard.shared():
            return fn(*args)

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking broker/result call on the settle thread (in submission order)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.settle_executor, self._guarded, fn, *args)

    def io_soon(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the I/O thread without waiting; failures are logged with ``what``."""
        future = asyncio.ensure_future(self.io(fn, *args))
        self._background.add(future)

        def done(f: asyncio.Future[Any]) -> None:
            self._background.discard(f)
            if not f.cancelled() and f.exception() is not None:
                log.error("Could not %s: %r", what, f.exception())

        future.add_done_callback(done)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._fetch_task = asyncio.ensure_future(self._fetch_loop())
        self._heartbeat_task = asyncio.ensure_future(self._heartbeat_loop())

    async def stop(self, *, cold: bool) -> None:
        """Stop consuming; give back what has not started; finish (warm) or drop (cold)."""
        self.stopping = True
        self._room.set()
        self.transport.wake()
        if self._fetch_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._fetch_task
        for handle in self._timers.values():
            handle.cancel()
        for handle in self._rate_wakeups.values():
            handle.cancel()
        held = [*self.state.reserved, *self.state.scheduled.values(),
                *(r for q in self.state.rate_limited.values() for r in q)]
        self.state.reserved.clear()
        self.state.scheduled.clear()
        self.state.rate_limited.clear()
        await self._give_back(held, "unstarted")
        if not cold and self._futures:
            log.info("Waiting for %d running task(s) to finish", len(self._futures))
            running: asyncio.Future[Any] = asyncio.gather(*self._futures.values(),
                                                          return_exceptions=True)
            aborted: asyncio.Future[Any] = asyncio.ensure_future(self._abort.wait())
            await asyncio.wait([running, aborted], return_when=asyncio.FIRST_COMPLETED)
            aborted.cancel()
            cold = self._abort.is_set()
        if cold:
            await self._give_back([r for r in self.state.active.values()
                                   if r.acks_late and not r.acknowledged], "running acks_late")
        await self.pool.stop(cold=cold)
        await self._flush()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task

    async def close(self) -> None:
        """After :meth:`stop` (and the worker's last events): end the settle thread."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.settle_executor.shutdown, wait=True))

    def kick(self) -> None:
        """Re-check the pool for free slots and the prefetch room (after a resize)."""
        self._dispatch()

    def abort(self) -> None:
        """Turn a warm shutdown in progress into a cold one."""
        self._abort.set()

    async def _give_back(self, requests: list[Request], what: str) -> None:
        if not requests:
            return
        log.info("Returning %d %s task(s) to the queue", len(requests), what)
        for request in requests:
            request.acknowledged = True  # settled: nothing else may ack or requeue it
        await self.io(self.transport.requeue, [r.delivery.tag for r in requests])

    # -- fetching -----------------------------------------------------------------------------
    def _room_left(self) -> int:
        unacked_running = sum(1 for r in self.state.active.values() if not r.acknowledged)
        parked = sum(len(q) for q in self.state.rate_limited.values())
        over = max(0, parked - _RATE_LIMITED_ALLOWANCE * self.qos.value)
        return self.qos.value - len(self.state.reserved) - unacked_running - over

    async def _fetch_loop(self) -> None:
        backoff = 0.1
        loop = asyncio.get_running_loop()
        acks: list[str] = []  # early acks of the tasks just started, sent with the next fetch
        while not self.stopping:
            room = self._room_left()
            if room <= 0:
                self._settle_acks(acks)
                acks = []
                self._room.clear()
                await self._room.wait()
                continue
            try:
                # Early acks of the tasks the last fetch started ride along with this fetch,
                # so the settle thread stays free for results (a lone task's result never
                # queues behind its own ack). What the transport can do at once (acks on a
                # connection of its own, deliveries it holds already), or in one round trip
                # this loop waits for, skips the I/O hop.
                ready = self.transport.fetch_ready(acks, self.consumer_id, self.queues, room)
                soon = ready is None
                if soon:
                    ready = await self._fetch_soon(acks, room)
                    soon = ready is not None
                if ready is not None:
                    acks = []
                if ready:
                    deliveries = ready
                else:
                    deliveries = await loop.run_in_executor(
                        self.io_executor, self.transport.ack_then_fetch, acks,
                        self.consumer_id, self.queues, room, self.poll_timeout)
                backoff = 0.1
            except Exception as exc:
                log.error("Broker error while fetching (%s: %s); retrying in %.1fs",
                          type(exc).__name__, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            finally:
                acks = []
            for delivery in deliveries:
                self._on_delivery(delivery)
            self._piggyback = acks
            try:
                self._dispatch()
            finally:
                self._piggyback = None
            # The pool writes the jobs it was just given before the I/O thread takes the GIL
            # for the next fetch (a fetch this loop waits for is sent first: the writes go
            # while the broker works on it).
            if not soon:
                await asyncio.sleep(0)
        self._settle_acks(acks)

    async def _fetch_soon(self, acks: list[str], room: int) -> list[Delivery] | None:
        """:meth:`Transport.fetch_soon`, its reply awaited on this loop; None if the
        transport cannot, or the round trip failed (``acks`` then go with the next fetch)."""
        pending = self.transport.fetch_soon(acks, self.consumer_id, self.queues, room)
        if pending is None:
            return None
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()
        fd = pending.fileno()
        loop.add_reader(fd, _resolve, readable)
        try:
            await readable
        except BaseException:
            pending.abandon()
            raise
        finally:
            loop.remove_reader(fd)
        return pending.finish()

    def _settle_acks(self, acks: list[str]) -> None:
        if acks:
            self._acks.extend(acks)
            self._flush_soon()

    def _reject(self, delivery: Delivery, reason: str) -> None:
        task_id = delivery.message.headers.get("id") if isinstance(
            delivery.message.headers, dict) else None
        log.error("Rejected message %s from queue %r to the dead-letter store: %s",
                  task_id or f"<no id, tag {delivery.tag}>", delivery.queue, reason)
        if task_id:
            self.events.task("task-rejected", str(task_id), requeue=False, reason=reason)
        self.io_soon("dead-letter a message", self.transport.dead_letter, delivery, reason)

    def _on_delivery(self, delivery: Delivery) -> None:
        message = delivery.message
        try:
            headers = read_task_headers(message.headers)
        except DecodeError as exc:
            self._reject(delivery, str(exc))
            return
        if delivery.deliveries > self.max_deliveries:
            self._reject(delivery, f"delivered {delivery.deliveries} times (limit "
                         f"broker_max_deliveries={self.max_deliveries}): it keeps failing "
                         "before it can be acknowledged")
            return
        if message.content_type not in self.accept:
            self._reject(delivery, f"content type {message.content_type!r} is not in "
                         f"accept_content {sorted(self.accept)}")
            return
        task = self.app.tasks.get(headers.task)
        if task is None:
            self._reject(delivery, f"unknown task {headers.task!r}: no task of that name is "
                         "registered (is its module imported with -I/--include or 'imports'?)")
            return
        job = Job(next(self._job_ids), headers.id, headers.task, message.body,
                  message.content_type, message.content_encoding, dict(message.headers),
                  {"exchange": "", "routing_key": delivery.queue, "priority": delivery.priority,
                   "redelivered": delivery.redelivered},
                  message.properties.get("reply_to"))
        request = Request(job, delivery, headers, task, acks_late=task.acks_late)
        log.info("Task %s[%s] received", request.name, request.id)
        if self.events.enabled:  # its fields cost something to build: only when wanted
            self.events.task("task-received", request.id, name=request.name,
                             args=headers.argsrepr, kwargs=headers.kwargsrepr,
                             root_id=headers.root_id, parent_id=headers.parent_id,
                             retries=headers.retries, eta=request.eta_iso(),
                             expires=headers.expires.isoformat() if headers.expires else None)
        delay = request.eta_delay(self.clock())
        if delay > 0:
            self.state.scheduled[job.job_id] = request
            loop = asyncio.get_running_loop()
            self._timers[job.job_id] = loop.call_later(delay, self._eta_due, request)
        else:
            self.state.reserved.append(request)

    def _eta_due(self, request: Request) -> None:
        self._timers.pop(request.job.job_id, None)
        if self.state.scheduled.pop(request.job.job_id, None) is not None:
            self.state.reserved.append(request)
            self._dispatch()

    # -- dispatching and settling -------------------------------------------------------------
    def _dispatch(self) -> None:
        for name, waiting in list(self.state.rate_limited.items()):
            while waiting and not self.stopping and self.pool.free > 0:
                if not self._token_for(name):
                    break
                self._start_or_settle(waiting.popleft())
            if not waiting:
                del self.state.rate_limited[name]
        reserved = self.state.reserved
        while reserved and not self.stopping and self.pool.free > 0:
            request = reserved.popleft()
            name = request.name
            if self.state.rate_limited.get(name) or (
                    name in self._buckets and not self._token_for(name)):
                self.state.rate_limited.setdefault(name, collections.deque()).append(request)
                continue
            self._start_or_settle(request)
        self._room.set()

    def _start_or_settle(self, request: Request) -> None:
        if request.id in self.state.revoked:
            self._settle_revoked(request, "revoked")
        elif request.expired(self.clock()):
            self._settle_revoked(request, "expired")
        else:
            self._start(request)

    def _token_for(self, name: str) -> bool:
        """Take a rate-limit token for task ``name``; if none, wake up when one is due."""
        bucket = self._buckets.get(name)
        if bucket is None or bucket.take():
            return True
        if name not in self._rate_wakeups:
            loop = asyncio.get_running_loop()
            self._rate_wakeups[name] = loop.call_later(bucket.wait_time(), self._rate_wake,
                                                       name)
        return False

    def _rate_wake(self, name: str) -> None:
        self._rate_wakeups.pop(name, None)
        self._dispatch()

    def _settle_revoked(self, request: Request, why: str) -> None:
        log.info("Discarding %s task %s[%s]", why, request.name, request.id)
        self.events.task("task-revoked", request.id, terminated=False, signum=None,
                         expired=why == "expired")
        self._ack(request)
        meta = make_meta(request.id, states.REVOKED,
                         {"exc_type": TaskRevokedError.__name__,
                          "exc_module": TaskRevokedError.__module__, "exc_message": [why]})
        self.io_soon("store a revoked result", self.app.backend.store, meta,
                     request.job.reply_to)

    def _limits(self, request: Request) -> tuple[float | None, float | None]:
        """(hard, soft) for a run starting now: the message's own, else the task's (as
        changed by the ``time_limit`` command), else the settings."""
        conf, task, headers = self.app.conf, request.task, request.headers
        return (headers.time_limit or task.time_limit or conf.task_time_limit,
                headers.soft_time_limit or task.soft_time_limit or conf.task_soft_time_limit)

    def _start(self, request: Request) -> None:
        hard, soft = self._limits(request)
        if hard or soft:
            request.job = dataclasses.replace(request.job, time_limit=hard,
                                              soft_time_limit=soft)
        request.time_start = time.time()
        self.state.active[request.job.job_id] = request
        if not request.acks_late:
            self._ack(request)
        future = self.pool.apply(request.job)
        request.worker_pid = self.pool.job_pid(request.job.job_id)
        self.events.task("task-started", request.id)
        self._futures[request.job.job_id] = future
        future.add_done_callback(lambda f: self._on_outcome(request, f.result()))

    def _ack(self, request: Request) -> None:
        if request.acknowledged:
            return
        request.acknowledged = True
        if self._piggyback is not None:  # started by the fetch loop: acked by its next fetch
            self._piggyback.append(request.delivery.tag)
            return
        self._acks.append(request.delivery.tag)
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        """Store handed-over results, then ack, in batches: one I/O call for many tasks.

        While every slot is busy it waits a moment so more outcomes join the batch; an idle
        worker flushes at once, and a worker that runs out of work meanwhile stops waiting
        (:meth:`_on_outcome`), so a lone task's result is not held back.
        """
        if len(self.state.active) >= self.pool.size:
            loop = asyncio.get_running_loop()
            self._flush_wait = waiter = loop.create_future()
            timer = loop.call_later(_FLUSH_WAIT, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._flush_wait = None
        else:
            await asyncio.sleep(0)
        while self._acks or self._results:
            results, self._results = self._results, []
            acks, self._acks = self._acks, []
            try:
                await self.io(self._settle, results, acks)
            except Exception as exc:
                log.error("Could not store %d result(s) / ack %d message(s): %r; unacked "
                          "messages will be redelivered after their lease", len(results),
                          len(acks), exc)

    def _settle(self, results: list[tuple[dict[str, Any], str | None]],
                acks: list[str]) -> None:
        """On the I/O thread: results first (a message is acked only once its result is
        stored), grouped by reply_to, then the acks."""
        by_reply: dict[str | None, list[dict[str, Any]]] = {}
        for meta, reply_to in results:
            by_reply.setdefault(reply_to, []).append(meta)
        for reply_to, metas in by_reply.items():
            self.app.backend.store_many(metas, reply_to)
        if acks:
            self.transport.ack(acks)

    def _on_outcome(self, request: Request, outcome: Outcome) -> None:
        self._futures.pop(request.job.job_id, None)
        self.state.active.pop(request.job.job_id, None)
        self.state.total[request.name] += 1
        if outcome.results:
            self._results.extend((meta, request.job.reply_to) for meta in outcome.results)
            self._flush_soon()
        if outcome.state == REJECTED:
            request.acknowledged = True
            self._reject(request.delivery, outcome.reject_reason or "undecodable body")
        elif outcome.state == LOST:
            self._on_lost(request, outcome)
        else:
            self._ack(request)
            self._report(request, outcome)
        self._dispatch()
        if self._flush_wait is not None and self._results and self.pool.free > 0:
            _resolve(self._flush_wait)  # nothing waits for this slot: no more outcomes soon

    def _report(self, request: Request, outcome: Outcome) -> None:
        name, task_id = request.name, request.id
        if outcome.state == states.SUCCESS:
            log.info("Task %s[%s] succeeded in %.3fs: %s", name, task_id, outcome.runtime,
                     outcome.summary)
            self.events.task("task-succeeded", task_id, result=outcome.summary,
                             runtime=outcome.runtime)
        elif outcome.state == states.RETRY:
            log.info("Task %s[%s] retry: %s", name, task_id, outcome.summary)
            self.events.task("task-retried", task_id, exception=outcome.summary)
        elif outcome.state == states.REVOKED:
            log.info("Task %s[%s] terminated: %s", name, task_id, outcome.summary)
            self.events.task("task-revoked", task_id, terminated=True, expired=False)
        else:
            log.error("Task %s[%s] raised unexpected: %s", name, task_id, outcome.summary)
            self.events.task("task-failed", task_id, exception=outcome.summary)

    def _on_lost(self, request: Request, outcome: Outcome) -> None:
        if request.id in self.state.revoked:  # terminated on purpose (revoke terminate=True)
            self._ack(request)
            log.info("Task %s[%s] terminated (revoked): %s", request.name, request.id,
                     outcome.summary)
            self.events.task("task-revoked", request.id, terminated=True, expired=False)
            meta = make_meta(request.id, states.REVOKED, {
                "exc_type": TaskRevokedError.__name__, "exc_module": TaskRevokedError.__module__,
                "exc_message": ["terminated"]})
            self.io_soon("store a revoked result", self.app.backend.store, meta,
                         request.job.reply_to)
            return
        if outcome.timed_out:
            self._ack(request)
            log.error("Task %s[%s]: %s", request.name, request.id, outcome.summary)
            self.events.task("task-failed", request.id, exception=outcome.summary)
            meta = failure_meta(request.id, TimeLimitExceeded(outcome.summary), None)
            self.io_soon("store a timed-out task's failure", self.app.backend.store, meta,
                         request.job.reply_to)
            return
        if request.acks_late and not request.acknowledged:
            log.error("Task %s[%s]: %s; returning it to the queue (acks_late)",
                      request.name, request.id, outcome.summary)
            request.acknowledged = True
            self.io_soon("requeue a lost task", self.transport.requeue, [request.delivery.tag])
            return
        if request.acknowledged and request.acks_late:
            return  # already handed back by a cold shutdown
        log.error("Task %s[%s]: %s", request.name, request.id, outcome.summary)
        self.events.task("task-failed", request.id, exception=outcome.summary)
        meta = failure_meta(request.id, TaskError(outcome.summary), None)
        self.io_soon("store a lost task's failure", self.app.backend.store, meta,
                     request.job.reply_to)

    # -- what control commands change --------------------------------------------------------
    def revoke(self, ids: Sequence[str], signum: int | None) -> list[str]:
        """Settle held requests for revoked ``ids`` now; signal running ones if ``signum``.

        Returns the ids of running tasks that were signalled. The caller has already added
        ``ids`` to the revoked set.
        """
        wanted = set(ids)
        keep = [r for r in self.state.reserved if r.id not in wanted]
        dropped = [r for r in self.state.reserved if r.id in wanted]
        self.state.reserved.clear()
        self.state.reserved.extend(keep)
        for job_id, request in list(self.state.scheduled.items()):
            if request.id in wanted:
                del self.state.scheduled[job_id]
                handle = self._timers.pop(job_id, None)
                if handle is not None:
                    handle.cancel()
                dropped.append(request)
        for name, waiting in list(self.state.rate_limited.items()):
            dropped += [r for r in waiting if r.id in wanted]
            self.state.rate_limited[name] = collections.deque(
                r for r in waiting if r.id not in wanted)
        for request in dropped:
            self._settle_revoked(request, "revoked")
        stopped = []
        if signum is not None:
            for job_id, request in list(self.state.active.items()):
                if request.id in wanted and self.pool.terminate_job(job_id, signum):
                    stopped.append(request.id)
        self._room.set()
        return stopped

    def add_queue(self, queue: str, **declaration: Any) -> bool:
        """Start consuming from ``queue``; False if already consuming from it."""
        if queue in self.queues:
            return False
        self.queues.append(queue)
        self.declarations[queue] = {k: v for k, v in declaration.items() if v}
        self.transport.wake()
        return True

    def cancel_queue(self, queue: str) -> bool:
        """Stop consuming from ``queue``; False if not consuming from it."""
        if queue not in self.queues:
            return False
        self.queues.remove(queue)
        self.declarations.pop(queue, None)
        self.transport.wake()
        return True

    def queue_descriptions(self) -> list[dict[str, Any]]:
        out = []
        for queue in self.queues:
            extra = self.declarations.get(queue, {})
            exchange = extra.get("exchange") or ""
            out.append({
                "name": queue, "routing_key": extra.get("routing_key") or queue,
                "exchange": {"name": exchange, "type": extra.get("exchange_type") or "direct"},
                "durable": True, "auto_delete": False, "exclusive": False,
                "options": extra.get("options") or {},
            })
        return out

    def _set_bucket(self, name: str, limit: str | float | None) -> None:
        rate = parse_rate(limit)
        if rate:
            self._buckets[name] = TokenBucket(rate)
        else:
            self._buckets.pop(name, None)

    def set_rate_limit(self, task: Task, limit: str | float | None) -> dict[str, str]:
        """The ``rate_limit`` command: applies to this worker's runs of ``task``."""
        if self.app.conf.worker_disable_rate_limits:
            return {"error": "rate limits are disabled on this worker "
                             "(worker_disable_rate_limits)"}
        try:
            self._set_bucket(task.name, limit)
        except ConfigurationError as exc:
            return {"error": str(exc)}
        task.options["rate_limit"] = limit
        self._dispatch()
        if not limit:
            return {"ok": "rate limit disabled successfully"}
        return {"ok": "new rate limit set successfully"}

    def set_time_limits(self, task: Task, soft: float | None,
                        hard: float | None) -> dict[str, str]:
        """The ``time_limit`` command: applies to runs of ``task`` that start from now on."""
        for value in (soft, hard):
            if value is not None and (not isinstance(value, int | float) or value < 0):
                return {"error": f"time limits must be positive numbers, not {value!r}"}
        task.soft_time_limit = soft or None
        task.time_limit = hard or None
        return {"ok": "time limits set successfully"}

    # -- heartbeat ----------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        """Renew leases every lease/3 seconds; delete expired results now and then."""
        interval = max(0.2, self.transport.lease_seconds / 3.0)
        cleanup_every = self.cleanup_every
        next_cleanup = time.monotonic() + cleanup_every
        while True:
            await asyncio.sleep(min(interval, cleanup_every or interval))
            try:
                await self.io(self.transport.renew, self.consumer_id)
            except Exception as exc:
                log.error("Could not renew message leases: %r", exc)
            if cleanup_every and time.monotonic() >= next_cleanup:
                next_cleanup = time.monotonic() + cleanup_every
                self.io_soon("delete expired results", self._cleanup_results)

    def _cleanup_results(self) -> None:
        removed = self.app.backend.cleanup()
        if removed:
            log.info("Deleted %d expired result(s)", removed)
