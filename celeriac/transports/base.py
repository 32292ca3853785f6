"""The transport contract: what every broker implementation provides.

A transport moves :class:`~celeriac.protocol.Message` objects between producers and
workers. Its methods are synchronous and safe to call from several threads; the worker calls
them from its I/O thread, producers from wherever they run. Each implementation declares
what it can do in a frozen :class:`Capabilities`.

Delivery semantics every transport keeps:

* ``fetch`` hands a message to one consumer under a *lease*: until the lease expires (or
  the consumer acks, requeues or dead-letters it) no other consumer receives it.
* ``renew`` extends every lease a consumer holds; a live worker calls it from its heartbeat,
  so a long task or a long countdown never loses its message to another worker.
* A lease that expires (its consumer died) makes the message visible again, with its
  delivery count incremented on the next fetch.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..protocol import Message

log = logging.getLogger(__name__)

__all__ = ["BulkWriter", "Capabilities", "DeadLetter", "Delivery", "PendingFetch", "Transport"]

Clock = Callable[[], float]


@dataclass(frozen=True)
class Capabilities:
    """What a transport can do; the worker and tests read these instead of the class name."""

    cross_process: bool
    persistent: bool
    priorities: bool = True
    delayed_delivery: bool = True
    leases: bool = True


@dataclass(frozen=True, slots=True)
class Delivery:
    """A fetched message and how to settle it: ``tag`` is passed back to ack/requeue."""

    tag: str
    queue: str
    message: Message
    deliveries: int = 1
    priority: int = 0

    @property
    def redelivered(self) -> bool:
        return self.deliveries > 1


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message taken out of circulation, with the reason it was."""

    queue: str
    message: Message
    reason: str
    deliveries: int
    at: float


@dataclass(eq=False)
class Subscription(abc.ABC):
    """A receiver of broadcast messages on one channel, from the moment it was opened."""

    channel: str
    closed: bool = field(default=False, init=False)

    @abc.abstractmethod
    def get(self, timeout: float) -> list[bytes]:
        """Broadcasts that arrived since the last call, waiting up to ``timeout`` for one."""

    def close(self) -> None:
        self.closed = True


