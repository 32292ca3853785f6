"""Running one task: decode its body, call it with its request context, store the outcome.

This is what every pool runs for a :class:`Job`, in a prefork child, a thread or the
consumer's own process. It never raises: every ending is an :class:`Outcome`.
"""

from __future__ import annotations

import logging
import os
import time
import traceback as tb
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import states
from ..exceptions import MessageError, Retry, TaskError, TaskRevokedError
from ..protocol import Message, decode_body, dumps, saferepr
from ..result import exception_to_meta
from ..results import make_meta
from ..task import Context

if TYPE_CHECKING:
    from ..app import Celeriac

__all__ = ["LOST", "REJECTED", "Job", "Outcome", "execute", "failure_meta"]

log = logging.getLogger("celeriac.worker")

#: Outcome state of a job whose message could not be used; the consumer dead-letters it.
REJECTED = states.REJECTED
#: Outcome state of a job whose executor died under it; the consumer decides what follows.
LOST = "LOST"


@dataclass(frozen=True, slots=True)
class Job:
    """One task message as a pool receives it: raw body, headers, and effective limits."""

    job_id: int
    task_id: str
    name: str
    body: bytes
    content_type: str
    content_encoding: str
    headers: dict[str, Any]
    delivery_info: dict[str, Any] = field(default_factory=dict)
    reply_to: str | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        """The fields in order, for crossing a process boundary: ``Job(*t)`` rebuilds it.

        Plain tuples pickle in C; a slots dataclass pickles through dataclasses' slow
        pure-Python ``__getstate__``/``__setstate__``.
        """
        return (self.job_id, self.task_id, self.name, self.body, self.content_type,
                self.content_encoding, self.headers, self.delivery_info, self.reply_to,
                self.time_limit, self.soft_time_limit)

    def __reduce__(self) -> tuple[Any, ...]:
        return Job, self.to_tuple()


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job ended. ``summary`` is a short repr of the value or error, for the log."""

    job_id: int
    task_id: str
    state: str
    runtime: float
    summary: str = ""
    pid: int = 0
    reject_reason: str | None = None
    timed_out: bool = False
    #: result metas the worker's main process stores (handed over by the pool; prefork
    #: children send none when they stored them themselves)
    results: tuple[dict[str, Any], ...] = ()

    def to_tuple(self) -> tuple[Any, ...]:
        """The fields in order, for crossing a process boundary: ``Outcome(*t)`` rebuilds it."""
        return (self.job_id, self.task_id, self.state, self.runtime, self.summary, self.pid,
                self.reject_reason, self.timed_out, self.results)

    def __reduce__(self) -> tuple[Any, ...]:
        return Outcome, self.to_tuple()


class ResultEncodeError(TaskError):
    """A task's return value could not be serialized with the result serializer."""


def failure_meta(task_id: str, exc: BaseException, traceback: str | None,
                 **extra: Any) -> dict[str, Any]:
    """The meta stored for a failed task."""
    return make_meta(task_id, states.FAILURE, exception_to_meta(exc), traceback, **extra)


def task_context(job: Job, args: list[Any], kwargs: dict[str, Any], hostname: str) -> Context:
    h = job.headers
    return Context(
        id=job.task_id, task=job.name, args=args, kwargs=kwargs,
        retries=int(h.get("retries") or 0), root_id=h.get("root_id"),
        parent_id=h.get("parent_id"), group=h.get("group"), hostname=hostname,
        delivery_info=job.delivery_info, time_limit=job.time_limit,
        soft_time_limit=job.soft_time_limit, reply_to=job.reply_to, called_directly=False,
    )


#: Where a run's result goes: ``app.backend.store``, or a pool's collector that hands results
#: to the worker's main process to store in batches. It raises what the serializer raises.
Store = Callable[[dict[str, Any], str | None], None]


class HandOver:
    """A :data:`Store` that keeps a run's results for the worker to store in a batch with
    others (:attr:`Outcome.results`). Each is serialized here first, as the result store
    would, so a result that cannot be stored fails in the task's own run."""

    def __init__(self, serializer: str) -> None:
        self.serializer = serializer
        self.metas: list[dict[str, Any]] = []

    def __call__(self, meta: dict[str, Any], reply_to: str | None) -> None:
        dumps(meta, self.serializer)
        self.metas.append(meta)

    def attach(self, outcome: Outcome) -> Outcome:
        """``outcome`` carrying the results kept since the last call."""
        if not self.metas:
            return outcome
        metas, self.metas = self.metas, []
        o = outcome  # (dataclasses.replace() costs several times this)
        return Outcome(o.job_id, o.task_id, o.state, o.runtime, o.summary, o.pid,
                       o.reject_reason, o.timed_out, tuple(metas))


