"""The messages of one bulk send (``app.send_many``, ``group``), in the order they were added:
single messages, and runs of identical calls kept as one message and the ids of its copies,
so a transport that can copy on the server (Redis) gets the message once per chunk."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .protocol import Message
    from .transports.base import Transport

__all__ = ["BulkSend"]

#: a run of identical calls at least this long goes out as copies of one message; shorter
#: runs join the single messages (one round trip for all of them)
COPIES_FROM = 32

Item = tuple[str, "Message", int]


class BulkSend:
    def __init__(self) -> None:
        self._singles: list[Item] = []
        self._steps: list[tuple[list[Item], tuple[str, Message, int, list[str]] | None]] = []
        self._run: tuple[str, Message, int, list[str]] | None = None

    def add(self, queue: str, message: Message, priority: int) -> None:
        self._end_run()
        self._singles.append((queue, message, priority))

    def add_copy(self, queue: str, template: Message, priority: int, task_id: str) -> None:
        """``template`` again under ``task_id`` (same queue and priority as the last copy of
        the same template, or a new run starts)."""
        run = self._run
        if run is None or run[1] is not template:
            self._end_run()
            run = self._run = (queue, template, priority, [])
        run[3].append(task_id)

    def _end_run(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        queue, template, priority, ids = run
        if len(ids) >= COPIES_FROM:
            self._steps.append((self._singles, run))
            self._singles = []
        else:
            self._singles += [(queue, template.with_id(task_id), priority) for task_id in ids]

    def send(self, transport: Transport) -> None:
        """Publish everything, in order: one call per run of copies, one for the singles
        between them."""
        self._end_run()
        steps, self._steps = [*self._steps, (self._singles, None)], []
        self._singles = []
        for singles, run in steps:
            if singles:
                transport.publish_many(singles)
            if run is not None:
                transport.publish_copies(*run)
