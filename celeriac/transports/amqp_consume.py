"""Consuming from RabbitMQ on a connection of our own: :class:`LeanChannel`.

aiormq spends about 150 µs of the worker's CPU on each delivery (a queue hop per frame,
a task per message, futures for each step), more than the rest of the worker. This
connection reads deliveries on a thread of its own with blocking reads, parses the
frames that matter here directly and hands each message to the consumer's callback on
that thread. Acks and rejects are written from whichever thread settles them.

It stands in for the ``cons`` channel of :class:`~celeriac.transports.amqp_io.Link` and has
the few aiormq channel methods the link and the transport use on it (``basic_qos``,
``basic_consume``, ``basic_cancel``, ``basic_get``, ``basic_nack``, ``queue_declare``,
``is_closed``, ``closing``), so the transport's bookkeeping (epochs, orphans, barriers)
stays as it is; acks go through :meth:`LeanChannel.settle`, which knows which deliveries of
this connection are unsettled. The link's reply queues (``rpc://`` results, control
replies) are consumed here too, without acks, so a reply reaches its waiter straight from
the reader thread. Its life is the link's: when either connection fails, both are closed
and opened again together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from ..greenlets import ThreadLike, native_connection, native_rlock, os_thread
from .amqp_header import read_content_header
from .amqp_io import Settings, describe_error

try:
    from pamqp import commands as spec
    from pamqp import frame as pamqp_frame
    from pamqp.header import ContentHeader, ProtocolHeader
except ImportError:  # pragma: no cover - the amqp extra is not installed
    spec = None  # type: ignore[assignment]

__all__ = ["FrameReader", "LeanChannel", "LeanClosed", "expect_method", "handshake"]

log = logging.getLogger("celeriac.transports.amqp")

_METHOD = struct.Struct(">HH")  # class id, method id
_DELIVER = (60, 60)
_HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"


class LeanClosed(RuntimeError):
    """The consuming connection is closed; what it held has gone back to the broker."""


def expect_method(reader: FrameReader, kind: type) -> Any:
    """The next frame, which must be the method ``kind``; a closed connection says why."""
    value = pamqp_frame.unmarshal(reader.frame())[2]
    if isinstance(value, spec.Connection.Close):
        raise ConnectionError(f"the broker closed the connection: {value.reply_code} "
                              f"{value.reply_text}")
    if not isinstance(value, kind):
        raise ConnectionError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def handshake(settings: Settings, name: str, *, heartbeat: int, confirms: bool,
              native: bool = False) -> tuple[socket.socket, int, int]:
    """A connected socket with channel 1 open: (socket, frame_max, heartbeat agreed on);
    ``native``: one that blocks only its thread, even under gevent (see
    :func:`~celeriac.greenlets.native_connection`)."""
    sock = (native_connection(settings.hostname, settings.port, settings.connect_timeout)
            if native else socket.create_connection((settings.hostname, settings.port),
                                                    timeout=settings.connect_timeout))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        reader = FrameReader(sock)
        sock.sendall(ProtocolHeader().marshal())

        def expect(kind: type) -> Any:
            return expect_method(reader, kind)

        def send(channel: int, method: Any) -> None:
            sock.sendall(pamqp_frame.marshal(method, channel))

        expect(spec.Connection.Start)
        send(0, spec.Connection.StartOk(
            client_properties={
                "product": "celeriac",
                "connection_name": f"celeriac pid {os.getpid()} {name}",
                "capabilities": {"publisher_confirms": confirms,
                                 "authentication_failure_close": True}},
            mechanism="PLAIN", response=f"\0{settings.userid}\0{settings.password}"))
        tune = expect(spec.Connection.Tune)
        frame_max = min(tune.frame_max or 131072, 131072)
        agreed = min(heartbeat, tune.heartbeat) if heartbeat and tune.heartbeat else heartbeat
        send(0, spec.Connection.TuneOk(channel_max=1, frame_max=frame_max, heartbeat=agreed))
        send(0, spec.Connection.Open(virtual_host=settings.virtual_host))
        expect(spec.Connection.OpenOk)
        send(1, spec.Channel.Open())
        expect(spec.Channel.OpenOk)
        if confirms:
            send(1, spec.Confirm.Select())
            expect(spec.Confirm.SelectOk)
        if reader.buffer:
            raise ConnectionError("unexpected frames from the broker after opening")
        return sock, frame_max, agreed
    except BaseException:
        with contextlib.suppress(OSError):
            sock.close()
        raise


class FrameReader:
    """Whole frames from a blocking socket; ``on_idle`` runs whenever a read times out."""

    def __init__(self, sock: socket.socket, on_idle: Callable[[float], None] | None = None
                 ) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.on_idle = on_idle
        self.heard = time.monotonic()

    def frame(self) -> bytes:
        buf = self.buffer
        while True:
            if len(buf) >= 7:
                end = 8 + struct.unpack_from(">I", buf, 3)[0]
                if len(buf) >= end:
                    data = bytes(buf[:end])
                    del buf[:end]
                    return data
            try:
                chunk = self.sock.recv(262144)
            except TimeoutError:
                if self.on_idle is None:
                    raise
                self.on_idle(self.heard)
                continue
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            self.heard = time.monotonic()
            buf += chunk


@dataclass(slots=True)
class _Delivery:
    """What the transport reads of a delivery: aiormq's names, our fields."""

    delivery_tag: int
    redelivered: bool


