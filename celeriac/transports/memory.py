"""``memory://``: an in-process broker for tests and single-process experiments.

All state lives on the instance, so two apps never share queues by accident. Messages are
kept in one table; fetch scans it, which is fine for the sizes tests use.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..protocol import Message
from .base import Capabilities, Clock, DeadLetter, Delivery, Subscription, Transport

__all__ = ["MemoryTransport"]


@dataclass
class _Entry:
    seq: int
    queue: str
    message: Message
    priority: int
    visible_at: float
    owner: str | None = None
    lease_expires: float = 0.0
    deliveries: int = 0


class _MemorySubscription(Subscription):
    def __init__(self, channel: str, transport: MemoryTransport) -> None:
        super().__init__(channel)
        self._transport = transport
        self.inbox: deque[bytes] = deque()

    def get(self, timeout: float) -> list[bytes]:
        with self._transport._cond:
            if not self.inbox:
                self._transport._cond.wait(timeout)
            items = list(self.inbox)
            self.inbox.clear()
        return items

    def close(self) -> None:
        super().close()
        with self._transport._cond:
            self._transport._subscribers[self.channel].discard(self)


class MemoryTransport(Transport):
    """In-process queues with leases, priorities, delays, broadcast and replies."""

    capabilities = Capabilities(cross_process=False, persistent=False)

    def __init__(self, url: str, *, clock: Clock, lease_seconds: float = 60.0,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(url, clock=clock, lease_seconds=lease_seconds, options=options)
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._entries: dict[str, _Entry] = {}
        self._dead: list[DeadLetter] = []
        self._subscribers: dict[str, set[_MemorySubscription]] = defaultdict(set)
        self._replies: dict[str, deque[tuple[float, bytes]]] = defaultdict(deque)
        self._woken = False

    def publish(self, queue: str, message: Message, *, priority: int = 0,
                delay: float = 0.0) -> None:
        with self._cond:
            seq = next(self._seq)
            self._entries[str(seq)] = _Entry(seq, queue, message, priority,
                                             self.clock() + max(delay, 0.0))
            self._cond.notify_all()

    def _visible(self, queues: Sequence[str], now: float) -> list[_Entry]:
        wanted = set(queues)
        ready = [e for e in self._entries.values()
                 if e.queue in wanted and e.visible_at <= now
                 and (e.owner is None or e.lease_expires <= now)]
        ready.sort(key=lambda e: (-e.priority, e.seq))
        return ready

    def fetch(self, consumer: str, queues: Sequence[str], limit: int,
              timeout: float) -> list[Delivery]:
        if limit <= 0:
            return []
        with self._cond:
            deadline = time.monotonic() + timeout  # waiting is real time; due times use clock
            while True:
                now = self.clock()
                ready = self._visible(queues, now)[:limit]
                if ready or self._woken or time.monotonic() >= deadline:
                    self._woken = False
                    break
                self._cond.wait(min(deadline - time.monotonic(), 0.05))
            out = []
            for entry in ready:
                entry.owner, entry.lease_expires = consumer, now + self.lease_seconds
                entry.deliveries += 1
                out.append(Delivery(f"{entry.seq}.{entry.deliveries}", entry.queue,
                                    entry.message, entry.deliveries, entry.priority))
            return out

    def _mine(self, tag: str) -> _Entry | None:
        """The entry a tag names, if that delivery is still the latest (see SQLite's)."""
        seq, _, count = tag.partition(".")
        entry = self._entries.get(seq)
        return entry if entry is not None and str(entry.deliveries) == count else None

    def ack(self, tags: Sequence[str]) -> None:
        with self._cond:
            for tag in tags:
                if (entry := self._mine(tag)) is not None:
                    del self._entries[str(entry.seq)]

    def requeue(self, tags: Sequence[str]) -> None:
        with self._cond:
            for tag in tags:
                if (entry := self._mine(tag)) is not None:
                    entry.owner, entry.lease_expires = None, 0.0
            self._cond.notify_all()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        with self._cond:
            if (entry := self._mine(delivery.tag)) is not None:
                del self._entries[str(entry.seq)]
            elif delivery.tag.partition(".")[0] in self._entries:
                return  # a stale tag: the message is another consumer's delivery now
            self._dead.append(DeadLetter(delivery.queue, delivery.message, reason,
                                         delivery.deliveries, self.clock()))

    def renew(self, consumer: str) -> int:
        with self._cond:
            until = self.clock() + self.lease_seconds
            held = [e for e in self._entries.values() if e.owner == consumer]
            for entry in held:
                entry.lease_expires = until
            return len(held)

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def queue_size(self, queue: str) -> int:
        with self._cond:
            now = self.clock()
            return sum(1 for e in self._entries.values()
                       if e.queue == queue and (e.owner is None or e.lease_expires <= now))

    def purge(self, queue: str) -> int:
        with self._cond:
            now = self.clock()
            gone = [tag for tag, e in self._entries.items()
                    if e.queue == queue and (e.owner is None or e.lease_expires <= now)]
            for tag in gone:
                del self._entries[tag]
            return len(gone)

    def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        with self._cond:
            return [d for d in self._dead if queue is None or d.queue == queue]

    def broadcast(self, channel: str, payload: bytes) -> None:
        with self._cond:
            for sub in self._subscribers[channel]:
                sub.inbox.append(payload)
            self._cond.notify_all()

    def subscribe(self, channel: str) -> Subscription:
        sub = _MemorySubscription(channel, self)
        with self._cond:
            self._subscribers[channel].add(sub)
        return sub

    def reply(self, reply_to: str, payload: bytes, ttl: float = 300.0) -> None:
        with self._cond:
            self._replies[reply_to].append((self.clock() + ttl, payload))
            self._cond.notify_all()

    def get_replies(self, reply_to: str, timeout: float) -> list[bytes]:
        with self._cond:
            deadline = time.monotonic() + timeout
            while not self._replies.get(reply_to) and time.monotonic() < deadline:
                self._cond.wait(min(deadline - time.monotonic(), 0.05))
            now = self.clock()
            box = self._replies.pop(reply_to, deque())
            return [payload for expires, payload in box if expires > now]
