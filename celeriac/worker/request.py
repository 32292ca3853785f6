"""A task request as the worker holds it, from delivery to outcome."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..protocol import TaskHeaders
from ..transports import Delivery
from .execute import Job

if TYPE_CHECKING:
    from ..task import Task

__all__ = ["Request"]


@dataclass(eq=False)
class Request:
    """One received task message: what to run, where it came from, how far it got."""

    job: Job
    delivery: Delivery
    headers: TaskHeaders
    task: Task
    acks_late: bool
    time_start: float | None = None
    worker_pid: int | None = None
    acknowledged: bool = False

    @property
    def id(self) -> str:
        return self.headers.id

    @property
    def name(self) -> str:
        return self.headers.task

    def expired(self, now: float) -> bool:
        expires = self.headers.expires
        return expires is not None and expires.timestamp() <= now

    def eta_delay(self, now: float) -> float:
        """Seconds until the task is due (0 or less: due now)."""
        eta = self.headers.eta
        return 0.0 if eta is None else eta.timestamp() - now

    def info(self, hostname: str) -> dict[str, Any]:
        """The shape ``inspect active``/``reserved`` report."""
        return {
            "id": self.id, "name": self.name, "args": self.headers.argsrepr,
            "kwargs": self.headers.kwargsrepr, "type": self.name, "hostname": hostname,
            "time_start": self.time_start, "acknowledged": self.acknowledged,
            "delivery_info": dict(self.job.delivery_info), "worker_pid": self.worker_pid,
        }

    def eta_iso(self) -> str | None:
        eta = self.headers.eta
        return eta.astimezone(dt.UTC).isoformat() if eta is not None else None