def store_result(app: Celeriac, meta: dict[str, Any], reply_to: str | None,
                 store: Store | None = None) -> None:
    """Store ``meta``; a value the serializer refuses becomes a FAILURE that says so."""
    store = store or app.backend.store
    try:
        store(meta, reply_to)
    except (TypeError, ValueError, OverflowError) as exc:
        error = ResultEncodeError(
            f"The result of task {meta['task_id']} could not be serialized with "
            f"{app.conf.result_serializer!r}: {exc}. Return JSON-compatible values "
            "(or enable the pickle serializer for trusted deployments).")
        store(failure_meta(meta["task_id"], error, None), reply_to)
        raise error from exc


def execute(app: Celeriac, job: Job, hostname: str,
            around_task: Callable[[Job], AbstractContextManager[Any]] | None = None,
            store: Store | None = None) -> Outcome:
    """Run ``job`` to its end and return how it ended.

    ``around_task(job)`` wraps just the task body (a pool arms its soft time limit there, so
    the limit never fires while the result is being stored). ``store`` receives the final
    result (default: the app's result backend).
    """
    store = store or app.backend.store
    start = time.monotonic()
    pid = os.getpid()
    message = Message(job.body, job.headers, job.content_type, job.content_encoding)
    try:
        args, kwargs, _embed = decode_body(message, app.conf.accept_content)
    except MessageError as exc:
        return Outcome(job.job_id, job.task_id, REJECTED, 0.0, pid=pid, reject_reason=str(exc))
    task = app.tasks[job.name]
    ignore = task.ignore_result or bool(job.headers.get("ignore_result"))
    if task.track_started and not ignore:
        app.backend.store(make_meta(job.task_id, states.STARTED,
                                    {"pid": pid, "hostname": hostname}), job.reply_to)
    try:
        with around_task(job) if around_task is not None else nullcontext():
            value = task.run_with(task_context(job, args, kwargs, hostname), args, kwargs)
        if not ignore:
            store_result(app, make_meta(job.task_id, states.SUCCESS, value), job.reply_to,
                         store)
        return Outcome(job.job_id, job.task_id, states.SUCCESS, time.monotonic() - start,
                       saferepr(value, 200), pid)
    except (Exception, SystemExit) as exc:
        meta, outcome = ending(job, exc, tb.format_exc(), time.monotonic() - start, pid)
        try:
            store(meta, job.reply_to)
        except Exception:
            log.exception("Could not store the %s of task %s[%s]", meta["status"], job.name,
                          job.task_id)
        return outcome


def ending(job: Job, exc: BaseException, trace: str | None, runtime: float,
           pid: int) -> tuple[dict[str, Any], Outcome]:
    """The meta to store and the outcome of a run of ``job`` that raised ``exc``."""
    if isinstance(exc, Retry):
        cause = exc.exc if exc.exc is not None else exc
        return (make_meta(job.task_id, states.RETRY, exception_to_meta(cause), trace),
                Outcome(job.job_id, job.task_id, states.RETRY, runtime,
                        f"Retry in {exc.when}s: {cause!r}", pid))
    if isinstance(exc, TaskRevokedError):
        return (make_meta(job.task_id, states.REVOKED, exception_to_meta(exc)),
                Outcome(job.job_id, job.task_id, states.REVOKED, runtime, "terminated", pid))
    if isinstance(exc, SystemExit):
        exc = TaskError(f"Task called sys.exit({exc.code})")
    return (failure_meta(job.task_id, exc, trace),
            Outcome(job.job_id, job.task_id, states.FAILURE, runtime,
                    f"{type(exc).__name__}: {saferepr(str(exc), 300)}", pid))


def revoked_outcome(app: Celeriac, job: Job, why: str, runtime: float = 0.0,
                    store: Store | None = None) -> Outcome:
    """Record ``job`` as REVOKED (``why``: terminated, revoked before it started ...)."""
    error = TaskRevokedError(why)
    (store or app.backend.store)(make_meta(job.task_id, states.REVOKED, exception_to_meta(error)),
                                 job.reply_to)
    return Outcome(job.job_id, job.task_id, states.REVOKED, runtime, why, os.getpid())
