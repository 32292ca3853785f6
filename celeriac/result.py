"""Results as the caller sees them: :class:`AsyncResult`, :class:`GroupResult`, and the
registry of exception classes a stored failure may be rebuilt as.

A stored failure names its exception by type, module and message. It is rebuilt only as a
class that is in the :class:`ExceptionRegistry` (Python's built-in exceptions, celeriac's,
and any the application registers); anything else becomes a
:class:`~celeriac.exceptions.RemoteTaskError` subclass carrying the remote name. Nothing is
ever imported because a stored result says so.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import exceptions as exc_module
from . import states
from .exceptions import RemoteTaskError, ResultTimeout, TaskRevokedError

if TYPE_CHECKING:
    from .app import Celeriac

__all__ = ["AsyncResult", "ExceptionRegistry", "GroupResult", "exception_to_meta"]


def exception_to_meta(exc: BaseException) -> dict[str, Any]:
    """How a failure is stored: type name, module and message, never the object itself."""
    cls = type(exc)
    name = getattr(exc, "exc_type", None) if isinstance(exc, RemoteTaskError) else None
    return {
        "exc_type": name or cls.__qualname__,
        "exc_module": cls.__module__,
        "exc_message": [str(a) if not isinstance(a, int | float | str) else a
                        for a in exc.args],
    }


class ExceptionRegistry:
    """Exception classes that stored failures may be rebuilt as."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], type[BaseException]] = {}
        for name in dir(builtins):
            value = getattr(builtins, name)
            if isinstance(value, type) and issubclass(value, Exception):
                self._known[("builtins", name)] = value
        for name in exc_module.__all__:
            self.register(getattr(exc_module, name))
        self._synthesized: dict[tuple[str, str], type[RemoteTaskError]] = {}

    def register(self, cls: type[BaseException]) -> type[BaseException]:
        """Allow failures of ``cls`` to be raised as ``cls`` by ``get()``; usable as decorator."""
        self._known[(cls.__module__, cls.__qualname__)] = cls
        return cls

    def rebuild(self, meta: Any, traceback: str | None) -> BaseException:
        """The exception a stored failure stands for."""
        if not isinstance(meta, dict) or "exc_type" not in meta:
            return RemoteTaskError(repr(meta), traceback)
        name, module = str(meta["exc_type"]), str(meta.get("exc_module") or "")
        raw_args = meta.get("exc_message") or []
        args = raw_args if isinstance(raw_args, list) else [raw_args]
        cls = self._known.get((module, name))
        if cls is not None:
            try:
                exc = cls(*args)
            except Exception:
                exc = cls(*[str(a) for a in args][:1])
            exc.remote_traceback = traceback  # type: ignore[attr-defined]
            return exc
        key = (module, name)
        synth = self._synthesized.get(key)
        if synth is None:
            synth = type(name.rpartition(".")[2] or "RemoteError", (RemoteTaskError,),
                         {"exc_type": name, "exc_module": module, "__module__": module})
            self._synthesized[key] = synth
        message = " ".join(str(a) for a in args)
        return synth(message, traceback)


class AsyncResult:
    """The result of one task, looked up in the app's result backend."""

    def __init__(self, task_id: str, app: Celeriac) -> None:
        self.id = task_id
        self.app = app

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def task_id(self) -> str:
        return self.id

    def _meta(self) -> dict[str, Any] | None:
        return self.app.backend.get(self.id)

    @property
    def state(self) -> str:
        meta = self._meta()
        return str(meta["status"]) if meta else states.PENDING

    status = state

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state == states.FAILURE

    @property
    def result(self) -> Any:
        """The return value, the exception of a failure, or ``None`` while pending."""
        meta = self._meta()
        if meta is None:
            return None
        if meta["status"] in states.EXCEPTION_STATES:
            return self.app.known_exceptions.rebuild(meta["result"], meta.get("traceback"))
        return meta["result"]

    info = result

    @property
    def traceback(self) -> str | None:
        meta = self._meta()
        return meta.get("traceback") if meta else None

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        """Wait for the task to finish and return its value.

        A failed task raises its rebuilt exception (``propagate=False`` returns it instead);
        a revoked one raises :class:`TaskRevokedError`; no result within ``timeout`` raises
        :class:`ResultTimeout`.
        """
        meta = self.app.backend.wait(self.id, timeout)
        if meta is None:
            raise ResultTimeout(
                f"Task {self.id} did not finish within {timeout}s (state {self.state}). "
                "Is a worker running and consuming this task's queue?")
        status = meta["status"]
        if status == states.SUCCESS:
            return meta["result"]
        if status == states.REVOKED:
            error: BaseException = TaskRevokedError(f"Task {self.id} was revoked"
                                                    f" ({meta.get('result') or 'revoked'})")
        else:
            error = self.app.known_exceptions.rebuild(meta["result"], meta.get("traceback"))
        if propagate:
            raise error
        return error

    wait = get

    def forget(self) -> None:
        """Delete the stored result."""
        self.app.backend.forget(self.id)

    def revoke(self, terminate: bool = False, signal: str = "SIGTERM",
               **kwargs: Any) -> Any:
        """Revoke the task on every worker; ``terminate`` also stops it if it is running."""
        return self.app.control.revoke(self.id, terminate=terminate, signal=signal, **kwargs)


class GroupResult:
    """The results of a group of tasks, in the order they were sent."""

    def __init__(self, group_id: str, results: Sequence[AsyncResult], app: Celeriac) -> None:
        self.id = group_id
        self.results = list(results)
        self.app = app

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __iter__(self) -> Iterator[AsyncResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def ready(self) -> bool:
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        return all(r.successful() for r in self.results)

    def completed_count(self) -> int:
        return sum(1 for r in self.results if r.successful())

    def get(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        """Every task's value, in order; ``timeout`` bounds the whole wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for result in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            values.append(result.get(timeout=left, propagate=propagate))
        return values

    join = get

    def forget(self) -> None:
        for result in self.results:
            result.forget()

    def revoke(self, terminate: bool = False, signal: str = "SIGTERM",
               **kwargs: Any) -> Any:
        """Revoke every task of the group, in one control message."""
        return self.app.control.revoke([r.id for r in self.results], terminate=terminate,
                                       signal=signal, **kwargs)
