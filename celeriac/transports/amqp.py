"""``amqp://`` and ``amqps://``: RabbitMQ, through aiormq on one I/O thread per process
(and, for the hot paths, small blocking connections of our own).

Queues are durable with ``x-max-priority``, messages persistent, and publishing waits for the
broker's confirm. What the contract calls a *lease* is RabbitMQ's unacked delivery: it stays
ours while our connection lives, and the broker hands it back when the connection dies (so
``renew`` only counts). Delivery tags carry the channel's identity, so a tag from before a
reconnect settles nothing; but when the broker redelivers such a message to this handle
(its AMQP ``message_id`` tells), the old tag takes it up again instead of it being handed
out twice, and one acked in between is acked on arrival.

How the contract maps onto the broker:

* ``publish`` to a queue this handle has declared writes the message and reads the
  broker's confirm in the calling thread, on a small connection of its own
  (:class:`~celeriac.transports.amqp_publish.Publisher`; ``amqp://`` only, not ``amqps://``):
  the hop to the I/O thread and back cost as much as the confirm. Anything unusual on it
  (no connection free, a lost connection, a returned message) sends the message through
  the I/O thread instead, which declares again or waits for the broker as usual.
  ``publish_many`` does the same with many messages at once, pipelined (chunks written while
  the broker confirms the ones before); only what the broker returned, and after a lost
  connection what it had not confirmed, goes through the I/O thread.

* ``fetch`` with a timeout consumes (``basic.consume``) into a local buffer, with a prefetch
  of what the handle holds plus ``limit`` (a worker: its prefetch count plus the ETA tasks
  it holds), changed when that grows or halves; with ``timeout=0`` it takes what
  that buffer holds after a round trip on the consuming channel (so everything the broker
  pushed before has arrived) and pulls the rest with ``basic.get``. On ``amqp://`` the
  consuming channel is a connection of our own read by a thread of its own
  (:class:`~celeriac.transports.amqp_consume.LeanChannel`: aiormq cost more per delivery
  than the rest of the worker), and ``ack`` writes from the calling thread. It lives and
  dies with the I/O thread's connection: when either drops, both are opened again.
* Delivery counts: RabbitMQ's classic queues only flag a redelivery, so a header of ours
  counts the deliveries before this one; ``requeue`` publishes a copy with the count raised
  (confirmed) and then acks the original. A message whose worker *process* keeps dying is
  seen as delivered twice at most this way; one that kills a pool child is counted exactly.
* Delayed messages wait in the broker, never unacked in a consumer: a chain of 32 durable
  queues whose fixed TTLs are 0.1 s * 2**k, linked by topic exchanges that read the delay's
  bits from the routing key and dead-letter into the next level, the last one into the
  target queue. A delay is rounded up to 0.1 s, so it is never early, and is late by the
  hops (a few ms each); every queue holds one TTL, so nothing waits behind a longer delay.
  Delayed messages are not counted by ``queue_size`` nor removed by ``purge``.
* Dead letters go to a durable ``<queue>.dead`` queue with the reason in headers;
  ``dead_letters`` browses it (``basic.get``, then the channel is closed, which puts every
  message back in order). Without a queue name it looks at the queues this handle has used.
* Broadcasts: a fanout exchange per channel, an exclusive auto-delete queue per
  subscription. Replies: an exclusive auto-delete queue per ``reply_to`` (``x-expires``),
  consumed from ``prepare_replies`` on; replies sent before it are lost. Idle reply queues
  are deleted after ``reply_linger`` seconds, and at most ``reply_boxes`` are kept.

Options (``broker_transport_options``, or the URL's query): ``heartbeat`` (30 s),
``connect_timeout`` / ``broker_connection_timeout`` (4 s a try), ``max_retries`` /
``broker_connection_max_retries`` (100 tries at start-up; a connection lost later is
retried for ever, in the background), ``retry``, ``operation_timeout`` (30 s: how long a
call waits for a lost connection to come back), ``max_priority`` (10) and ``name_prefix``,
which prefixes every queue and exchange name so that apps, or tests, can share a vhost.

RabbitMQ closes a channel that holds a delivery unacked past its ``consumer_timeout``
(30 min by default): workers hold ETA tasks only within ``broker_eta_horizon``, but an
``acks_late`` task running longer than that needs the broker's setting raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import TransportError
from ..protocol import Message
from . import amqp_io, amqp_publish
from .amqp_consume import LeanChannel, LeanClosed
from .amqp_io import (
    H_DEAD_AT,
    H_DELIVERIES,
    H_EXPIRES,
    H_REASON,
    IOThread,
    Link,
    Listener,
    Settings,
    properties,
    read_message,
)
from .base import Capabilities, Clock, DeadLetter, Delivery, Subscription, Transport

__all__ = ["AMQPTransport"]

_RECENT_ACKS = 10_000
_ORPHAN_SECONDS = 300.0
#: an ack written this recently when the connection drops may never have reached the broker
_UNSURE_ACK_SECONDS = 10.0


@dataclass(slots=True)
class _Pending:
    """A delivery on our channel: ``epoch`` names the channel, ``dtag`` is the broker's tag,
    valid on ``channel`` alone (the channel that delivered it)."""

    seq: int
    wire: str
    epoch: str
    dtag: int
    mid: str | None
    redelivered: bool
    delivery: Delivery
    channel: Any = None


@dataclass(slots=True)
class _Orphan:
    """A delivery held when the connection dropped; its redelivery to us takes up the lease."""

    tag: str
    consumer: str
    since: float
    acked: bool = False


@dataclass(eq=False)
class _Box:
    listener: Listener
    items: deque[tuple[float | None, bytes]] = field(default_factory=deque)
    used: float = field(default_factory=time.monotonic)
    waiting: int = 0


def _check_refused(refused: int, total: int) -> None:
    if refused:
        raise TransportError(f"The broker refused {refused} of {total} messages (nack); "
                             "they were not stored")


class _State:
    """What one process's handle holds; rebuilt after a fork (threads do not survive it)."""

    def __init__(self, transport: AMQPTransport) -> None:
        self.cond = threading.Condition()
        #: held while settling (ack, requeue, dead-letter), which callers in several threads
        #: may do: an ack with ``multiple`` must not take in a tag another call is settling
        self.settling = threading.Lock()
        self.pid = os.getpid()
        self.token = uuid.uuid4().hex[:6]
        self.epochs = itertools.count(1)
        self.epoch = ""
        self.seq = itertools.count()
        self.buffer: list[_Pending] = []
        self.held: dict[str, tuple[str, _Pending]] = {}
        self.orphans: dict[str, _Orphan] = {}
        self.orphan_tags: dict[str, str] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.acked: OrderedDict[str, None] = OrderedDict()
        self.sent_acks: deque[tuple[float, str, str]] = deque()  # (when, message id, tag)
        self.wanted: dict[str, str] = {}
        self.consumers: dict[str, str] = {}
        self.prefetch = 0
        self.known: set[str] = set()
        self.boxes: dict[str, _Box] = {}
        self.woken = False
        self.io = IOThread()
        self.publishers = amqp_publish.PublisherPool(transport.settings)
        self.link = Link(transport.settings, on_ready=lambda: transport._on_ready(self),
                         on_lost=lambda: transport._on_lost(self))
        self.setup = asyncio.Lock()

    def pending_for(self, wires: Collection[str]) -> list[_Pending]:
        return [p for p in self.buffer if p.wire in wires]

    def remember_acked(self, tag: str) -> None:
        self.acked[tag] = None
        if len(self.acked) > _RECENT_ACKS:
            self.acked.popitem(last=False)

    def remember_sent(self, picked: list[_Pending]) -> None:
        """Acks just written: if the connection drops soon, their redelivery is settled."""
        now = time.monotonic()
        with self.cond:
            self.sent_acks.extend((now, p.mid, p.delivery.tag) for p in picked if p.mid)
            while self.sent_acks and (now - self.sent_acks[0][0] > _UNSURE_ACK_SECONDS
                                      or len(self.sent_acks) > _RECENT_ACKS):
                self.sent_acks.popleft()


