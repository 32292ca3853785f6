"""The application: settings, the task registry, sending tasks, and the broker and result
backend connections of this process."""

from __future__ import annotations

import contextvars
import dataclasses
import datetime as dt
import importlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

from . import protocol
from . import result as _result
from .bulk import BulkSend
from .config import Settings
from .control.client import Control
from .exceptions import ConfigurationError, NotRegistered
from .result import AsyncResult, ExceptionRegistry, GroupResult
from .results import ChildStore, ResultBackend, open_backend, open_child_store
from .task import Context, Task
from .transports import Transport, open_transport
from .urls import mask_url, scheme_of

if TYPE_CHECKING:
    from .canvas import Signature
    from .worker.control import Command

__all__ = ["DEFAULT_BROKER_URL", "DEFAULT_RESULT_BACKEND", "Celeriac", "TaskRegistry"]

log = logging.getLogger("celeriac.app")

DEFAULT_BROKER_URL = "sqlite:///celeriac-broker.db"
DEFAULT_RESULT_BACKEND = "sqlite:///celeriac-results.db"


class TaskRegistry(dict[str, Task]):
    """Tasks by name; a missing name raises :class:`NotRegistered` saying what is known."""

    def __missing__(self, name: str) -> Task:
        known = ", ".join(sorted(self)) or "none"
        raise NotRegistered(
            f"Task {name!r} is not registered (known: {known}). Is its module imported by "
            "the worker (-I/--include, or the 'imports' setting)?")


