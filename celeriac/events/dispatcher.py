"""Sending events: ``worker-online``/``-heartbeat``/``-offline`` and ``task-*`` events.

Each event is a JSON object with Celery's standard fields (``type``, ``hostname``,
``timestamp``, ``utcoffset``, ``pid``, ``clock``) broadcast on :data:`EVENT_CHANNEL`.
Task events are sent only while ``enabled`` (``-E``, ``worker_send_task_events`` or the
``enable_events`` command); worker events always, unless heartbeats are disabled.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

__all__ = ["EVENT_CHANNEL", "EventDispatcher"]

EVENT_CHANNEL = "celeriac.events"


class EventDispatcher:
    """Builds events and hands them to ``send`` (which broadcasts them off the event loop)."""

    def __init__(self, hostname: str, send: Callable[[bytes], None],
                 clock: Callable[[], int], enabled: bool = False) -> None:
        self.hostname = hostname
        self.enabled = enabled
        self._send = send
        self._clock = clock
        self._pid = os.getpid()

    def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, "hostname": self.hostname, "timestamp": time.time(),
                "utcoffset": time.timezone // 3600, "pid": self._pid, "clock": self._clock(),
                **fields}

    def send(self, type_: str, **fields: Any) -> None:
        """Send a worker event (always)."""
        self._send(json.dumps(self.event(type_, **fields), default=repr).encode("utf-8"))

    def task(self, type_: str, uuid: str, **fields: Any) -> None:
        """Send a task event, if task events are enabled."""
        if self.enabled:
            self.send(type_, uuid=uuid, **fields)
