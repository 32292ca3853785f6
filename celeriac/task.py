"""Tasks: ``@app.task``, the :class:`Task` object, sending, retrying and the request context."""

from __future__ import annotations

import contextvars
import datetime as dt
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from .canvas import Signature
from .exceptions import ConfigurationError, MaxRetriesExceededError, Retry
from .greenlets import run_coroutine

if TYPE_CHECKING:
    from .app import Celeriac
    from .result import AsyncResult

__all__ = ["TASK_OPTIONS", "Context", "Task"]

#: Options ``@app.task(...)`` accepts; anything else is an error when the task is declared.
TASK_OPTIONS = frozenset({
    "name", "bind", "rate_limit", "time_limit", "soft_time_limit", "acks_late",
    "max_retries", "default_retry_delay", "ignore_result", "queue", "priority",
    "serializer", "expires", "track_started",
})


@dataclass(frozen=True)
class Context:
    """``self.request`` inside a bound task: what the worker knows about this run."""

    id: str | None = None
    task: str | None = None
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    retries: int = 0
    eta: dt.datetime | None = None
    expires: dt.datetime | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    hostname: str | None = None
    delivery_info: Mapping[str, Any] = field(default_factory=dict)
    time_limit: float | None = None
    soft_time_limit: float | None = None
    reply_to: str | None = None
    called_directly: bool = True


_DIRECT = Context()


def _rate_limit_ok(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, int | float):
        return value >= 0
    if isinstance(value, str):
        number, _, unit = value.partition("/")
        try:
            float(number)
        except ValueError:
            return False
        return unit in ("", "s", "m", "h")
    return False