class BulkWriter:
    """The steps of one bulk send, in order: messages (``many``) and runs of copies of one
    message (``copies``); ``finish`` returns once all are stored (and raises if any is not).
    Here the steps are kept and published at ``finish``, a run's chunks as one run;
    transports that pipeline write each step as it comes."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._steps: list[tuple[str, Any]] = []

    def many(self, items: Sequence[tuple[str, Message, int]]) -> None:
        self._steps.append(("many", list(items)))

    def copies(self, queue: str, message: Message, priority: int, ids: Sequence[str]) -> None:
        last = self._steps[-1] if self._steps else None
        if last is not None and last[0] == "copies" and last[1][1] is message:
            last[1][3].extend(ids)  # the same run, handed over in chunks
        else:
            self._steps.append(("copies", (queue, message, priority, list(ids))))

    def finish(self) -> None:
        steps, self._steps = self._steps, []
        for kind, step in steps:
            if kind == "many":
                self.transport.publish_many(step)
            else:
                self.transport.publish_copies(*step)


class PendingFetch(abc.ABC):
    """A fetch sent by :meth:`Transport.fetch_soon` whose reply has not been read."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """The socket the reply arrives on."""

    @abc.abstractmethod
    def finish(self) -> list[Delivery] | None:
        """The deliveries (``[]``: none were visible), once the socket is readable; ``None``
        if the round trip failed (the acks then go with the caller's next fetch)."""

    @abc.abstractmethod
    def abandon(self) -> None:
        """Never read the reply (the caller was cancelled): its connection is closed, and
        what it fetched comes back when the lease runs out."""


class Transport(abc.ABC):
    """A broker connection. Construct through :func:`celeriac.transports.open_transport`."""

    capabilities: Capabilities

    def __init__(self, url: str, *, clock: Clock, lease_seconds: float = 60.0,
                 options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.clock = clock
        self.lease_seconds = lease_seconds
        self.options = dict(options or {})

    # -- producing ---------------------------------------------------------------------------
    @abc.abstractmethod
    def publish(self, queue: str, message: Message, *, priority: int = 0,
                delay: float = 0.0) -> None:
        """Put ``message`` on ``queue``; with ``delay`` it becomes visible that many seconds later.

        When this returns the message is stored (durably, if the transport is persistent).
        """

    def publish_many(self, items: Sequence[tuple[str, Message, int]]) -> None:
        """Publish ``(queue, message, priority)`` triples, in one round trip where possible."""
        for queue, message, priority in items:
            self.publish(queue, message, priority=priority)

    def publish_copies(self, queue: str, message: Message, priority: int,
                       ids: Sequence[str]) -> None:
        """Publish a copy of ``message`` under each task id in ``ids`` (a run of identical
        calls in a bulk send); transports that can make the copies on the server do."""
        self.publish_many([(queue, message.with_id(task_id), priority) for task_id in ids])

    def bulk_writer(self) -> BulkWriter:
        """Where a bulk send puts its messages, a step at a time, before it waits for them
        all (:meth:`BulkWriter.finish`); transports that can pipeline send each step at once."""
        return BulkWriter(self)

    # -- consuming ---------------------------------------------------------------------------
    @abc.abstractmethod
    def fetch(self, consumer: str, queues: Sequence[str], limit: int,
              timeout: float) -> list[Delivery]:
        """Lease up to ``limit`` visible messages from ``queues`` to ``consumer``.

        Higher priority first, then oldest first. Waits up to ``timeout`` seconds when none
        is visible; returns an empty list if none became visible.
        """

    def fetch_ready(self, acks: Sequence[str], consumer: str, queues: Sequence[str],
                    limit: int) -> list[Delivery] | None:
        """:meth:`ack_then_fetch` without waiting for anything (no broker round trip, no hop
        to an I/O thread): ``acks`` settled and what this process's own buffer holds, or
        ``None`` when that cannot be done so (nothing was done; call ack_then_fetch).
        Transports that push deliveries into a local buffer can."""
        return None

    def fetch_soon(self, acks: Sequence[str], consumer: str, queues: Sequence[str],
                   limit: int) -> PendingFetch | None:
        """:meth:`ack_then_fetch` without waiting for messages, as one broker round trip the
        caller's event loop waits for instead of the I/O thread: the request is sent now,
        and :meth:`PendingFetch.finish` reads the reply once :meth:`PendingFetch.fileno` is
        readable. ``None`` when that cannot be done so (nothing was done; call
        ack_then_fetch). Transports whose fetch is one request and one reply can."""
        return None

    def ack_then_fetch(self, acks: Sequence[str], consumer: str, queues: Sequence[str],
                       limit: int, timeout: float) -> list[Delivery]:
        """:meth:`ack` then :meth:`fetch` (a worker acks what it just started on receipt
        this way); a transport that can do both in one round trip does. A failed ack is
        logged, not raised: its messages come back after their lease, and the fetch goes on.
        """
        self.ack_or_log(acks)
        return self.fetch(consumer, queues, limit, timeout)

    def ack_or_log(self, acks: Sequence[str]) -> None:
        """:meth:`ack`, with a failure logged, not raised: the messages come back after
        their lease (for acks that ride along with a fetch, which goes on)."""
        if acks:
            try:
                self.ack(acks)
            except Exception as exc:
                log.error("Could not ack %d message(s): %r; they will be redelivered after "
                          "their lease", len(acks), exc)

    @abc.abstractmethod
    def ack(self, tags: Sequence[str]) -> None:
        """Settle deliveries: the messages are gone for good.

        Settling (ack, requeue, dead_letter) acts only on the delivery a tag came from: once a
        lease has run out and the message was fetched again, the old tag no longer matches.
        """

    @abc.abstractmethod
    def requeue(self, tags: Sequence[str]) -> None:
        """Give deliveries back: visible again at once, to any consumer."""

    @abc.abstractmethod
    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Take a delivery out of circulation, keeping it with ``reason`` for inspection.

        Also records a delivery this consumer already acked (a body found undecodable after
        an early ack); does nothing for a stale tag whose message another consumer holds.
        """

    @abc.abstractmethod
    def renew(self, consumer: str) -> int:
        """Extend every lease ``consumer`` holds by ``lease_seconds``; returns how many."""

    def wake(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Make a ``fetch`` that is waiting in another thread return early."""

    # -- queues -------------------------------------------------------------------------------
    @abc.abstractmethod
    def queue_size(self, queue: str) -> int:
        """Messages on ``queue`` that are not leased to anybody (visible or delayed)."""

    @abc.abstractmethod
    def purge(self, queue: str) -> int:
        """Delete the messages of ``queue`` that nobody holds; returns how many."""

    @abc.abstractmethod
    def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        """The dead-lettered messages (of one queue, or of all)."""

    # -- broadcast and replies (the control mailbox rides on these) ---------------------------
    @abc.abstractmethod
    def broadcast(self, channel: str, payload: bytes) -> None:
        """Send ``payload`` to every subscription open on ``channel`` now."""

    @abc.abstractmethod
    def subscribe(self, channel: str) -> Subscription:
        """Receive the broadcasts on ``channel`` sent from now on."""

    def prepare_replies(self, reply_to: str) -> None:  # noqa: B027 - optional hook
        """Make sure replies sent to ``reply_to`` from now on are kept until read (or expire).

        Callers invoke it before sending the request the replies answer; brokers that need a
        queue to exist before anything is sent to it (AMQP) declare it here.
        """

    @abc.abstractmethod
    def reply(self, reply_to: str, payload: bytes, ttl: float = 300.0) -> None:
        """Leave ``payload`` for whoever reads ``reply_to``; unread replies expire after ``ttl``."""

    @abc.abstractmethod
    def get_replies(self, reply_to: str, timeout: float) -> list[bytes]:
        """Take the replies left for ``reply_to``, waiting up to ``timeout`` for the first."""

    # -- lifecycle ----------------------------------------------------------------------------
    def after_fork(self) -> None:  # noqa: B027 - optional hook
        """Drop connections inherited from a parent process; reconnect lazily."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def describe(self) -> dict[str, Any]:
        """Connection facts for ``stats()``: never includes a password."""
        return {"transport": type(self).__name__, "url": self.url}
