"""celeriac: a distributed task queue for Python, after the Celery Workers Guide.

::

    from celeriac import Celeriac
    app = Celeriac('proj')          # embedded SQLite broker and results in the cwd

    @app.task
    def add(x, y):
        return x + y
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Where each public name lives. Importing the package imports none of them yet, so that
#: ``celeriac worker -P gevent`` can monkey-patch the standard library before anything that
#: uses sockets or threads is loaded.
_HOMES = {
    "AsyncResult": ".result", "GroupResult": ".result",
    "Celeriac": ".app",
    "Signature": ".canvas", "group": ".canvas",
    "CeleriacError": ".exceptions", "MaxRetriesExceededError": ".exceptions",
    "Retry": ".exceptions", "SoftTimeLimitExceeded": ".exceptions",
    "TaskRevokedError": ".exceptions", "TimeLimitExceeded": ".exceptions",
    "Task": ".task",
}


def __getattr__(name: str) -> Any:
    if name == "states":
        return importlib.import_module(".states", __name__)
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


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
