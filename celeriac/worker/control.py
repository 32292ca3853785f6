"""Remote-control commands: the :class:`Panel` registry and the built-in commands.

A command is a function ``(state, **arguments)`` run on the worker's event loop; ``state``
is a :class:`ControlState` whose ``consumer`` is the running consumer. Control commands
change things and answer ``{'ok': ...}`` or ``{'error': ...}``; inspect commands answer data.
Register your own with ``@Panel.register`` (for every app in the process, as the guide
shows) or ``@app.control_command`` (for one app)::

    from celeriac.worker.control import Panel

    @Panel.register
    def increase_prefetch_count(state, n=1):
        state.consumer.qos.increment_eventually(n)
        return {'ok': 'prefetch count incremented'}
"""

from __future__ import annotations

import inspect
import os
import resource
import signal as signals
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, overload

from .. import __version__
from ..urls import mask_url

if TYPE_CHECKING:
    from .consumer import Consumer
    from .worker import Worker

__all__ = ["Command", "ControlState", "Panel"]

Handler = Callable[..., Any]


@dataclass(frozen=True)
class Command:
    """A registered command: its function, kind (control/inspect) and CLI argument types."""

    name: str
    fun: Handler
    kind: str = "control"
    args: tuple[tuple[str, type], ...] = ()
    help: str = ""

    @property
    def signature(self) -> str:
        return " ".join(f"<{name}>" for name, _ in self.args)


@dataclass
class ControlState:
    """What a command handler gets: the worker and its consumer."""

    worker: Worker
    consumer: Consumer
    app: Any = field(init=False)
    hostname: str = field(init=False)

    def __post_init__(self) -> None:
        self.app = self.worker.app
        self.hostname = self.worker.hostname


def _args_of(fun: Handler) -> tuple[tuple[str, type], ...]:
    params = list(inspect.signature(fun).parameters.values())[1:]
    out = []
    for p in params:
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        kind = type(p.default) if p.default not in (inspect.Parameter.empty, None) else str
        out.append((p.name, kind))
    return tuple(out)


class Panel:
    """The registry of commands every worker in this process knows.

    The registry is the class itself (the guide's ``@Panel.register`` API); per-app
    commands registered with ``@app.control_command`` are kept on the app instead.
    """

    data: ClassVar[dict[str, Command]] = {}

    @overload
    @classmethod
    def register(cls, fun: Handler, /) -> Handler: ...

    @overload
    @classmethod
    def register(cls, fun: None = None, /, *, name: str | None = None, type: str = "control",
                 args: tuple[tuple[str, type], ...] | None = None
                 ) -> Callable[[Handler], Handler]: ...

    @classmethod
    def register(cls, fun: Handler | None = None, /, *, name: str | None = None,
                 type: str = "control",
                 args: tuple[tuple[str, type], ...] | None = None
                 ) -> Handler | Callable[[Handler], Handler]:
        """Register a command: ``@Panel.register`` or ``@Panel.register(type='inspect')``."""
        def add(f: Handler) -> Handler:
            command = make_command(f, name=name, kind=type, args=args)
            cls.data[command.name] = command
            return f

        return add(fun) if fun is not None else add


def make_command(fun: Handler, *, name: str | None = None, kind: str = "control",
                 args: tuple[tuple[str, type], ...] | None = None) -> Command:
    if kind not in ("control", "inspect"):
        raise ValueError(f"Command type must be 'control' or 'inspect', not {kind!r}")
    doc = (inspect.getdoc(fun) or "").strip().splitlines()
    return Command(name or fun.__name__, fun, kind, _args_of(fun) if args is None else args,
                   doc[0] if doc else "")


def _inspect(fun: Handler) -> Handler:
    return Panel.register(type="inspect")(fun)


def _signum(value: str | int) -> int:
    if isinstance(value, int):
        return value
    name = value.upper()
    try:
        return int(signals.Signals[name if name.startswith("SIG") else f"SIG{name}"])
    except KeyError:
        raise ValueError(f"unknown signal {value!r}") from None


# -- control commands ---------------------------------------------------------------------------

@Panel.register
def ping(state: ControlState) -> dict[str, str]:
    """Answer pong."""
    return {"ok": "pong"}


@Panel.register(args=(("task_id", str), ("terminate", bool), ("signal", str)))
def revoke(state: ControlState, task_id: str | list[str], terminate: bool = False,
           signal: str = "SIGTERM") -> dict[str, str]:
    """Revoke task ids; with terminate, stop them if running (signal by name)."""
    ids = [task_id] if isinstance(task_id, str) else [str(t) for t in task_id]
    signum = _signum(signal) if terminate else None
    state.worker.remember_revoked(ids)
    stopped = state.consumer.revoke(ids, signum)
    text = ", ".join(ids)
    if terminate:
        return {"ok": f"terminate: tasks {text} flagged as revoked"
                      + (f"; signalled {', '.join(stopped)}" if stopped else "")}
    return {"ok": f"tasks {text} flagged as revoked"}


