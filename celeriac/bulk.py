"""The messages of one bulk send (``app.send_many``, ``group``), in the order they were added:
single messages, and runs of identical calls kept as one message and the ids of its copies,
so a transport that can copy on the server (Redis) gets the message once per chunk.

Steps go to the transport's :class:`~celeriac.transports.base.BulkWriter` as soon as they are
complete (a long run every ``FLUSH_EVERY`` ids), so a transport that pipelines stores the
first ones while the rest are still being built; ``send`` waits for all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .protocol import Message
    from .transports.base import BulkWriter

__all__ = ["BulkSend"]

#: a run of identical calls at least this long goes out as copies of one message; shorter
#: runs join the single messages (one round trip for all of them)
COPIES_FROM = 32
#: a run of copies goes out this many ids at a time while it is still growing
FLUSH_EVERY = 1000

Item = tuple[str, "Message", int]


class BulkSend:
    def __init__(self, writer: BulkWriter) -> None:
        self._writer = writer
        self._singles: list[Item] = []
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
        if len(run[3]) >= FLUSH_EVERY:
            self._copies(run)
            self._run = (queue, template, priority, [])  # the run goes on

    def _end_run(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        queue, template, priority, ids = run
        if len(ids) >= COPIES_FROM:
            self._copies(run)
        else:
            self._singles += [(queue, template.with_id(task_id), priority) for task_id in ids]

    def _copies(self, run: tuple[str, Message, int, list[str]]) -> None:
        """The singles before the run, then the run: in sending order."""
        if self._singles:
            singles, self._singles = self._singles, []
            self._writer.many(singles)
        self._writer.copies(*run)

    def send(self) -> None:
        """Write what is left and wait until everything is stored."""
        self._end_run()
        if self._singles:
            singles, self._singles = self._singles, []
            self._writer.many(singles)
        self._writer.finish()
