"""celeriac: a distributed task queue for Python, after the Celery Workers Guide.

::

    from celeriac import Celeriac
    app = Celeriac('proj')          # embedded SQLite broker and results in the cwd

    @app.task
    def add(x, y):
        return x + y
"""

from __future__ import annotations

from . import states
from .app import Celeriac
from .canvas import Signature, group
from .exceptions import (
    CeleriacError,
    MaxRetriesExceededError,
    Retry,
    SoftTimeLimitExceeded,
    TaskRevokedError,
    TimeLimitExceeded,
)
from .result import AsyncResult, GroupResult
from .task import Task

__version__ = "0.1.0"

__all__ = [
    "AsyncResult",
    "Celeriac",
    "CeleriacError",
    "GroupResult",
    "MaxRetriesExceededError",
    "Retry",
    "Signature",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "__version__",
    "group",
    "states",
]