class Task:
    """A registered task: call it to run it here, ``delay``/``apply_async`` to queue it."""

    def __init__(self, app: Celeriac, fun: Callable[..., Any], name: str,
                 options: Mapping[str, Any]) -> None:
        unknown = set(options) - TASK_OPTIONS
        if unknown:
            raise ConfigurationError(
                f"Unknown option(s) {sorted(unknown)} for task {name!r}. "
                f"Task options are: {sorted(TASK_OPTIONS)}."
            )
        if not _rate_limit_ok(options.get("rate_limit")):
            raise ConfigurationError(
                f"Bad rate_limit {options['rate_limit']!r} for task {name!r}: "
                "use a number of tasks per second or 'N/s', 'N/m', 'N/h'."
            )
        self.app = app
        self.fun = fun
        self.name = name
        self.options = dict(options)
        self.bind: bool = bool(options.get("bind", False))
        self.time_limit: float | None = options.get("time_limit")
        self.soft_time_limit: float | None = options.get("soft_time_limit")
        self.queue: str | None = options.get("queue")
        self.priority: int | None = options.get("priority")
        self.expires: float | dt.datetime | None = options.get("expires")
        self.is_async = inspect.iscoroutinefunction(fun)
        self._request: contextvars.ContextVar[Context] = contextvars.ContextVar(
            f"celeriac.request.{name}", default=_DIRECT)
        self.__doc__ = fun.__doc__
        self.__name__ = getattr(fun, "__name__", name)
        self.__module__ = getattr(fun, "__module__", __name__)
        self.__wrapped__ = fun

    def __repr__(self) -> str:
        return f"<@task: {self.name}>"

    # -- options that fall back to settings (read when used, so later settings apply) ---------
    def _option(self, name: str, setting: str) -> Any:
        return self.options[name] if name in self.options else self.app.conf[setting]

    @property
    def acks_late(self) -> bool:
        return bool(self._option("acks_late", "task_acks_late"))

    @property
    def rate_limit(self) -> str | float | None:
        value: str | float | None = self._option("rate_limit", "task_default_rate_limit")
        return value

    @property
    def max_retries(self) -> int | None:
        value: int | None = self._option("max_retries", "task_default_max_retries")
        return value

    @property
    def default_retry_delay(self) -> float:
        return float(self._option("default_retry_delay", "task_default_retry_delay"))

    @property
    def ignore_result(self) -> bool:
        return bool(self._option("ignore_result", "task_ignore_result"))

    @property
    def serializer(self) -> str:
        return str(self._option("serializer", "task_serializer"))

    @property
    def track_started(self) -> bool:
        return bool(self._option("track_started", "task_track_started"))

    # -- running ------------------------------------------------------------------------------
    @property
    def request(self) -> Context:
        """The context of the run in progress in this thread (or a direct call's)."""
        return self._request.get()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.bind:
            return self.fun(self, *args, **kwargs)
        return self.fun(*args, **kwargs)

    def run_with(self, context: Context, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """Run the task body with ``context`` as ``self.request`` (used by the worker)."""
        token = self._request.set(context)
        previous = self.app.enter_task(context)
        try:
            value = self(*args, **kwargs)
            if inspect.iscoroutine(value):  # an async def task, on a pool without a loop
                value = run_coroutine(value)
            return value
        finally:
            self.app.leave_task(previous)
            self._request.reset(token)

    async def run_with_async(self, context: Context, args: Sequence[Any],
                             kwargs: Mapping[str, Any]) -> Any:
        """Await an ``async def`` task body with ``context`` as ``self.request``.

        Call it inside the body's own asyncio task, so the context it sets is that task's.
        """
        token = self._request.set(context)
        previous = self.app.enter_task(context)
        try:
            return await self(*args, **kwargs)
        finally:
            self.app.leave_task(previous)
            self._request.reset(token)

    # -- sending ------------------------------------------------------------------------------
    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Queue the task with these arguments; the shortcut for ``apply_async``."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: Mapping[str, Any] | None = None, *,
                    countdown: float | None = None, eta: dt.datetime | None = None,
                    expires: float | dt.datetime | None = None, queue: str | None = None,
                    routing_key: str | None = None, priority: int | None = None,
                    time_limit: float | None = None, soft_time_limit: float | None = None,
                    task_id: str | None = None, serializer: str | None = None,
                    ignore_result: bool | None = None, retries: int = 0) -> AsyncResult:
        """Queue the task; every option falls back to the task's own, then to the settings."""
        return self.app.send_task(
            self.name, args, kwargs, countdown=countdown, eta=eta,
            expires=expires if expires is not None else self.expires,
            queue=queue or routing_key or self.queue,
            priority=priority if priority is not None else self.priority,
            time_limit=time_limit if time_limit is not None else self.time_limit,
            soft_time_limit=(soft_time_limit if soft_time_limit is not None
                             else self.soft_time_limit),
            task_id=task_id, serializer=serializer or self.serializer,
            ignore_result=self.ignore_result if ignore_result is None else ignore_result,
            retries=retries,
        )

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature of this task with these arguments, for ``group``."""
        return Signature(self.name, args, kwargs, app=self.app)

    def AsyncResult(self, task_id: str) -> AsyncResult:
        return self.app.AsyncResult(task_id)

    def retry(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              exc: BaseException | None = None, countdown: float | None = None,
              eta: dt.datetime | None = None, max_retries: int | None = None) -> NoReturn:
        """End this run (by raising :class:`Retry`) and queue the task again.

        Past ``max_retries`` the given ``exc`` (or :class:`MaxRetriesExceededError`) is raised
        instead, and the task fails.
        """
        request = self.request
        limit = self.max_retries if max_retries is None else max_retries
        if request.called_directly:
            raise exc if exc is not None else Retry("Task.retry() called outside a worker")
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}]: max_retries={limit} reached")
        if countdown is None and eta is None:
            countdown = self.default_retry_delay
        self.app.send_task(
            self.name, request.args if args is None else args,
            request.kwargs if kwargs is None else kwargs,
            countdown=countdown, eta=eta, task_id=request.id, retries=request.retries + 1,
            queue=request.delivery_info.get("routing_key") or self.queue,
            time_limit=request.time_limit, soft_time_limit=request.soft_time_limit,
            root_id=request.root_id, parent_id=request.parent_id, serializer=self.serializer,
            ignore_result=self.ignore_result, reply_to=request.reply_to,
        )
        raise Retry(exc=exc, when=countdown)