class Celeriac:
    """A celeriac application: ``app = Celeriac('proj', broker=..., backend=...)``.

    With no broker configured anywhere (argument, ``CELERIAC_BROKER_URL``, settings) it uses
    an SQLite file in the working directory, and likewise for results.
    """

    def __init__(self, main: str | None = None, *, broker: str | None = None,
                 backend: str | None = None, include: Sequence[str] | None = None,
                 environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.time, **settings: Any) -> None:
        self.main = main
        self.conf = Settings(settings)
        if include:
            self.conf.include = tuple(include)
        env = os.environ if environ is None else environ
        self._broker_arg = broker or env.get("CELERIAC_BROKER_URL")
        self._backend_arg = backend or env.get("CELERIAC_RESULT_BACKEND")
        self.clock = clock
        self.tasks = TaskRegistry()
        self.known_exceptions = ExceptionRegistry()
        self._current: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
            "celeriac.current_task", default=None)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._transport: Transport | None = None
        self._backend: ResultBackend | None = None
        self._origin = protocol.origin_name()
        self._control: Control | None = None
        self.control_commands: dict[str, Command] = {}

    def __repr__(self) -> str:
        return f"<Celeriac {self.main or '__main__'} broker={mask_url(self.broker_url)}>"

    # -- configuration ------------------------------------------------------------------------
    def config_from_object(self, obj: Any) -> None:
        """Load settings from a module, ``'module'`` / ``'module:attr'`` name, or object.

        Names that look like settings but are unknown are logged as warnings.
        """
        if isinstance(obj, str):
            module_name, _, attr = obj.partition(":")
            obj = importlib.import_module(module_name)
            if attr:
                obj = getattr(obj, attr)
        unknown = self.conf.load_object(obj)
        if unknown:
            log.warning("Ignoring unknown settings in %r: %s (see celeriac.config.DEFAULTS)",
                        getattr(obj, "__name__", obj), ", ".join(sorted(unknown)))

    @property
    def broker_url(self) -> str:
        return self._broker_arg or self.conf.broker_url or DEFAULT_BROKER_URL

    @property
    def result_backend_url(self) -> str:
        url = self._backend_arg or self.conf.result_backend
        if url:
            return str(url)
        return "memory://" if scheme_of(self.broker_url) == "memory" else DEFAULT_RESULT_BACKEND

    # -- connections (one set per process) ----------------------------------------------------
    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            for conn in (self._transport, self._backend):
                if conn is not None:
                    conn.after_fork()
            self._origin = protocol.origin_name()

    @property
    def transport(self) -> Transport:
        """This process's broker connection, opened on first use."""
        self._check_fork()
        if self._transport is None:
            with self._lock:
                if self._transport is None:
                    self._transport = open_transport(
                        self.broker_url, clock=self.clock,
                        lease_seconds=float(self.conf.broker_lease_seconds),
                        options=self._connection_options(self.conf.broker_transport_options))
        return self._transport

    @property
    def backend(self) -> ResultBackend:
        """This process's result store, opened on first use."""
        self._check_fork()
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = open_backend(
                        self.result_backend_url, clock=self.clock,
                        expires=self.conf.result_expires,
                        serializer=self.conf.result_serializer,
                        accept=self.conf.result_accept_content or self.conf.accept_content,
                        options=self._connection_options(
                            self.conf.result_backend_transport_options),
                        broker=lambda: self.transport)
        return self._backend

    def child_result_store(self) -> ChildStore | None:
        """What a prefork child stores its results with, or None (it hands them to the
        worker): see :func:`celeriac.results.open_child_store`."""
        return open_child_store(
            self.result_backend_url, clock=self.clock, expires=self.conf.result_expires,
            serializer=self.conf.result_serializer,
            options=self._connection_options(self.conf.result_backend_transport_options))

    def _connection_options(self, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        """Options for opening a connection: the retry policy, then the given overrides."""
        conf = self.conf
        return {"connection_timeout": conf.broker_connection_timeout,
                "connection_retry": conf.broker_connection_retry,
                "connection_max_retries": conf.broker_connection_max_retries,
                **dict(extra or {})}

    def close(self) -> None:
        """Close this process's connections."""
        for conn in (self._transport, self._backend):
            if conn is not None:
                conn.close()
        self._transport = self._backend = None

    # -- remote control ---------------------------------------------------------------------------
    @property
    def control(self) -> Control:
        """Remote control of workers: ``app.control.broadcast(...)``, ``.inspect()``, ..."""
        if self._control is None:
            self._control = Control(self)
        return self._control

    def control_command(self, fun: Callable[..., Any] | None = None, /, *,
                        name: str | None = None, type: str = "control",
                        ) -> Any:
        """Register a remote-control command for this app's workers (see ``Panel``)."""
        from .worker.control import make_command  # the worker side, only when used

        def add(f: Callable[..., Any]) -> Callable[..., Any]:
            command = make_command(f, name=name, kind=type)
            self.control_commands[command.name] = command
            return f

        return add(fun) if fun is not None else add

    # -- tasks --------------------------------------------------------------------------------
    @overload
    def task(self, fun: Callable[..., Any], /) -> Task: ...

    @overload
    def task(self, fun: None = None, /,
             **options: Any) -> Callable[[Callable[..., Any]], Task]: ...

    def task(self, fun: Callable[..., Any] | None = None, /,
             **options: Any) -> Task | Callable[[Callable[..., Any]], Task]:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., ...)``."""
        def register(f: Callable[..., Any]) -> Task:
            name = options.get("name") or self.task_name(f)
            task = Task(self, f, name, options)
            self.tasks[name] = task
            return task

        return register(fun) if fun is not None else register

    def task_name(self, fun: Callable[..., Any]) -> str:
        module = fun.__module__
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{fun.__name__}"

    def import_task_modules(self) -> list[str]:
        """Import the modules named by ``imports`` and ``include``; returns their names."""
        names = [*self.conf.imports, *self.conf.include]
        for name in names:
            importlib.import_module(name)
        return names

    def enter_task(self, context: Context) -> contextvars.Token[Context | None]:
        return self._current.set(context)

    def leave_task(self, token: contextvars.Token[Context | None]) -> None:
        self._current.reset(token)

    @property
    def current_task_request(self) -> Context | None:
        """The request of the task running in this thread, if any."""
        return self._current.get()

    # -- sending ------------------------------------------------------------------------------
    def _times(self, countdown: float | None, eta: dt.datetime | None,
               expires: float | dt.datetime | None) -> tuple[dt.datetime | None,
                                                             dt.datetime | None]:
        if countdown is None and expires is None:  # the usual call: no clock needed
            return eta, None
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        if countdown is not None:
            eta = now + dt.timedelta(seconds=countdown)
        if isinstance(expires, int | float) and not isinstance(expires, bool):
            expires = now + dt.timedelta(seconds=expires)
        elif expires is not None and not isinstance(expires, dt.datetime):
            raise ConfigurationError(
                f"expires must be seconds or a datetime, not {type(expires).__name__}")
        return eta, expires

    def build_message(self, name: str, args: Sequence[Any] | None,
                      kwargs: Mapping[str, Any] | None, *, countdown: float | None = None,
                      eta: dt.datetime | None = None,
                      expires: float | dt.datetime | None = None, priority: int | None = None,
                      time_limit: float | None = None, soft_time_limit: float | None = None,
                      task_id: str | None = None, serializer: str | None = None,
                      ignore_result: bool = False, retries: int = 0, root_id: str | None = None,
                      parent_id: str | None = None, group_id: str | None = None,
                      reply_to: str | None = None) -> protocol.Message:
        """A protocol-v2 message for task ``name`` (which need not be registered here).

        ``reply_to`` is where ``rpc://`` results go: this client's queue unless given (a
        retry keeps the original caller's).
        """
        if args is not None and not isinstance(args, list | tuple):
            raise ConfigurationError(f"args must be a list or tuple, not {type(args).__name__}")
        eta, expires = self._times(countdown, eta, expires)
        current = self._current.get()
        if current is not None and parent_id is None:
            parent_id, root_id = current.id, root_id or current.root_id
        return protocol.build_task_message(
            name, args or (), kwargs, task_id=task_id, eta=eta, expires=expires,
            retries=retries, time_limit=time_limit, soft_time_limit=soft_time_limit,
            root_id=root_id, parent_id=parent_id, group=group_id, ignore_result=ignore_result,
            serializer=serializer or self.conf.task_serializer, priority=priority,
            origin=self._origin, reply_to=reply_to or self.backend.reply_to)

    def send_task(self, name: str, args: Sequence[Any] | None = None,
                  kwargs: Mapping[str, Any] | None = None, *, queue: str | None = None,
                  routing_key: str | None = None, **options: Any) -> AsyncResult:
        """Queue task ``name`` by name; the options are those of :meth:`build_message`."""
        message = self.build_message(name, args, kwargs, **options)
        priority = options.get("priority")
        if priority is None:
            priority = self.conf.task_default_priority or 0
        self.transport.publish(queue or routing_key or self.conf.task_default_queue, message,
                               priority=priority, delay=self._hold_back(message))
        return AsyncResult(message.headers["id"], self)

    def _hold_back(self, message: protocol.Message) -> float:
        """How long the broker keeps an ETA message before handing it to a worker.

        Workers hold ETA tasks themselves once they are within ``broker_eta_horizon`` of
        being due (so ``inspect scheduled`` shows them); further out, the broker keeps them.
        """
        eta = message.headers.get("eta")
        if not eta:
            return 0.0
        due = dt.datetime.fromisoformat(eta).timestamp() - self.clock()
        return max(0.0, due - float(self.conf.broker_eta_horizon))

    def send_many(self, signatures: Iterable[Signature], *,
                  group_id: str | None = None) -> GroupResult:
        """Queue many tasks in one round trip; returns their results as a group.

        A run of identical calls (same task and options, no arguments or the very same
        argument objects) is built once and rebadged with a fresh id for each. Every message
        is built before any is sent, so a call that cannot be built sends nothing."""
        plan = self._bulk_plan(signatures, group_id)
        bulk = BulkSend(self.transport.bulk_writer())
        results = []
        ids = protocol.fresh_ids()
        for queue, message, priority, copy in plan:
            if copy:
                task_id = next(ids)
                bulk.add_copy(queue, message, priority, task_id)
            else:
                task_id = message.headers["id"]
                bulk.add(queue, message, priority)
            results.append(AsyncResult(task_id, self))
        bulk.send()
        return GroupResult(group_id or str(uuid.uuid4()), results, self)

    def _bulk_plan(self, signatures: Iterable[Signature],
                   group_id: str | None) -> list[tuple[str, protocol.Message, int, bool]]:
        """``(queue, message, priority, copy)`` per call: its own message, or (``copy``) the
        template of the run of identical calls it belongs to, to send under a fresh id."""
        plan: list[tuple[str, protocol.Message, int, bool]] = []
        default_queue = self.conf.task_default_queue
        last: tuple[Signature, tuple[str, protocol.Message, int, bool]] | None = None
        for sig in signatures:
            if last is not None and _same_call(sig, last[0]):
                plan.append(last[1])
                continue
            task = self.tasks.get(sig.task)
            options = dict(sig.options)
            queue = options.pop("queue", None) or (task.queue if task else None) or default_queue
            if task is not None:
                options.setdefault("time_limit", task.time_limit)
                options.setdefault("soft_time_limit", task.soft_time_limit)
                options.setdefault("ignore_result", task.ignore_result)
                options.setdefault("serializer", task.serializer)
            message = self.build_message(sig.task, sig.args, sig.kwargs, group_id=group_id,
                                         **options)
            priority = int(options.get("priority") or 0)
            plan.append((queue, message, priority, False))
            if "task_id" in sig.options:
                last = None
            else:  # encoded once, for the copies
                template = dataclasses.replace(message, envelope=message.to_envelope())
                last = (sig, (queue, template, priority, True))
        return plan

    def AsyncResult(self, task_id: str) -> AsyncResult:
        return AsyncResult(task_id, self)

    def GroupResult(self, group_id: str,
                    results: Sequence[_result.AsyncResult]) -> GroupResult:
        return GroupResult(group_id, results, self)


def _same_call(sig: Signature, other: Signature) -> bool:
    """Whether ``sig`` makes the same message as ``other`` but for its id. Arguments count as
    the same only when both have none or they are the very same objects (``1 == 1.0 ==
    True`` would serialize differently)."""
    if sig.task != other.task or sig.options != other.options:
        return False
    if not (sig.args or sig.kwargs or other.args or other.kwargs):
        return True
    return sig.args is other.args and sig.kwargs is other.kwargs