@Panel.register(args=(("signal", str), ("task_id", str)))
def terminate(state: ControlState, signal: str, task_id: str | list[str]) -> dict[str, str]:
    """Revoke and stop running task(s) with the signal."""
    return revoke(state, task_id, terminate=True, signal=signal)


@Panel.register(args=(("task_name", str), ("rate_limit", str)))
def rate_limit(state: ControlState, task_name: str,
               rate_limit: str | float | None) -> dict[str, str]:
    """Set a task type's rate limit (e.g. 200/m); None or 0 removes it."""
    task = state.app.tasks.get(task_name)
    if task is None:
        return {"error": f"unknown task {task_name!r}"}
    return state.consumer.set_rate_limit(task, rate_limit)


@Panel.register(args=(("task_name", str), ("soft", float), ("hard", float)))
def time_limit(state: ControlState, task_name: str, soft: float | None = None,
               hard: float | None = None) -> dict[str, str]:
    """Set a task type's soft and hard time limits for runs that start from now on."""
    task = state.app.tasks.get(task_name)
    if task is None:
        return {"error": f"unknown task {task_name!r}"}
    return state.consumer.set_time_limits(task, soft, hard)


@Panel.register(args=(("queue", str), ("exchange", str), ("exchange_type", str),
                      ("routing_key", str)))
def add_consumer(state: ControlState, queue: str, exchange: str | None = None,
                 exchange_type: str | None = None, routing_key: str | None = None,
                 options: dict[str, Any] | None = None) -> dict[str, str]:
    """Start consuming from a queue (idempotent)."""
    if state.consumer.add_queue(queue, exchange=exchange, exchange_type=exchange_type,
                                routing_key=routing_key, options=options or {}):
        return {"ok": f"add consumer {queue!r}"}
    return {"ok": f"already consuming from {queue!r}"}


@Panel.register(args=(("queue", str),))
def cancel_consumer(state: ControlState, queue: str) -> dict[str, str]:
    """Stop consuming from a queue."""
    if state.consumer.cancel_queue(queue):
        return {"ok": f"no longer consuming from {queue!r}"}
    return {"error": f"not consuming from {queue!r}"}


@Panel.register(args=(("n", int),))
async def pool_grow(state: ControlState, n: int = 1) -> dict[str, str]:
    """Add n processes/threads to the pool."""
    return await state.worker.resize_pool(int(n))


@Panel.register(args=(("n", int),))
async def pool_shrink(state: ControlState, n: int = 1) -> dict[str, str]:
    """Remove n processes/threads from the pool."""
    return await state.worker.resize_pool(-int(n))


@Panel.register(args=(("max", int), ("min", int)))
def autoscale(state: ControlState, max: int, min: int) -> dict[str, str]:
    """Change the autoscaler's maximum and minimum pool size."""
    return state.worker.set_autoscale(int(max), int(min))


@Panel.register(args=(("modules", str), ("reload", bool)))
async def pool_restart(state: ControlState, modules: list[str] | None = None,
                       reload: bool = False, reloader: str | None = None) -> dict[str, str]:
    """Replace the pool's processes, importing or reloading modules first."""
    return await state.worker.restart_pool(list(modules or []), bool(reload), reloader)


@Panel.register
def enable_events(state: ControlState) -> dict[str, str]:
    """Start sending task events."""
    state.worker.events.enabled = True
    return {"ok": "task events enabled"}


@Panel.register
def disable_events(state: ControlState) -> dict[str, str]:
    """Stop sending task events."""
    state.worker.events.enabled = False
    return {"ok": "task events disabled"}


@Panel.register
def heartbeat(state: ControlState) -> dict[str, str]:
    """Send a worker-heartbeat event now."""
    state.worker.send_heartbeat()
    return {"ok": "heartbeat sent"}


@Panel.register
def shutdown(state: ControlState) -> dict[str, str]:
    """Warm-shut-down the worker."""
    state.worker.request_stop(False)
    return {"ok": "shutdown initiated"}


# -- inspect commands ---------------------------------------------------------------------------

@_inspect
def registered(state: ControlState, taskinfoitems: list[str] | None = None) -> list[str]:
    """Task names the worker knows."""
    names = sorted(state.app.tasks)
    if not taskinfoitems:
        return names
    out = []
    for name in names:
        task = state.app.tasks[name]
        info = " ".join(f"[{item}={getattr(task, item, None)}]" for item in taskinfoitems)
        out.append(f"{name} {info}")
    return out


