"""Signatures and groups: a task call described as data, and many of them sent at once."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .app import Celeriac
    from .result import AsyncResult, GroupResult

__all__ = ["Signature", "group"]


class Signature:
    """A task name with arguments and sending options: ``add.s(2, 2)``."""

    def __init__(self, task: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                 options: Mapping[str, Any] | None = None, *, app: Celeriac) -> None:
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.options = dict(options or {})
        self.app = app

    def __repr__(self) -> str:
        return f"{self.task}({', '.join(map(repr, self.args))})"

    def set(self, **options: Any) -> Signature:
        """Add sending options (``queue``, ``countdown``, ...); returns the signature."""
        self.options.update(options)
        return self

    def apply_async(self, **options: Any) -> AsyncResult:
        return self.app.tasks[self.task].apply_async(self.args, self.kwargs,
                                                    **{**self.options, **options})

    def delay(self) -> AsyncResult:
        return self.apply_async()


class group:
    """Several signatures sent together; ``apply_async()`` returns a :class:`GroupResult`.

    ``group(add.s(i, i) for i in range(10))`` or ``group(add.s(1, 1), add.s(2, 2))``.
    """

    def __init__(self, *tasks: Signature | Iterable[Signature]) -> None:
        flat: list[Signature] = []
        for item in tasks:
            if isinstance(item, Signature):
                flat.append(item)
            else:
                flat.extend(item)
        if not flat:
            raise ConfigurationError("group() needs at least one signature, e.g. add.s(1, 2)")
        self.tasks = flat

    def apply_async(self, group_id: str | None = None) -> GroupResult:
        """Send every task in one batch and return their results as one group."""
        app = self.tasks[0].app
        return app.send_many(self.tasks, group_id=group_id or str(uuid.uuid4()))

    def delay(self) -> GroupResult:
        return self.apply_async()