class _AMQPSubscription(Subscription):
    """Broadcasts of one channel, through an exclusive auto-delete queue bound to its fanout."""

    def __init__(self, channel: str, state: _State, exchange: str) -> None:
        super().__init__(channel)
        self._state = state
        self.inbox: deque[bytes] = deque()
        self.listener = Listener("", self._arrived, exchange=exchange)

    def _arrived(self, msg: Any) -> None:
        with self._state.cond:
            self.inbox.append(msg.body)
            self._state.cond.notify_all()

    def get(self, timeout: float) -> list[bytes]:
        st = self._state
        if self.closed:
            return []
        with st.cond:
            st.cond.wait_for(lambda: self.inbox or self.closed, timeout)
            waited = bool(self.inbox)
        if (waited or timeout <= 0) and st.link.up:
            st.io.call(st.link.sync())  # what was broadcast before has arrived
        with st.cond:
            items = list(self.inbox)
            self.inbox.clear()
        return items

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        st = self._state
        if st.io.alive and os.getpid() == st.pid:
            with contextlib.suppress(TransportError):
                st.io.call(st.link.unlisten(self.listener))


class AMQPTransport(Transport):
    """RabbitMQ: confirmed publishes, manual acks with prefetch, broker-held delays."""

    capabilities = Capabilities(cross_process=True, persistent=True, priorities=True,
                                delayed_delivery=True, leases=True)
    reply_linger = 10.0
    """Seconds an unread reply queue is kept after it was last read."""
    reply_boxes = 16
    """Reply queues kept open at most; the least recently read idle ones go first."""

    def __init__(self, url: str, *, clock: Clock, lease_seconds: float = 60.0,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(url, clock=clock, lease_seconds=lease_seconds, options=options)
        amqp_io.require_aiormq()
        self.settings = Settings.parse(url, self.options)
        self._lock = threading.Lock()
        self._abandoned: list[_State] = []
        self._state: _State | None = None
        self._ensure()

    # -- plumbing -----------------------------------------------------------------------------
    def _ensure(self) -> _State:
        st = self._state
        if st is not None and st.pid == os.getpid():
            return st
        if st is not None:
            self.after_fork()
        with self._lock:
            if self._state is None:
                st = _State(self)
                try:
                    st.io.call(st.link.open())
                except BaseException:
                    st.io.stop()
                    raise
                self._state = st
            return self._state

    def _name(self, queue: str) -> str:
        return self.settings.name_prefix + queue

    def _call(self, st: _State, coro: Any) -> Any:
        try:
            return st.io.call(coro)
        except TransportError:
            raise
        except Exception as exc:
            raise TransportError(f"AMQP error at {self.settings.masked}: "
                                 f"{self.settings.scrub(repr(exc))}") from exc

    async def _on_ready(self, st: _State) -> None:
        """After (re)connecting: consume again (the link restores its listeners itself)."""
        with st.cond:
            st.epoch = f"{st.token}{next(st.epochs)}"
            wanted, st.consumers = dict(st.wanted), {}
            prefetch, st.prefetch = st.prefetch, 0
        if wanted:
            await self._consume(st, wanted, max(prefetch, 1), restoring=True)
        with st.cond:
            st.cond.notify_all()

    def _on_lost(self, st: _State) -> None:
        """The broker takes back every unacked delivery: what we held becomes an orphan."""
        now = time.monotonic()
        with st.cond:
            st.epoch = ""
            st.buffer.clear()
            for tag, (consumer, p) in st.held.items():
                if p.mid is not None:
                    st.orphans[p.mid] = _Orphan(tag, consumer, now)
                    st.orphan_tags[tag] = p.mid
            st.held.clear()
            for when, mid, tag in st.sent_acks:  # the broker may not have read these acks
                if now - when <= _UNSURE_ACK_SECONDS:
                    st.orphans.setdefault(mid, _Orphan(tag, "", now, acked=True))
            st.sent_acks.clear()
            for mid in [m for m, o in st.orphans.items() if now - o.since > _ORPHAN_SECONDS]:
                st.orphan_tags.pop(st.orphans.pop(mid).tag, None)
            st.consumers.clear()
            st.cond.notify_all()

    def _reclaim(self, st: _State, p: _Pending) -> bool:
        """Take up an orphan's lease with its redelivery, under the old tag (holds ``cond``).

        The consumer still has the message from before the drop (reserved, or running), so
        handing it out again would run it twice; its old tag settles the new delivery.
        """
        orphan = st.orphans.pop(p.mid, None) if p.redelivered and p.mid else None
        if orphan is None:
            return False
        st.orphan_tags.pop(orphan.tag, None)
        p.delivery = dataclasses.replace(p.delivery, tag=orphan.tag)
        if orphan.acked:  # it finished meanwhile: settle the redelivery at once
            st.io.loop.call_soon_threadsafe(self._settle_soon, st, p)
        else:
            st.held[orphan.tag] = (orphan.consumer, p)
        return True

    def _settle_soon(self, st: _State, p: _Pending) -> None:
        """Settle ``p`` in a task of the I/O loop (deliveries may arrive on another thread)."""
        task = st.io.loop.create_task(self._settle(st, [p]))
        st.tasks.add(task)
        task.add_done_callback(st.tasks.discard)

    async def _barrier(self, st: _State) -> None:
        """A round trip on ``cons``: what the broker delivered on it before has arrived."""
        ch = await st.link.channel("cons")
        await ch.basic_qos(prefetch_count=st.prefetch)

    # -- producing ----------------------------------------------------------------------------
    def publish(self, queue: str, message: Message, *, priority: int = 0,
                delay: float = 0.0) -> None:
        st = self._ensure()
        st.known.add(queue)
        props, wire = properties(message, priority), self._name(queue)
        if delay > 0:
            self._call(st, st.link.publish_delayed(wire, message.body, props, delay))
        elif not self._publish_direct(st, wire, message.body, props):
            self._call(st, st.link.publish_to_queue(wire, message.body, props))

    def _publish_direct(self, st: _State, wire: str, body: bytes, props: Any) -> bool:
        """Publish from this thread on a connection of its own (see :class:`Publisher`).

        Only to a queue the link has declared, while it is connected; ``False`` when it was
        not done (no publisher free, or the broker's answer left it unsure): the caller
        publishes through the I/O thread, which declares again or waits for the broker.
        """
        if self.settings.ssl or wire not in st.link.declared or not st.link.up:
            return False
        pub = st.publishers.take()
        if pub is None:
            return False
        try:
            pub.publish(wire, body, props)
        except amqp_publish.Unroutable:  # the queue is gone: declared again by the I/O thread
            with contextlib.suppress(RuntimeError):  # (a closed loop: the I/O path says so)
                st.io.loop.call_soon_threadsafe(st.link.forget_declared)
            return False
        except amqp_publish.Unsure:
            return False
        finally:
            st.publishers.give(pub)
        return True

    def publish_many(self, items: Sequence[tuple[str, Message, int]]) -> None:
        if not items:
            return
        st = self._ensure()
        st.known.update(queue for queue, _, _ in items)
        batch = [(self._name(q), m.body, properties(m, p)) for q, m, p in items]
        rest, refused = self._publish_many_direct(st, batch)
        if rest:
            self._call(st, st.link.publish_batch(rest))
        _check_refused(refused, len(batch))

    def _publish_many_direct(self, st: _State, batch: list[tuple[str, bytes, Any]], *,
                             mandatory: bool = True
                             ) -> tuple[list[tuple[str, bytes, Any]], int]:
        """Publish what goes to declared queues on a direct publisher, as :meth:`publish`.

        Returns what the I/O thread must publish still, in order (to queues not declared
        yet, returned by the broker, or left unconfirmed by a lost connection: those may
        then be stored twice, never lost), and how many messages the broker refused.
        Without ``mandatory`` (replies: a queue that is gone drops them) every queue goes.
        """
        if self.settings.ssl or not st.link.up:
            return batch, 0
        declared = st.link.declared
        mine = [i for i, (wire, _, _) in enumerate(batch) if not mandatory or wire in declared]
        if not mine:
            return batch, 0
        pub = st.publishers.take()
        if pub is None:
            return batch, 0
        try:
            done = pub.publish_batch(batch if len(mine) == len(batch) else
                                     [batch[i] for i in mine], mandatory=mandatory)
        finally:
            st.publishers.give(pub)
        if done.returned:  # a queue is gone: declared again by the I/O thread
            with contextlib.suppress(RuntimeError):  # (a closed loop: the I/O path says so)
                st.io.loop.call_soon_threadsafe(st.link.forget_declared)
        stored = set(mine).difference(mine[j] for j in done.again)
        return [item for i, item in enumerate(batch) if i not in stored], done.refused

    # -- consuming ------------------------------------------------------------------------------
    def fetch(self, consumer: str, queues: Sequence[str], limit: int,
              timeout: float) -> list[Delivery]:
        if limit <= 0 or not queues:
            return []
        st = self._ensure()
        wires = {self._name(q): q for q in dict.fromkeys(queues)}
        st.known.update(wires.values())
        with st.cond:
            if timeout > 0:
                target, need = wires, len(st.held) + limit
            else:
                target = {w: q for w, q in st.wanted.items() if w in wires}
                need = 0
            change = target != st.wanted or self._resize(st, need)
        if change and st.link.up:
            self._call(st, self._consume(st, target, need))
        with st.cond:
            got = self._take(st, consumer, wires, limit)
        if timeout <= 0:
            if len(got) < limit:
                got += self._call(st, self._pull(st, consumer, wires, limit - len(got)))
                got.sort(key=lambda d: -d.priority)
            return got
        if got:
            return got
        deadline = time.monotonic() + timeout
        with st.cond:
            while not st.woken:
                got = self._take(st, consumer, wires, limit)
                left = deadline - time.monotonic()
                if got or left <= 0:
                    break
                st.cond.wait(left)
            st.woken = False
        return got

    def fetch_ready(self, acks: Sequence[str], consumer: str, queues: Sequence[str],
                    limit: int) -> list[Delivery] | None:
        st = self._state
        if st is None or st.pid != os.getpid() or not isinstance(st.link.channels.get("cons"),
                                                                  LeanChannel):
            return None  # acks go through the I/O thread
        wires = {self._name(q): q for q in queues}
        with st.cond:
            if st.wanted.keys() != wires.keys() or any(w not in st.consumers for w in wires):
                return None  # the queues to consume from change: fetch() does that
        self.ack_or_log(acks)
        with st.cond:
            return self._take(st, consumer, wires, limit) if limit > 0 else []

    def _take(self, st: _State, consumer: str, wires: dict[str, str],
              limit: int) -> list[Delivery]:
        """Hand out up to ``limit`` buffered deliveries, highest priority first, then in
        the order they came (caller holds ``st.cond``)."""
        mine = st.pending_for(wires.keys())
        if not mine:
            return []
        if any(p.delivery.priority for p in mine):  # the buffer is in arrival order already
            mine.sort(key=lambda p: (-p.delivery.priority, p.seq))
        chosen = mine[:limit]
        if all(a is b for a, b in zip(chosen, st.buffer, strict=False)):  # (its front)
            del st.buffer[:len(chosen)]
        else:
            taken = {id(p) for p in chosen}
            st.buffer = [p for p in st.buffer if id(p) not in taken]
        for p in chosen:
            st.held[p.delivery.tag] = (consumer, p)
        return [p.delivery for p in chosen]

    @staticmethod
    def _resize(st: _State, need: int) -> bool:
        """Whether the prefetch should become ``need``: more, or (with slack) far fewer."""
        return need > st.prefetch or 0 < need <= st.prefetch // 2

    async def _consume(self, st: _State, target: dict[str, str], need: int, *,
                       restoring: bool = False) -> None:
        """Consume exactly ``target`` with a prefetch of at least ``need``."""
        if restoring:  # on_ready: nobody else may use the connection yet
            await self._consume_now(st, target, need)
            return
        await st.link.ready()
        async with st.setup:
            await self._consume_now(st, target, need)

    async def _consume_now(self, st: _State, target: dict[str, str], need: int) -> None:
        ch = await st.link.channel("cons")
        restart: list[str] = []
        if self._resize(st, need):
            st.prefetch = min(max(need, 1), 65535)
            await ch.basic_qos(prefetch_count=st.prefetch)
            restart = [w for w in st.consumers if w in target]
        for wire in [w for w in st.consumers if w not in target]:
            await self._stop_consuming(st, ch, wire, release=True)
        for wire in restart:
            await self._stop_consuming(st, ch, wire, release=False)
        for wire, queue in target.items():
            if wire not in st.consumers:
                await st.link.declare_queue(wire)
                epoch = st.epoch
                ctag = f"celeriac.{uuid.uuid4().hex}"
                st.consumers[wire] = ctag
                await ch.basic_consume(
                    wire, lambda m, w=wire, q=queue, e=epoch, c=ch: self._arrived(st, e, c, w,
                                                                                 q, m),
                    consumer_tag=ctag)
        st.wanted = dict(target)

    async def _stop_consuming(self, st: _State, ch: Any, wire: str, *, release: bool) -> None:
        ctag = st.consumers.pop(wire)
        await ch.basic_cancel(ctag)
        if release:
            with st.cond:
                back = st.pending_for({wire})
                st.buffer = [p for p in st.buffer if p.wire != wire]
            for p in back:  # they were never handed out: back to the queue, in place
                await ch.basic_nack(p.dtag, requeue=True, wait=False)

    def _pending(self, st: _State, epoch: str, ch: Any, wire: str, queue: str,
                 msg: Any) -> _Pending:
        props = msg.header.properties
        message, private = read_message(props, msg.body)
        before = private.get(H_DELIVERIES)
        redelivered = bool(msg.delivery.redelivered)
        count = (before if isinstance(before, int) else 0) + 1 + redelivered
        dtag = int(msg.delivery.delivery_tag or 0)
        return _Pending(next(st.seq), wire, epoch, dtag, props.message_id or None, redelivered,
                        Delivery(f"{epoch}.{dtag}", queue, message, count, props.priority or 0),
                        ch)

    def _arrived(self, st: _State, epoch: str, ch: Any, wire: str, queue: str,
                 msg: Any) -> None:
        p = self._pending(st, epoch, ch, wire, queue, msg)
        with st.cond:
            if epoch != st.epoch or self._reclaim(st, p):
                return
            st.buffer.append(p)
            st.cond.notify_all()

    async def _pull(self, st: _State, consumer: str, wires: dict[str, str],
                    limit: int) -> list[Delivery]:
        """``fetch`` with ``timeout=0``: what the buffer holds, then ``basic.get``."""
        if any(w in st.consumers for w in wires):
            await self._barrier(st)
        with st.cond:
            got = self._take(st, consumer, wires, limit)
        ch = await st.link.channel("cons")
        open_ = list(wires.items())
        while len(got) < limit and open_:
            for wire, queue in list(open_):
                await st.link.declare_queue(wire)
                msg = await ch.basic_get(wire)
                if not isinstance(msg.delivery, amqp_io.spec.Basic.GetOk):
                    open_.remove((wire, queue))
                    continue
                p = self._pending(st, st.epoch, ch, wire, queue, msg)
                with st.cond:
                    if self._reclaim(st, p):
                        continue
                    st.held[p.delivery.tag] = (consumer, p)
                got.append(p.delivery)
                if len(got) >= limit:
                    break
        return got

    def wake(self) -> None:
        st = self._state
        if st is not None and st.pid == os.getpid():
            with st.cond:
                st.woken = True
                st.cond.notify_all()

    # -- settling -------------------------------------------------------------------------------
    def _pick(self, st: _State, tags: Sequence[str], *,
              acking: bool) -> list[tuple[str, _Pending]]:
        """Take what ``tags`` name out of ``held`` as (consumer, delivery); unknown tags drop.

        An orphan's tag is settled by its redelivery, if that comes back to us: acked at
        once, or (requeued) handed out afresh.
        """
        with st.cond:
            picked = [st.held.pop(t) for t in dict.fromkeys(tags) if t in st.held]
            for tag in tags:
                mid = st.orphan_tags.get(tag)
                if mid is not None and acking:
                    st.orphans[mid].acked = True
                elif mid is not None:
                    del st.orphan_tags[tag], st.orphans[mid]
            if acking:  # a dead_letter() may still come for these (see its docstring)
                for _, p in picked:
                    st.remember_acked(p.delivery.tag)
        return picked

    def ack(self, tags: Sequence[str]) -> None:
        st = self._state
        if not tags or st is None or st.pid != os.getpid():
            return
        with st.settling:
            picked = self._pick(st, tags, acking=True)
            if picked and isinstance(st.link.channels.get("cons"), LeanChannel):
                self._settle_direct(st, [p for _, p in picked])
            elif picked:
                self._call(st, self._settle(st, [p for _, p in picked]))

    async def _settle(self, st: _State, picked: list[_Pending]) -> None:
        """Ack deliveries taken out of ``held``/``buffer``.

        Those whose channel is gone come back from the broker: their redelivery to us is
        acked on arrival (see :meth:`_reclaim`).
        """
        ch = st.link.channels.get("cons")
        if isinstance(ch, LeanChannel):
            self._settle_direct(st, picked)
            return
        live = [] if ch is None or ch.is_closed else [p for p in picked if p.epoch == st.epoch]
        if len(live) < len(picked):
            self._settle_later(st, [p for p in picked if all(p is not q for q in live)])
        tags = sorted(p.dtag for p in live)
        if not tags or ch is None:
            return
        with st.cond:  # one ack covers them all when no other delivery is older than the last
            others = [p.dtag for p in st.buffer] + [p.dtag for _, p in st.held.values()]
        acks = ([(tags[-1], True)] if not others or min(others) > tags[-1]
                else [(dtag, False) for dtag in tags])
        try:  # returns once the frames are written: the broker settles them in order
            for dtag, multiple in acks:
                await ch.basic_ack(dtag, multiple=multiple, wait=dtag == acks[-1][0])
        except (amqp_io.amqp_errors.AMQPError, RuntimeError):
            self._settle_later(st, live)
        else:
            st.remember_sent(live)

    def _settle_direct(self, st: _State, picked: list[_Pending]) -> None:
        """:meth:`_settle` from the caller's thread, on our own consuming connection: each
        on the connection that delivered it, which knows what it may ack at once."""
        live = [p for p in picked if p.epoch == st.epoch and isinstance(p.channel, LeanChannel)
                and not p.channel.is_closed]
        if len(live) < len(picked):
            self._settle_later(st, [p for p in picked if all(p is not q for q in live)])
        for ch in {id(p.channel): p.channel for p in live}.values():
            mine = [p for p in live if p.channel is ch]
            try:
                ch.settle([p.dtag for p in mine])
            except LeanClosed:
                self._settle_later(st, mine)
            else:
                st.remember_sent(mine)

    def _settle_later(self, st: _State, stale: list[_Pending]) -> None:
        now = time.monotonic()
        with st.cond:
            for p in stale:
                if p.mid is not None:
                    st.orphans[p.mid] = _Orphan(p.delivery.tag, "", now, acked=True)

    def requeue(self, tags: Sequence[str]) -> None:
        st = self._state
        if not tags or st is None or st.pid != os.getpid():
            return
        with st.settling:
            picked = self._pick(st, tags, acking=False)
            if picked:
                self._call(st, self._requeue(st, picked))

    async def _requeue(self, st: _State, picked: list[tuple[str, _Pending]]) -> None:
        try:
            await asyncio.gather(*(st.link.publish_to_queue(
                p.wire, p.delivery.message.body,
                properties(p.delivery.message, p.delivery.priority,
                           headers={H_DELIVERIES: p.delivery.deliveries})) for _, p in picked))
        except BaseException:
            with st.cond:  # still unacked and ours: settle them some other way
                for consumer, p in picked:
                    st.held.setdefault(p.delivery.tag, (consumer, p))
            raise
        await self._settle(st, [p for _, p in picked])

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Record ``delivery`` in ``<queue>.dead``; a stale or orphaned tag records nothing.

        (The broker has given the message back: whoever gets it next judges it again.)
        """
        st = self._ensure()
        with st.settling:
            with st.cond:
                acked = delivery.tag in st.acked
                picked = self._pick(st, [delivery.tag], acking=False)
                if not picked and not acked:
                    return
                st.known.add(delivery.queue)
            props = properties(delivery.message, delivery.priority, headers={
                H_REASON: reason, H_DELIVERIES: delivery.deliveries, H_DEAD_AT: self.clock()})
            self._call(st, self._dead_letter(st, self._name(delivery.queue), props, delivery,
                                             picked))

    async def _dead_letter(self, st: _State, wire: str, props: Any, delivery: Delivery,
                           picked: list[tuple[str, _Pending]]) -> None:
        dead = f"{wire}.dead"
        try:
            await st.link.publish_to_queue(dead, delivery.message.body, props,
                                           priorities=False)
        except BaseException:
            with st.cond:  # still unacked and ours
                for consumer, p in picked:
                    st.held.setdefault(p.delivery.tag, (consumer, p))
            raise
        await self._settle(st, [p for _, p in picked])

    def renew(self, consumer: str) -> int:
        st = self._state
        if st is None or st.pid != os.getpid():
            return 0
        with st.cond:
            return (sum(1 for owner, _ in st.held.values() if owner == consumer)
                    + sum(1 for o in st.orphans.values()
                          if o.consumer == consumer and not o.acked))

    # -- queues ---------------------------------------------------------------------------------
    def queue_size(self, queue: str) -> int:
        st = self._ensure()
        return int(self._call(st, self._size(st, self._name(queue))))

    async def _size(self, st: _State, wire: str) -> int:
        ok = await st.link.passive(wire)
        if wire in st.consumers:
            await self._barrier(st)
        with st.cond:
            return (ok.message_count if ok else 0) + len(st.pending_for({wire}))

    def purge(self, queue: str) -> int:
        st = self._ensure()
        return int(self._call(st, self._purge(st, self._name(queue))))

    async def _purge(self, st: _State, wire: str) -> int:
        if wire in st.consumers:
            await self._barrier(st)
        if await st.link.passive(wire) is None:
            return 0
        ch = await st.link.channel("ops")
        ok = await ch.queue_purge(wire)
        with st.cond:
            mine = st.pending_for({wire})
            st.buffer = [p for p in st.buffer if p.wire != wire]
        await self._settle(st, mine)
        return int(ok.message_count) + len(mine)

    def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        st = self._ensure()
        with st.cond:
            queues = [queue] if queue is not None else sorted(st.known)
        out: list[DeadLetter] = []
        for name in queues:
            out += self._call(st, self._browse(st, name))
        return out

    async def _browse(self, st: _State, queue: str) -> list[DeadLetter]:
        await st.link.ready()
        ch = await st.link.connection.channel(publisher_confirms=False)
        out = []
        try:
            while True:
                msg = await ch.basic_get(f"{self._name(queue)}.dead")
                if not isinstance(msg.delivery, amqp_io.spec.Basic.GetOk):
                    break
                message, private = read_message(msg.header.properties, msg.body)
                out.append(DeadLetter(queue, message, str(private.get(H_REASON, "")),
                                      int(private.get(H_DELIVERIES) or 0),
                                      float(private.get(H_DEAD_AT) or 0.0)))
        except amqp_io.amqp_errors.ChannelNotFoundEntity:
            return []
        finally:  # closing the channel puts what we got back, in order
            with contextlib.suppress(Exception):
                await ch.close()
        return out

    # -- broadcast --------------------------------------------------------------------------
    def broadcast(self, channel: str, payload: bytes) -> None:
        st = self._ensure()
        props = properties(Message(body=bytes(payload)), 0, persistent=False)
        self._call(st, self._broadcast(st, self._name(channel), bytes(payload), props))

    async def _broadcast(self, st: _State, exchange: str, payload: bytes, props: Any) -> None:
        await st.link.publish("", payload, props, exchange=exchange, mandatory=False,
                              prepare=lambda: st.link.declare_exchange(exchange, "fanout"))

    def subscribe(self, channel: str) -> Subscription:
        st = self._ensure()
        sub = _AMQPSubscription(channel, st, self._name(channel))
        self._call(st, st.link.listen(sub.listener))
        return sub

    # -- listening and replies (``rpc://`` results use these too) ---------------------------
    def listen(self, queue: str, on_message: Callable[[Message, float | None], None], *,
               expires: float | None = None) -> object:
        """Consume ``queue`` (exclusive to this connection, deleted with it) without acks.

        ``on_message(message, expires_at)`` runs for each message on the thread that reads
        the connection (see :class:`~.amqp_io.Listener`), so it must be quick and must not
        call back into this handle; ``expires_at`` is the sender's clock reading plus the
        ttl it gave, or ``None``.
        Declared and consumed again after a reconnect. Returns a handle for
        :meth:`unlisten`.
        """
        def arrived(msg: Any) -> None:
            message, private = read_message(msg.header.properties, msg.body)
            expires_at = private.get(H_EXPIRES)
            on_message(message, float(expires_at) if expires_at is not None else None)

        st = self._ensure()
        listener = Listener(self._name(queue), arrived, expires)
        self._call(st, st.link.listen(listener))
        return listener

    def unlisten(self, handle: object) -> None:
        """Stop consuming a :meth:`listen` queue, which deletes it."""
        st = self._state
        if isinstance(handle, Listener) and st is not None and st.pid == os.getpid():
            self._call(st, st.link.unlisten(handle))

    def send(self, queue: str, message: Message, *, ttl: float | None = None,
             persistent: bool = False) -> None:
        """Publish to ``queue`` through the default exchange, without declaring it.

        Confirmed; a queue that does not exist drops the message (its reader is gone).
        With ``ttl`` the broker drops it unread after that long, and readers see it as
        expired after their clock passes ours plus ``ttl``.
        """
        self._send(self._ensure(), [(self._name(queue), message)], ttl, persistent)

    def send_many(self, items: Sequence[tuple[str, Message]], *, ttl: float | None = None,
                  persistent: bool = False) -> None:
        if items:
            self._send(self._ensure(), [(self._name(q), m) for q, m in items], ttl, persistent)

    def _send(self, st: _State, items: list[tuple[str, Message]], ttl: float | None,
              persistent: bool) -> None:
        headers = {H_EXPIRES: self.clock() + ttl} if ttl is not None else None
        expiration = str(max(0, round(ttl * 1000))) if ttl is not None else None
        batch = [(wire, m.body, properties(m, 0, persistent=persistent, headers=headers,
                                           expiration=expiration)) for wire, m in items]
        rest, refused = self._publish_many_direct(st, batch, mandatory=False)
        if rest:
            self._call(st, self._send_batch(st, rest))
        _check_refused(refused, len(batch))

    @staticmethod
    async def _send_batch(st: _State, batch: list[tuple[str, bytes, Any]]) -> None:
        await asyncio.gather(*(st.link.publish(wire, body, props, mandatory=False)
                               for wire, body, props in batch))

    def sync(self) -> None:
        """Return once what the broker had sent to this handle's listeners has arrived."""
        st = self._ensure()
        if st.link.up:
            self._call(st, st.link.sync())

    def prepare_replies(self, reply_to: str) -> None:
        st = self._ensure()
        with st.cond:
            if reply_to in st.boxes:
                st.boxes[reply_to].used = time.monotonic()
                return
            items: deque[tuple[float | None, bytes]] = deque()

            def arrived(message: Message, expires_at: float | None) -> None:
                with st.cond:
                    items.append((expires_at, message.body))
                    st.cond.notify_all()

            idle = self._idle_boxes(st)
        handle = self.listen(reply_to, arrived, expires=self.reply_linger * 6)
        assert isinstance(handle, Listener)
        with st.cond:
            st.boxes[reply_to] = _Box(handle, items)
        for old in idle:
            self._call(st, st.link.unlisten(old.listener))

    def _idle_boxes(self, st: _State) -> list[_Box]:
        """Reply boxes to close: unread for ``reply_linger``, or beyond ``reply_boxes``."""
        now = time.monotonic()
        idle = sorted(((k, b) for k, b in st.boxes.items() if not b.waiting),
                      key=lambda kb: kb[1].used)
        excess = len(st.boxes) + 1 - self.reply_boxes
        gone = [k for i, (k, b) in enumerate(idle)
                if i < excess or now - b.used > self.reply_linger]
        return [st.boxes.pop(k) for k in gone]

    def reply(self, reply_to: str, payload: bytes, ttl: float = 300.0) -> None:
        self.send(reply_to, Message(body=bytes(payload)), ttl=ttl)

    def get_replies(self, reply_to: str, timeout: float) -> list[bytes]:
        st = self._ensure()
        if reply_to not in st.boxes:
            self.prepare_replies(reply_to)
        box = st.boxes.get(reply_to)
        if box is None:
            return []
        with st.cond:
            box.waiting += 1
            try:
                st.cond.wait_for(lambda: box.items, timeout)
            finally:
                box.waiting -= 1
            waited = bool(box.items)
        if (waited or timeout <= 0) and st.link.up:
            self._call(st, st.link.sync())
        with st.cond:
            box.used = time.monotonic()
            now = self.clock()
            items = [body for expires, body in box.items if expires is None or expires > now]
            box.items.clear()
        return items

    # -- lifecycle ------------------------------------------------------------------------------
    def after_fork(self) -> None:
        """Forget the parent's loop thread and connection (they are not ours); reconnect lazily."""
        self._lock = threading.Lock()
        if self._state is not None:
            self._abandoned.append(self._state)  # never touched again, never collected
        self._state = None

    def close(self) -> None:
        st, self._state = self._state, None
        if st is None or st.pid != os.getpid():
            return
        st.publishers.close()
        with contextlib.suppress(Exception):
            st.io.call(st.link.close(), timeout=15)
        st.io.stop()

    def drop_connection(self) -> None:
        """Break the connection as a network failure would (for tests); it reconnects."""
        st = self._ensure()
        st.io.call(st.link.drop())

    def describe(self) -> dict[str, Any]:
        return self.settings.describe()