@_inspect
def active(state: ControlState) -> list[dict[str, Any]]:
    """Tasks executing now."""
    return [r.info(state.hostname) for r in state.worker.state.active.values()]


@_inspect
def reserved(state: ControlState) -> list[dict[str, Any]]:
    """Tasks received and waiting for a free pool slot (or a rate-limit token)."""
    worker_state = state.worker.state
    waiting = [r for q in worker_state.rate_limited.values() for r in q]
    return [r.info(state.hostname) for r in [*worker_state.reserved, *waiting]]


@_inspect
def scheduled(state: ControlState) -> list[dict[str, Any]]:
    """ETA/countdown tasks the worker holds until they are due."""
    return [{"eta": r.eta_iso(), "priority": r.delivery.priority,
             "request": r.info(state.hostname)}
            for r in state.worker.state.scheduled.values()]


@_inspect
def revoked(state: ControlState) -> list[str]:
    """Revoked task ids the worker remembers."""
    return list(state.worker.state.revoked)


@_inspect
def active_queues(state: ControlState) -> list[dict[str, Any]]:
    """The queues the worker consumes from."""
    return state.consumer.queue_descriptions()


@_inspect
def query_task(state: ControlState, ids: list[str] | None = None) -> dict[str, Any]:
    """Where the given task ids are in this worker: active, reserved or scheduled."""
    wanted = set(ids or [])
    found: dict[str, Any] = {}
    worker_state = state.worker.state
    stages = (("active", worker_state.active.values()), ("reserved", worker_state.reserved),
              ("scheduled", worker_state.scheduled.values()))
    for stage, requests in stages:
        for request in requests:
            if request.id in wanted:
                found[request.id] = [stage, request.info(state.hostname)]
    return found


@_inspect
def clock(state: ControlState) -> dict[str, int]:
    """The worker's logical clock."""
    return {"clock": state.worker.clock.value}


@_inspect
def hello(state: ControlState, from_node: str = "", revoked: list[str] | None = None,
          clock: int = 0) -> dict[str, Any] | None:
    """Mingle: a starting worker's greeting; answer with our revoked ids and clock."""
    if from_node == state.hostname:
        return None
    worker = state.worker
    if revoked:
        worker.remember_revoked([str(t) for t in revoked])
    worker.clock.adjust(int(clock or 0))
    return {"revoked": list(worker.state.revoked), "clock": worker.clock.value}


_RUSAGE = ("utime", "stime", "maxrss", "ixrss", "idrss", "isrss", "minflt", "majflt", "nswap",
           "inblock", "oublock", "msgsnd", "msgrcv", "nsignals", "nvcsw", "nivcsw")


def _rusage() -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {name: getattr(usage, f"ru_{name}") for name in _RUSAGE}


_BROKER_FIELDS = ("transport", "hostname", "port", "userid", "virtual_host", "ssl",
                  "heartbeat", "connect_timeout", "login_method", "uri_prefix",
                  "transport_options")


@_inspect
def stats(state: ControlState) -> dict[str, Any]:
    """Statistics: broker, clock, pid, uptime, prefetch count, pool, rusage, totals."""
    worker = state.worker
    broker = {name: None for name in _BROKER_FIELDS}
    broker.update(state.app.transport.describe())
    broker.pop("password", None)
    broker.pop("url", None)
    return {
        "broker": broker,
        "clock": worker.clock.value,
        "pid": os.getpid(),
        "uptime": round(time.monotonic() - worker.started_at, 3),
        "prefetch_count": state.consumer.qos.value,
        "pool": worker.pool_info(),
        "rusage": _rusage(),
        "total": dict(worker.state.total),
        "sw_ident": "py-celeriac",
        "sw_ver": __version__,
    }


_SECRET_WORDS = ("password", "secret", "key", "token")


def _masked(name: str, value: Any) -> Any:
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    if any(word in name.lower() for word in _SECRET_WORDS) and value:
        return "********"
    if isinstance(value, dict):
        return {k: _masked(str(k), v) for k, v in value.items()}
    return value


@_inspect
def conf(state: ControlState, with_defaults: bool = False) -> dict[str, Any]:
    """The worker's settings (those changed from the defaults), secrets masked."""
    settings = state.app.conf
    names = list(settings) if with_defaults else list(settings.changed())
    out = {name: _masked(name, settings[name]) for name in names}
    out["broker_url"] = mask_url(state.app.broker_url)
    out["result_backend"] = mask_url(state.app.result_backend_url)
    return out
