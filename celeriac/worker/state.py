"""What a running worker knows: requests by stage, revoked ids, and counters."""

from __future__ import annotations

import collections
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .request import Request

__all__ = ["RevokedSet", "WorkerState"]


class RevokedSet:
    """Revoked task ids: bounded in size, each remembered for ``expires`` seconds."""

    def __init__(self, clock: Callable[[], float], maxlen: int = 50_000,
                 expires: float = 3 * 3600.0) -> None:
        self.clock = clock
        self.maxlen = maxlen
        self.expires = expires
        self._ids: OrderedDict[str, float] = OrderedDict()

    def add(self, task_id: str, at: float | None = None) -> None:
        self._ids[task_id] = self.clock() if at is None else at
        self._ids.move_to_end(task_id)
        self.purge()

    def update(self, ids: Iterable[str]) -> None:
        for task_id in ids:
            self.add(task_id)

    def purge(self) -> None:
        """Forget ids past their expiry, and the oldest ones past ``maxlen``."""
        horizon = self.clock() - self.expires
        while self._ids:
            oldest, at = next(iter(self._ids.items()))
            if at >= horizon and len(self._ids) <= self.maxlen:
                break
            del self._ids[oldest]

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)


@dataclass
class WorkerState:
    """Requests by stage, and the counters ``stats()`` reports."""

    revoked: RevokedSet
    reserved: collections.deque[Request] = field(default_factory=collections.deque)
    active: dict[int, Request] = field(default_factory=dict)
    scheduled: dict[int, Request] = field(default_factory=dict)
    #: received, waiting for a rate-limit token, by task name (in arrival order)
    rate_limited: dict[str, collections.deque[Request]] = field(default_factory=dict)
    total: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def processed(self) -> int:
        return sum(self.total.values())


class LamportClock:
    """The worker's logical clock: bumped on every event, moved past every clock it sees."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def forward(self) -> int:
        self.value += 1
        return self.value

    def adjust(self, other: int) -> int:
        self.value = max(self.value, other) + 1
        return self.value