@dataclass(slots=True)
class Delivered:
    """A message as the transport's consumer callback sees it (aiormq's shape)."""

    delivery: Any
    header: Any
    body: bytes


class LeanChannel:
    """A consuming connection with one channel, read by a thread of its own.

    Create it, then :meth:`connect` (blocking; the link runs it off its loop). Callbacks
    given to :meth:`basic_consume` run on the reader thread. Everything that waits for the
    broker's answer (qos, consume, cancel, get) is a coroutine for the link's loop; acks
    and nacks are written at once, from any thread.
    """

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.closing: asyncio.Future[Any] = loop.create_future()
        self.sock: socket.socket | None = None
        self.heartbeat = 0
        # (held only around writes of a blocking socket: never across a greenlet switch)
        self._write_lock = native_rlock()  # close() may come from within a write
        self._wrote = time.monotonic()
        self._consumers: dict[str, Callable[[Delivered], None]] = {}
        self._no_ack: set[str] = set()  # consumer tags whose deliveries need no ack
        #: delivery tags this connection handed us and nobody has settled yet
        self._unsettled: set[int] = set()
        self._waiting: deque[tuple[tuple[type, ...], Future[Any]]] = deque()
        self._closed = False
        self._thread: ThreadLike | None = None

    # -- life -----------------------------------------------------------------------------
    def connect(self) -> None:
        self.sock, _, self.heartbeat = handshake(
            self.settings, "consumer", heartbeat=self.settings.heartbeat, confirms=False,
            native=True)
        self.sock.settimeout(self.heartbeat / 4 if self.heartbeat else None)
        self._thread = os_thread(self._run, "celeriac-amqp-consume")
        self._thread.start()

    @property
    def is_closed(self) -> bool:
        return self._closed

    def close(self, reason: BaseException | None = None) -> None:
        """Say goodbye and close the socket; the broker takes back what was not acked."""
        if self._closed:
            return
        self._closed = True
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                with self._write_lock:
                    sock.sendall(pamqp_frame.marshal(spec.Connection.Close(
                        reply_code=200, reply_text="bye", class_id=0, method_id=0), 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        failure = LeanClosed(f"the consuming connection is closed"
                             f"{f' ({describe_error(reason)})' if reason else ''}")
        while self._waiting:
            _, fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(failure)

        def finish() -> None:
            if not self.closing.done():
                self.closing.set_exception(failure)
                self.closing.exception()  # retrieved: nobody need wait for it
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is watching
            self.loop.call_soon_threadsafe(finish)

    # -- writing --------------------------------------------------------------------------
    def _write(self, data: bytes, waiter: tuple[tuple[type, ...], Future[Any]] | None = None
               ) -> None:
        """Write ``data``; ``waiter`` expects the broker's answer to it (in writing order)."""
        with self._write_lock:
            if waiter is not None and not self._closed:
                self._waiting.append(waiter)
            self._write_locked(data)

    def _write_locked(self, data: bytes) -> None:
        """Write ``data`` (the caller holds the write lock)."""
        try:
            if self._closed or self.sock is None:
                raise LeanClosed("the consuming connection is closed")
            self.sock.sendall(data)
            self._wrote = time.monotonic()
        except OSError as exc:
            self.close(exc)
            raise LeanClosed(f"the consuming connection failed: {describe_error(exc)}"
                             ) from None

    async def _rpc(self, method: Any, *answers: type) -> Any:
        fut: Future[Any] = Future()
        self._write(pamqp_frame.marshal(method, 1), (answers, fut))
        return await asyncio.wrap_future(fut)

    # -- what the transport calls ---------------------------------------------------------
    async def basic_qos(self, prefetch_count: int) -> Any:
        return await self._rpc(spec.Basic.Qos(prefetch_count=prefetch_count), spec.Basic.QosOk)

    async def basic_consume(self, queue: str, callback: Callable[[Delivered], None], *,
                            consumer_tag: str, no_ack: bool = False) -> Any:
        """Consume ``queue``; with ``no_ack`` its deliveries are settled by the broker as it
        sends them, so they are never tracked or acked here."""
        self._consumers[consumer_tag] = callback
        if no_ack:
            self._no_ack.add(consumer_tag)
        return await self._rpc(spec.Basic.Consume(queue=queue, consumer_tag=consumer_tag,
                                                  no_ack=no_ack), spec.Basic.ConsumeOk)

    async def basic_cancel(self, consumer_tag: str) -> Any:
        try:
            return await self._rpc(spec.Basic.Cancel(consumer_tag=consumer_tag),
                                   spec.Basic.CancelOk)
        finally:
            self._consumers.pop(consumer_tag, None)
            self._no_ack.discard(consumer_tag)

    async def queue_declare(self, queue: str, *, exclusive: bool = False,
                            auto_delete: bool = False,
                            arguments: dict[str, Any] | None = None) -> Any:
        """Declare ``queue``; an exclusive one lives as long as this connection."""
        return await self._rpc(spec.Queue.Declare(queue=queue, exclusive=exclusive,
                                                  auto_delete=auto_delete, arguments=arguments),
                               spec.Queue.DeclareOk)

    async def ping(self) -> None:
        """A round trip: what the broker sent before its answer has reached the callbacks
        (they run on the reader thread, in the order the frames came)."""
        await self._rpc(spec.Exchange.Declare(exchange="amq.direct", exchange_type="direct",
                                              passive=True), spec.Exchange.DeclareOk)

    async def basic_get(self, queue: str) -> Delivered:
        return await self._rpc(spec.Basic.Get(queue=queue), spec.Basic.GetOk,
                               spec.Basic.GetEmpty)

    async def basic_nack(self, delivery_tag: int, multiple: bool = False,
                         requeue: bool = True, wait: bool = True) -> None:
        self.settle([delivery_tag], requeue=requeue)

    def settle(self, tags: Iterable[int], *, requeue: bool | None = None) -> None:
        """Ack (or, with ``requeue`` given, nack) deliveries of this connection, at once and
        from any thread.

        The connection knows what it delivered and what is settled, so a tag that is
        unknown or settled already is left out (the broker would close the channel for
        it), and one ``multiple`` ack is written only when it covers nothing else.
        """
        with self._write_lock:
            unsettled = self._unsettled
            mine = sorted({t for t in tags if t in unsettled})
            if not mine:
                return
            unsettled.difference_update(mine)
            frames: list[Any]
            if requeue is None and not any(t < mine[-1] for t in unsettled):
                frames = [spec.Basic.Ack(delivery_tag=mine[-1], multiple=True)]
            elif requeue is None:
                frames = [spec.Basic.Ack(delivery_tag=t) for t in mine]
            else:
                frames = [spec.Basic.Nack(delivery_tag=t, requeue=requeue) for t in mine]
            self._write_locked(b"".join(pamqp_frame.marshal(f, 1) for f in frames))

    def _track(self, delivery_tag: int) -> None:
        with self._write_lock:
            self._unsettled.add(delivery_tag)

    # -- the reader thread ----------------------------------------------------------------
    def _run(self) -> None:
        assert self.sock is not None
        reader = FrameReader(self.sock, self._idle)
        reason: BaseException | None = None
        try:
            while not self._closed:
                self._dispatch(reader, reader.frame())
        except LeanClosed:
            pass
        except Exception as exc:  # any failure ends the connection alike
            reason = exc
            if not self._closed:
                log.warning("The consuming connection to %s failed (%s)",
                            self.settings.masked, self.settings.scrub(describe_error(exc)))
        finally:
            self.close(reason)

    def _idle(self, heard: float) -> None:
        """Nothing to read for a while: send a heartbeat when due; give up on a silent broker."""
        if self._closed:
            raise LeanClosed("the consuming connection is closed")
        now = time.monotonic()
        if now - heard > 2 * self.heartbeat:
            raise ConnectionError("no heartbeat from the broker")
        if now - self._wrote >= self.heartbeat / 2:
            self._write(_HEARTBEAT)

    def _dispatch(self, reader: FrameReader, data: bytes) -> None:
        kind = data[0]
        if kind == 8:  # heartbeat: answered if we have been quiet
            if time.monotonic() - self._wrote >= self.heartbeat / 2:
                self._write(_HEARTBEAT)
            return
        if kind != 1:
            raise ConnectionError(f"unexpected frame of type {kind} from the broker")
        if _METHOD.unpack_from(data, 7) == _DELIVER:
            self._deliver(reader, data)
            return
        value = pamqp_frame.unmarshal(data)[2]
        if isinstance(value, spec.Basic.GetOk):
            self._track(value.delivery_tag or 0)
            self._answer(self._read_content(reader, value))
        elif isinstance(value, spec.Connection.Close):
            with contextlib.suppress(LeanClosed):
                self._write(pamqp_frame.marshal(spec.Connection.CloseOk(), 0))
            raise ConnectionError(f"the broker closed the connection: {value.reply_code} "
                                  f"{value.reply_text}")
        elif isinstance(value, spec.Channel.Close):
            with contextlib.suppress(LeanClosed):
                self._write(pamqp_frame.marshal(spec.Channel.CloseOk(), 1))
            raise ConnectionError(f"the broker closed the channel: {value.reply_code} "
                                  f"{value.reply_text}")
        elif isinstance(value, spec.Basic.GetEmpty):
            self._answer(Delivered(value, ContentHeader(), b""))
        else:
            self._answer(value)

    def _answer(self, value: Any) -> None:
        kind = type(value.delivery) if isinstance(value, Delivered) else type(value)
        with self._write_lock:
            if not self._waiting or kind not in self._waiting[0][0]:
                raise ConnectionError(f"unexpected {kind.__name__} from the broker")
            _, fut = self._waiting.popleft()
        fut.set_result(value)

    def _deliver(self, reader: FrameReader, data: bytes) -> None:
        at = 11
        size = data[at]
        tag = data[at + 1:at + 1 + size].decode()
        at += 1 + size
        dtag, = struct.unpack_from(">Q", data, at)
        redelivered = bool(data[at + 8] & 1)
        message = self._read_content(reader, _Delivery(dtag, redelivered))
        if tag in self._no_ack:  # the broker settled it as it sent it
            listener = self._consumers.get(tag)
            if listener is not None:
                listener(message)
            return
        self._track(dtag)
        callback = self._consumers.get(tag)
        if callback is not None:
            callback(message)
        else:  # it raced a cancel: back to the queue
            self.settle([dtag], requeue=True)

    def _read_content(self, reader: FrameReader, delivery: Any) -> Delivered:
        header = read_content_header(reader.frame())
        parts: list[bytes] = []
        size = 0
        while size < header.body_size:
            data = reader.frame()
            if data[0] != 3:
                raise ConnectionError(f"expected a body frame, got type {data[0]}")
            parts.append(data[7:-1])
            size += len(parts[-1])
        return Delivered(delivery, header, parts[0] if len(parts) == 1 else b"".join(parts))
