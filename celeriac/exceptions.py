"""Every error celeriac raises, in one tree.

::

    CeleriacError
    ├── ConfigurationError          a setting, option or URL is wrong
    │   └── UnknownSettingError
    ├── TransportError              the broker could not be reached or refused an operation
    ├── ResultBackendError          the result store could not be reached or refused
    ├── MessageError                a message cannot be used as a task
    │   ├── ContentDisallowed       its content type is not in ``accept_content``
    │   ├── DecodeError             its body or headers do not decode
    │   └── UnknownTaskError        it names a task this worker does not have
    ├── TaskError                   raised by or about a task run
    │   ├── Retry                   raised by ``Task.retry`` to end the current run
    │   ├── MaxRetriesExceededError
    │   ├── TaskRevokedError        the task was revoked (or had expired) before it ran
    │   ├── TimeLimitExceeded       the task's hard time limit killed it
    │   ├── SoftTimeLimitExceeded   raised inside a task at its soft time limit
    │   ├── NotRegistered           ``app.tasks[name]`` with a name nobody registered
    │   └── RemoteTaskError         a task failed with an exception class we cannot rebuild
    ├── ResultTimeout               ``AsyncResult.get(timeout=...)`` ran out of time
    └── WorkerError                 the worker cannot start or keep running
        └── PidfileError            another worker already holds the pidfile

Every message says what went wrong and, where there is one, what to do about it.
"""

from __future__ import annotations

__all__ = [
    "CeleriacError",
    "ConfigurationError",
    "ContentDisallowed",
    "DecodeError",
    "MaxRetriesExceededError",
    "MessageError",
    "NotRegistered",
    "PidfileError",
    "RemoteTaskError",
    "ResultBackendError",
    "ResultTimeout",
    "Retry",
    "SoftTimeLimitExceeded",
    "TaskError",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "TransportError",
    "UnknownSettingError",
    "UnknownTaskError",
    "WorkerError",
]


class CeleriacError(Exception):
    """Root of every error celeriac raises."""


class ConfigurationError(CeleriacError):
    """A setting, command-line option or URL is wrong."""


class UnknownSettingError(ConfigurationError):
    """A setting name that celeriac does not know."""


class TransportError(CeleriacError):
    """The broker could not be reached or refused an operation."""


class ResultBackendError(CeleriacError):
    """The result store could not be reached or refused an operation."""


class MessageError(CeleriacError):
    """A message cannot be used as a task message."""


class ContentDisallowed(MessageError):
    """The message's content type is not in ``accept_content``."""


class DecodeError(MessageError):
    """The message's body or headers do not decode."""


class UnknownTaskError(MessageError):
    """The message names a task that is not registered with the app."""


class TaskError(CeleriacError):
    """Raised by, or about, a task run."""


class Retry(TaskError):
    """Raised by ``Task.retry()``: the current run ends and a new attempt is queued."""

    def __init__(self, message: str = "", exc: BaseException | None = None,
                 when: float | None = None) -> None:
        if not message:
            message = f"Retry in {when}s" if when is not None else "Retry"
        super().__init__(message)
        self.exc = exc
        self.when = when


class MaxRetriesExceededError(TaskError):
    """A task asked to retry once more than its ``max_retries`` allows."""


class TaskRevokedError(TaskError):
    """The task was revoked, or had expired, before it ran."""


class TimeLimitExceeded(TaskError):
    """The task ran past its hard time limit and was killed."""


class SoftTimeLimitExceeded(TaskError):
    """Raised inside a running task when its soft time limit passes; catch it to clean up."""


class NotRegistered(TaskError, KeyError):
    """No task is registered under that name."""

    def __str__(self) -> str:
        return Exception.__str__(self)


class RemoteTaskError(TaskError):
    """A task failed with an exception class that is not in the known-exceptions registry.

    ``exc_type`` is the remote class's name, ``exc_message`` its message, and
    ``remote_traceback`` the traceback text the worker stored.
    """

    exc_type: str = "Exception"
    exc_module: str = ""

    def __init__(self, message: str = "", remote_traceback: str | None = None) -> None:
        super().__init__(message)
        self.exc_message = message
        self.remote_traceback = remote_traceback


class ResultTimeout(CeleriacError, TimeoutError):
    """Waiting for a task result took longer than the given timeout."""


class WorkerError(CeleriacError):
    """The worker cannot start or keep running."""


class PidfileError(WorkerError):
    """The pidfile names a live process: another worker is running with it."""
